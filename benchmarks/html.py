"""A tiny document model rendered twice: Markdown (images by relative path) and self-contained HTML (images as
base64 data URIs, inline CSS, no scripts, no external links) — the same content in both files.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.88em}
th,td{border:1px solid #ccc;padding:.3em .55em;text-align:right}
th{background:#f2f2f2} td:first-child,th:first-child{text-align:left}
caption{caption-side:bottom;font-size:.8em;color:#555;text-align:left;padding-top:.3em}
figure{margin:1em 0 1.8em} figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.8em;color:#555}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto} code{background:#f6f6f6;padding:0 .2em}
.note{color:#8a4b00}
"""


@dataclass
class Heading:
    """A section title (level 1-3)."""

    text: str
    level: int = 2


@dataclass
class Para:
    """A paragraph of plain text; `note=True` styles it as a warning."""

    text: str
    note: bool = False


@dataclass
class Bullets:
    """A bullet list of plain-text items."""

    items: Sequence[str]


@dataclass
class Code:
    """Preformatted text (commands, logs)."""

    text: str


@dataclass
class Table:
    """A table: header cells, rows of cells (already formatted strings), a caption under it."""

    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""


@dataclass
class Image:
    """A PNG file shown with a caption (relative link in Markdown, embedded in HTML)."""

    path: Path
    alt: str
    caption: str = ""


@dataclass
class Document:
    """An ordered list of blocks with a title."""

    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> Document:
        """Append blocks; returns self for chaining."""
        self.blocks.extend(blocks)
        return self


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Document, base_dir: Path) -> str:
    """Markdown text; images are linked relative to `base_dir` (where report.md is written)."""
    out = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out += ["#" * (b.level) + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [("> **Note:** " if b.note else "") + b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Code):
            out += ["```", b.text.rstrip("\n"), "```", ""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(b.headers))) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out += ([f"\n*{b.caption}*"] if b.caption else []) + [""]  # blank line: a caption is not a table row
        elif isinstance(b, Image):
            rel = Path(b.path).resolve().relative_to(base_dir.resolve()) if Path(b.path).is_absolute() else b.path
            out += [f"![{b.alt}]({Path(rel).as_posix()})", ""] + ([f"*{b.caption}*", ""] if b.caption else [])
        else:
            raise TypeError(f"unknown block {type(b).__name__}")
    return "\n".join(out)


def data_uri(path: Path) -> str:
    """A PNG file as a base64 data URI (so the HTML needs no file beside it)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(doc: Document) -> str:
    """One self-contained HTML page: inline CSS, images embedded, no scripts and no external resources."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(doc.title)}</title><style>{CSS}</style></head><body>", f"<h1>{esc(doc.title)}</h1>"]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            opening = '<p class="note"><strong>Note:</strong> ' if b.note else "<p>"
            out.append(f"{opening}{esc(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Code):
            out.append(f"<pre>{esc(b.text)}</pre>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(str(h))}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            cap = f"<caption>{esc(b.caption)}</caption>" if b.caption else ""
            out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            cap = f"<figcaption>{esc(b.caption)}</figcaption>" if b.caption else ""
            out.append(f'<figure><img alt="{esc(b.alt)}" src="{data_uri(b.path)}">{cap}</figure>')
        else:
            raise TypeError(f"unknown block {type(b).__name__}")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
