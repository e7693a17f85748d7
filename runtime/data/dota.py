"""DOTA v1.0 / v1.5 labelTxt: one text file per image, one oriented object per line.

Layout: root/images/P0001.png + root/labelTxt/P0001.txt, or root/<split>/{images,labelTxt} as DOTA ships
train/ and val/. A label line is `x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]`; optional header lines
`imagesource:...` and `gsd:...` come first; CRLF line endings are accepted. Polygons become horizontal boxes
(min/max of the corners) clipped to the image; DOTA has no image sizes in its labels, so each image header is read.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.boxes import poly_to_hbb
from runtime.data.images import IMAGE_SUFFIXES, ImageError, probe_image_size
from runtime.data.objects import RawObjects, build_record
from runtime.data.problems import MALFORMED_ANNOTATION, MISSING_ANNOTATION, MISSING_IMAGE, ProblemReport
from runtime.errors import UserError
from runtime.records import DetectionSet, ImageRecord

HEADER_KEYS = ("imagesource", "gsd")
ROOT_SPLITS = ("", ".", "all")  # split names meaning "root itself holds images/ and labelTxt/"


@dataclass
class DotaLabels:
    """The parsed content of one labelTxt file (polygons as (N, 8) float64 in pixels)."""

    polygons: np.ndarray
    names: list[str]
    difficult: list[int]
    wheres: list[str]
    header: dict[str, str] = field(default_factory=dict)


def dota_dirs(root: Path, split: str | None) -> tuple[Path, Path]:
    """(images dir, labelTxt dir) for a split: root/<split>/ when it exists, root itself for '' / 'all'."""
    base = root if split is None or split in ROOT_SPLITS else root / split
    if not (base / "labelTxt").is_dir():
        subs = sorted(p.name for p in root.iterdir() if (p / "labelTxt").is_dir()) if root.is_dir() else []
        here = ["'' (the root itself)"] if (root / "labelTxt").is_dir() else []
        raise UserError(
            f"no DOTA split {split!r}: {base / 'labelTxt'} does not exist",
            where=str(root),
            fix=f"use one of the splits found: {', '.join(here + subs)}" if here + subs
            else "DOTA needs images/ and labelTxt/ (or train/ and val/ each holding them) under the root",
        )
    return base / "images", base / "labelTxt"


def parse_dota_labels(path: Path, report: ProblemReport) -> DotaLabels:
    """Parse a labelTxt file; malformed lines are reported (with file:line) and skipped."""
    polys: list[list[float]] = []
    names: list[str] = []
    difficult: list[int] = []
    wheres: list[str] = []
    header: dict[str, str] = {}
    # splitlines() treats \r\n, \n and \r alike, so CRLF files need no special case.
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        key, sep, value = text.partition(":")
        if sep and key.strip().lower() in HEADER_KEYS:
            header[key.strip().lower()] = value.strip()
            continue
        where = f"{path}:{lineno}"
        parts = text.split()
        if len(parts) not in (9, 10):
            report.add(MALFORMED_ANNOTATION, f"expected 8 coordinates, a class and an optional difficult flag, "
                       f"got {len(parts)} fields: {text[:80]!r}", where)
            continue
        try:
            coords = [float(v) for v in parts[:8]]
            diff = int(parts[9]) if len(parts) == 10 else 0
        except ValueError:
            coords, diff = [float("nan")], 0
        if not np.isfinite(coords).all():
            report.add(MALFORMED_ANNOTATION, "coordinates must be finite numbers and the difficult flag an "
                       f"integer: {text[:80]!r}", where)
            continue
        polys.append(coords)
        names.append(parts[8])
        difficult.append(diff)
        wheres.append(where)
    return DotaLabels(np.asarray(polys, dtype=np.float64).reshape(-1, 8), names, difficult, wheres, header)


def image_index(images_dir: Path) -> dict[str, Path]:
    """Image files of a folder by stem (DOTA ships .png; other common formats are accepted)."""
    if not images_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def load_dota(
    root: Path, split: str | None, classes: Sequence[str], report: ProblemReport
) -> DetectionSet:
    """Read a DOTA split as horizontal boxes; difficult = flag != 0 (the devkit's '2' counts as difficult)."""
    images_dir, label_dir = dota_dirs(root, split)
    images = image_index(images_dir)
    labels = sorted(label_dir.glob("*.txt"))
    records: list[ImageRecord] = []
    for stem in sorted(set(images) - {p.stem for p in labels}):
        report.add(MISSING_ANNOTATION, "image has no labelTxt file", str(label_dir / f"{stem}.txt"))
    for label_path in labels:
        image_path = images.get(label_path.stem)
        if image_path is None:
            report.add(MISSING_IMAGE, f"image for {label_path.name} not found",
                       str(images_dir / f"{label_path.stem}.png"))
            continue
        try:
            width, height = probe_image_size(image_path)
        except ImageError as exc:
            report.add(exc.kind, exc.what, str(image_path))
            continue
        parsed = parse_dota_labels(label_path, report)
        raw = RawObjects()
        for box, name, diff, where in zip(poly_to_hbb(parsed.polygons), parsed.names, parsed.difficult, parsed.wheres):
            raw.add(box, name, diff != 0, where)
        records.append(build_record(image_path, width, height, raw, classes, report))
    name = root.name if split is None or split in ROOT_SPLITS else f"{root.name}/{split}"
    return DetectionSet(name=name, classes=tuple(classes), records=records)


def format_dota_line(polygon: Sequence[float], name: str, difficult: int) -> str:
    """One labelTxt line; integral coordinates are written without decimals, others with up to 2."""
    coords = " ".join(_num(v) for v in polygon)
    return f"{coords} {name} {int(difficult)}"


def _num(v: float) -> str:
    text = f"{float(v):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
