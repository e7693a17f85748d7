"""Dataset statistics: images, objects per class, small and difficult objects, per image.

"Small" follows COCO: box area (in original image pixels) below 32 * 32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from runtime.boxes import box_area
from runtime.records import DetectionSet

SMALL_AREA = 32 * 32  # COCO's small / medium boundary


@dataclass
class ImageStats:
    """Counts for one image."""

    image: str
    width: int
    height: int
    objects: int
    per_class: dict[str, int]
    small: int
    difficult: int


@dataclass
class DatasetStats:
    """Counts for a whole split; `to_dict` gives the JSON printed by `stats --json`."""

    name: str
    classes: list[str]
    images: int
    objects: int
    per_class: dict[str, int]
    small: int
    difficult: int
    per_image: list[ImageStats] = field(default_factory=list)
    problems: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for json.dumps (keys: images, objects, per_class, small, difficult, per_image, ...)."""
        return asdict(self)


def dataset_stats(dataset: DetectionSet) -> DatasetStats:
    """Count images, objects per class (all classes listed, zeros included), small and difficult objects."""
    names = list(dataset.classes)
    total = np.zeros(len(names), np.int64)
    per_image = []
    for rec in dataset.records:
        counts = np.bincount(rec.labels, minlength=len(names)) if len(rec) else np.zeros(len(names), np.int64)
        total += counts
        per_image.append(ImageStats(
            image=rec.image_id, width=rec.width, height=rec.height, objects=len(rec),
            per_class={names[i]: int(c) for i, c in enumerate(counts) if c},
            small=int((box_area(rec.boxes) < SMALL_AREA).sum()), difficult=int(rec.difficult.sum()),
        ))
    return DatasetStats(
        name=dataset.name, classes=names, images=len(dataset.records), objects=int(total.sum()),
        per_class={n: int(c) for n, c in zip(names, total)},
        small=sum(s.small for s in per_image), difficult=sum(s.difficult for s in per_image), per_image=per_image,
    )


def print_stats(stats: DatasetStats, console: Console | None = None, per_image: bool = False) -> None:
    """Print the per-class table (and optionally one row per image) with rich."""
    console = console or Console()
    table = Table(title=f"{stats.name}: {stats.images} images")
    table.add_column("class")
    table.add_column("objects", justify="right")
    for name, n in stats.per_class.items():
        table.add_row(name, str(n))
    table.add_section()
    table.add_row("all", str(stats.objects))
    console.print(table)
    console.print(f"small (COCO: area < 32² px): {stats.small}    difficult: {stats.difficult}")
    if per_image:
        rows = Table(title="per image")
        for col in ("image", "size", "objects", "small", "difficult", "classes"):
            rows.add_column(col, justify="left" if col in ("image", "classes") else "right")
        for s in stats.per_image:
            classes = ", ".join(f"{k} {v}" for k, v in sorted(s.per_class.items(), key=lambda kv: -kv[1]))
            rows.add_row(s.image, f"{s.width}x{s.height}", str(s.objects), str(s.small), str(s.difficult), classes)
        console.print(rows)


def print_anchor_report(report: Any, console: Console | None = None) -> None:
    """Print size quantiles per class and the anchor coverage tables of a runtime.data.anchor_fit.AnchorReport."""
    console = console or Console()
    where = f"network input {report.input_size} px (stretched)" if report.input_size else "image pixels"
    table = Table(title=f"object size sqrt(w h) and aspect h/w per class, {where}")
    table.add_column("class")
    table.add_column("objects", justify="right")
    for q in ("p5", "p25", "p50", "p75", "p95"):
        table.add_column(f"size {q}", justify="right")
    table.add_column("h/w p5 / p50 / p95", justify="right")
    for name, c in report.classes.items():
        s, a = c.size_quantiles, c.aspect_quantiles
        table.add_row(name, str(c.objects), *(f"{s[q]:.1f}" if s else "-" for q in ("p5", "p25", "p50", "p75", "p95")),
                      f"{a['p5']:.2f} / {a['p50']:.2f} / {a['p95']:.2f}" if a else "-")
    console.print(table)
    if report.current is None:
        console.print("anchor coverage: give the network input size (--pipeline NAME or --input-size N)")
        return
    cov = Table(title="anchor coverage", caption=f"{report.images_sampled} images; IoU assigner, foreground >= "
                f"{report.fg_iou:g}; anchors on the real feature grids")
    for col in ("anchors", "with a positive", "low-quality only", "positives/object", "mean best IoU"):
        cov.add_column(col, justify="left" if col == "anchors" else "right")
    rows = [("current", report.current)]
    if report.suggested is not None:
        rows.append((f"suggested ({report.suggested_base_scale:g} x stride)", report.suggested))
    for label, c in rows:
        cov.add_row(label, f"{100 * c.with_positive:.1f}%", f"{100 * c.low_quality_only:.1f}%",
                    f"{c.mean_positives:.2f}", f"{c.mean_best_iou:.3f}")
    console.print(cov)
    for label, c in rows:
        sizes = " | ".join(",".join(f"{x:g}" for x in level) for level in c.sizes)
        levels = " ".join(f"{k} {100 * v:.0f}%" for k, v in c.best_level.items() if v)
        console.print(f"{label}: sizes per level {sizes}; ratios {list(c.aspect_ratios)}; best anchor on {levels}",
                      highlight=False)
    if report.suggested is not None:
        sizes = ", ".join("[" + ", ".join(f"{x:g}" for x in level) + "]" for level in report.suggested.sizes)
        console.print(f"pipelines.yaml, under the model: anchors: {{sizes: [{sizes}], aspect_ratios: "
                      f"{list(report.suggested.aspect_ratios)}}}")
