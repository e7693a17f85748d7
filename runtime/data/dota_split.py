"""Cut large DOTA images into overlapping patches, as the DOTA devkit does, writing a new DOTA-format dataset.

Windows: `patch` px squares every `patch - overlap` px; the last window of a row / column is moved back to be flush
with the image edge (no padding), and an image smaller than a patch is one patch of its own size. Patches are named
like the devkit's `P0706__1024__0___0` (stem, patch size, left, top).
An object goes into a patch when at least `keep_thresh` of its *polygon* area lies inside (exact polygon clipping,
not a box approximation); it is written clipped to the patch, shifted, with its difficult flag. Fragments under the
threshold are dropped, or with below_thresh="difficult" written with flag 2 as the devkit does. Because windows
overlap by `overlap`, an object smaller than the overlap always lies whole in at least one patch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from runtime.boxes import clip_polygon, poly_to_hbb, polygon_area, polygon_inside_fraction
from runtime.data.classes import class_index, class_list
from runtime.data.dota import ROOT_SPLITS, format_dota_line, image_index, parse_dota_labels
from runtime.data.images import ImageError, encode_image, read_image_raw, write_bytes_atomic
from runtime.data.problems import (
    DEGENERATE_BOX,
    IN_NO_PATCH,
    MISSING_IMAGE,
    OUT_OF_IMAGE_BOX,
    UNKNOWN_CLASS,
    ProblemReport,
)
from runtime.errors import UserError


@dataclass
class SplitResult:
    """What split_dota wrote, and what it could not place."""

    dst: Path
    images: int = 0
    patches: int = 0
    objects_in: int = 0
    objects_written: int = 0  # object-in-patch entries (an object may appear in several patches)
    fragments_dropped: int = 0  # object parts under keep_thresh in some patch
    objects_in_no_patch: int = 0  # objects kept by no patch at all (each of their parts under keep_thresh)
    report: ProblemReport = field(default_factory=ProblemReport)


def patch_starts(length: int, patch: int, overlap: int) -> list[int]:
    """Window offsets along one axis: every patch - overlap px, the last one flush with the end."""
    if not 0 <= overlap < patch:
        raise UserError(f"overlap {overlap} must be >= 0 and smaller than the patch size {patch}")
    starts, pos = [], 0
    while pos + patch < length:
        starts.append(pos)
        pos += patch - overlap
    starts.append(max(length - patch, 0))
    return sorted(set(starts))


def patch_windows(width: int, height: int, patch: int = 1024, overlap: int = 200) -> list[tuple[int, int, int, int]]:
    """All patch windows (x0, y0, x1, y1) of an image, left-to-right columns then top-to-bottom (devkit order)."""
    return [(x, y, min(x + patch, width), min(y + patch, height))
            for x in patch_starts(width, patch, overlap) for y in patch_starts(height, patch, overlap)]


def quad_in_window(poly: np.ndarray, window: tuple[int, int, int, int]) -> tuple[np.ndarray, float]:
    """(4-point polygon clipped to the window, shifted to patch coordinates; fraction of the area inside)."""
    x0, y0, x1, y1 = window
    pts = np.asarray(poly, np.float64).reshape(-1, 2)
    lo, hi = pts.min(0), pts.max(0)
    if lo[0] >= x0 and lo[1] >= y0 and hi[0] <= x1 and hi[1] <= y1:
        return pts - (x0, y0), 1.0
    frac = polygon_inside_fraction(pts, x0, y0, x1, y1)
    if frac <= 0:
        return np.zeros((0, 2)), 0.0
    clipped = clip_polygon(pts, x0, y0, x1, y1)
    keep = np.r_[True, np.abs(np.diff(clipped, axis=0)).max(1) > 1e-6]  # drop repeated vertices
    clipped = clipped[keep]
    if len(clipped) != 4:
        # A quadrilateral cut by the window edges has up to 8 corners; DOTA lines hold 4, so take the
        # minimum-area rectangle around the clipped part, kept inside the window (the devkit drops such cases).
        clipped = cv2.boxPoints(cv2.minAreaRect(clipped.astype(np.float32))).astype(np.float64)
        clipped[:, 0] = np.clip(clipped[:, 0], x0, x1)
        clipped[:, 1] = np.clip(clipped[:, 1], y0, y1)
    return clipped - (x0, y0), frac


def split_dota(
    src_root: Path | str,
    dst_root: Path | str,
    patch: int = 1024,
    overlap: int = 200,
    keep_thresh: float = 0.7,
    split: str | None = None,
    classes: str | Sequence[str] | None = None,
    below_thresh: str = "drop",
    strict: bool = False,
    progress: bool = False,
) -> SplitResult:
    """Split every image of a DOTA root (or of one split) into patches written to dst_root in DOTA format.

    With split=None, a root holding train/ val/ ... is split per subfolder into dst_root/<split>/.
    """
    src, dst = Path(src_root), Path(dst_root)
    if not src.is_dir():
        from runtime.data.loader import missing_root_error

        raise missing_root_error(src)
    if below_thresh not in ("drop", "difficult"):
        raise UserError(f"below_thresh must be 'drop' or 'difficult', got {below_thresh!r}")
    if not 0 < keep_thresh <= 1:
        raise UserError(f"keep_thresh must be in (0, 1], got {keep_thresh}")
    if split is None:
        subs = sorted(p.name for p in src.iterdir() if (p / "labelTxt").is_dir())
        splits = [""] if (src / "labelTxt").is_dir() else subs
        if not splits:
            raise UserError("no labelTxt/ folder found", where=str(src),
                            fix="point at a DOTA root (images/ + labelTxt/)")
    else:
        splits = [split]
    index = class_index(class_list(classes)) if classes is not None else None
    result = SplitResult(dst=dst, report=ProblemReport(strict=strict))
    for name in splits:
        base_in = src if name in ROOT_SPLITS else src / name
        base_out = dst if name in ROOT_SPLITS else dst / name
        if not (base_in / "labelTxt").is_dir():
            raise UserError(f"no DOTA split {name!r}", where=str(base_in / "labelTxt"))
        images = image_index(base_in / "images")
        labels = sorted((base_in / "labelTxt").glob("*.txt"))
        iterator = labels
        if progress:
            from rich.progress import track

            iterator = track(labels, description=f"splitting {name or src.name}")
        for label_path in iterator:
            _split_image(label_path, images.get(label_path.stem), base_in, base_out, patch, overlap, keep_thresh,
                         index, below_thresh, result)
    return result


def _split_image(label_path: Path, image_path: Path | None, base_in: Path, base_out: Path, patch: int, overlap: int,
                 keep_thresh: float, index: dict[str, int] | None, below_thresh: str, result: SplitResult) -> None:
    report = result.report
    if image_path is None:
        report.add(MISSING_IMAGE, f"image for {label_path.name} not found",
                   str(base_in / "images" / f"{label_path.stem}.png"))
        return
    try:
        image = read_image_raw(image_path)
    except ImageError as exc:
        report.add(exc.kind, exc.what, str(image_path))
        return
    height, width = image.shape[:2]
    labels = parse_dota_labels(label_path, report)
    usable = []
    for i, (poly, name, where) in enumerate(zip(labels.polygons, labels.names, labels.wheres)):
        if index is not None and name.lower() not in index:
            report.add(UNKNOWN_CLASS, f"class {name!r} is not in the class list", where)
        elif polygon_area(poly.reshape(-1, 2)) <= 0:
            report.add(DEGENERATE_BOX, "polygon has zero area", where)
        elif polygon_inside_fraction(poly.reshape(-1, 2), 0, 0, width, height) <= 0:
            report.add(OUT_OF_IMAGE_BOX, f"polygon lies outside the {width}x{height} image", where)
        else:
            usable.append(i)
    result.images += 1
    result.objects_in += len(usable)
    hbbs = poly_to_hbb(labels.polygons[usable]) if usable else np.zeros((0, 4))
    placed = np.zeros(len(usable), bool)
    header = "".join(f"{k}:{v}\n" for k, v in labels.header.items())
    for window in patch_windows(width, height, patch, overlap):
        x0, y0, x1, y1 = window
        lines = []
        near = np.nonzero((hbbs[:, 0] < x1) & (hbbs[:, 2] > x0) & (hbbs[:, 1] < y1) & (hbbs[:, 3] > y0))[0]
        for j in near:
            i = usable[j]
            quad, frac = quad_in_window(labels.polygons[i], window)
            if frac <= 0:
                continue
            if frac >= keep_thresh:
                placed[j] = True
                result.objects_written += 1
                lines.append(format_dota_line(quad.ravel(), labels.names[i], labels.difficult[i]))
            else:
                result.fragments_dropped += below_thresh == "drop"
                if below_thresh == "difficult":
                    lines.append(format_dota_line(quad.ravel(), labels.names[i], 2))
        stem = f"{label_path.stem}__{patch}__{x0}___{y0}"
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        write_bytes_atomic(base_out / "images" / f"{stem}{image_path.suffix}", encode_image(crop, image_path.suffix))
        text = header + "".join(f"{ln}\n" for ln in lines)
        write_bytes_atomic(base_out / "labelTxt" / f"{stem}.txt", text.encode())
        result.patches += 1
    lost = int((~placed).sum())
    result.objects_in_no_patch += lost
    report.note(IN_NO_PATCH, lost)
