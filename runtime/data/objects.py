"""Turn one image's raw annotated objects into an ImageRecord, applying the shared bad-object policy.

Every reader (DIOR, DOTA, COCO) ends here, so unknown classes, degenerate boxes and boxes outside the image
are treated the same everywhere (see runtime.data.problems for the policy).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.boxes import clip_boxes, valid_boxes
from runtime.data.classes import class_index
from runtime.data.problems import CLIPPED_BOX, DEGENERATE_BOX, OUT_OF_IMAGE_BOX, UNKNOWN_CLASS, ProblemReport
from runtime.records import ImageRecord


@dataclass
class RawObjects:
    """Objects of one image as read from its annotation file, before validation."""

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    difficult: list[bool] = field(default_factory=list)
    wheres: list[str] = field(default_factory=list)

    def add(self, box: Sequence[float], name: str, difficult: bool, where: str) -> None:
        """Append one object (xyxy box in pixels) with the file:line it came from."""
        self.boxes.append(tuple(float(v) for v in box))  # type: ignore[arg-type]
        self.names.append(name)
        self.difficult.append(bool(difficult))
        self.wheres.append(where)


def build_record(
    path: Path, width: int, height: int, raw: RawObjects, classes: Sequence[str], report: ProblemReport
) -> ImageRecord:
    """Validate raw objects against the class list and the image bounds; clip, skip and count as needed."""
    index = class_index(classes)
    boxes = np.asarray(raw.boxes, dtype=np.float64).reshape(-1, 4)
    ok_size = valid_boxes(boxes)
    clipped = clip_boxes(boxes, width, height)
    ok_inside = valid_boxes(clipped)
    keep: list[int] = []
    labels: list[int] = []
    for i, name in enumerate(raw.names):
        label = index.get(name.lower())
        if label is None:
            report.add(UNKNOWN_CLASS, f"class {name!r} is not in the class list ({_short(classes)})", raw.wheres[i],
                       fix="set the dataset's classes to include it, or remove the object")
        elif not ok_size[i]:
            report.add(DEGENERATE_BOX, f"box {_fmt(boxes[i])} has zero or negative width/height", raw.wheres[i])
        elif not ok_inside[i]:
            report.add(OUT_OF_IMAGE_BOX, f"box {_fmt(boxes[i])} lies outside the {width}x{height} image",
                       raw.wheres[i])
        else:
            keep.append(i)
            labels.append(label)
    kept = np.asarray(keep, dtype=np.int64)
    report.note(CLIPPED_BOX, int((clipped[kept] != boxes[kept]).any(axis=1).sum()) if len(kept) else 0)
    return ImageRecord(
        path=Path(path),
        width=int(width),
        height=int(height),
        boxes=clipped[kept].astype(np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(raw.difficult, dtype=bool)[kept] if len(kept) else np.zeros((0,), bool),
    )


def _fmt(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def _short(classes: Sequence[str], n: int = 6) -> str:
    return ", ".join(classes[:n]) + (f", ... {len(classes)} in all" if len(classes) > n else "")
