"""Object sizes against anchors: how well a detector's anchors cover a dataset, and anchor sizes that cover it better.

What the assigner sees is reported, not a shape-only proxy: every object (scaled to the network input, as the
stretch resize does) is compared by IoU with the real anchors on the feature grids, so the grid offset of a 10 px
object on a stride-8 level counts. Per object: its best anchor IoU and how many anchors reach the foreground
threshold. An object with no anchor at or above `fg_iou` is only kept by the low-quality match (its single best
anchor), which is what makes tiny objects hard to learn. The suggestion searches the anchor base scale (size =
base x stride x 2^(i/n), the form of the reference's octave_base_scale) for the most objects with a real positive,
as Ultralytics' autoanchor (best possible recall) and MMDetection's anchor optimiser report it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from runtime.anchors import AnchorSpec, generate_anchors
from runtime.nms import box_iou
from runtime.records import DetectionSet

QUANTILES = (5, 25, 50, 75, 95)
OBJECT_CHUNK = 64  # objects compared with all anchors at once: 64 x 120k anchors (800 px) stays ~60 MB
BASE_SCALES = tuple(round(2 ** (k / 3), 3) for k in range(0, 10))  # 1 .. 8 in thirds of an octave


@dataclass
class ClassSizes:
    """Object size (sqrt of area, network-input pixels) and aspect ratio (h / w) quantiles of one class."""

    objects: int
    size_quantiles: dict[str, float]
    aspect_quantiles: dict[str, float]


@dataclass
class Coverage:
    """How one anchor set covers the objects: what the IoU assigner gives each object."""

    sizes: list[list[float]]
    aspect_ratios: list[float]
    objects: int
    with_positive: float  # share of objects with >= 1 anchor at IoU >= fg_iou
    low_quality_only: float  # share kept only by the best-anchor (low-quality) match
    mean_positives: float  # anchors at IoU >= fg_iou per object
    mean_best_iou: float
    best_level: dict[str, float] = field(default_factory=dict)  # share of objects whose best anchor is on each level


@dataclass
class AnchorReport:
    """Sizes per class, the coverage of the detector's anchors and of the suggested ones (``stats --json``)."""

    input_size: int | None
    fg_iou: float
    images_sampled: int
    classes: dict[str, ClassSizes]
    current: Coverage | None = None
    suggested: Coverage | None = None
    suggested_base_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


def scaled_boxes(dataset: DetectionSet, input_size: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes, labels) per image in network-input pixels: stretched to input_size x input_size, or as they are."""
    out = []
    for rec in dataset.records:
        boxes = np.asarray(rec.boxes, np.float64).reshape(-1, 4)
        if input_size:
            boxes = boxes * np.array([input_size / rec.width, input_size / rec.height] * 2)
        out.append((boxes, np.asarray(rec.labels, np.int64)))
    return out


def class_sizes(dataset: DetectionSet, input_size: int | None) -> dict[str, ClassSizes]:
    """Size and aspect-ratio quantiles per class (classes without objects are listed with 0 objects)."""
    per_image = scaled_boxes(dataset, input_size)
    boxes = np.concatenate([b for b, _ in per_image]) if per_image else np.zeros((0, 4))
    labels = np.concatenate([lab for _, lab in per_image]) if per_image else np.zeros((0,), np.int64)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ok = (w > 0) & (h > 0)
    out = {}
    for index, name in enumerate(dataset.classes):
        mine = ok & (labels == index)
        size, aspect = np.sqrt(w[mine] * h[mine]), h[mine] / w[mine]
        out[name] = ClassSizes(int(mine.sum()), _quantiles(size), _quantiles(aspect))
    return out


def _quantiles(values: Any) -> dict[str, float]:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {}
    return {f"p{q}": round(float(v), 2) for q, v in zip(QUANTILES, np.percentile(values, QUANTILES))}


def coverage(per_image: list[tuple[np.ndarray, np.ndarray]], spec: AnchorSpec, input_hw: tuple[int, int],
             fg_iou: float) -> Coverage:
    """What an IoU assigner with foreground threshold `fg_iou` gives each object of the images, for `spec`."""
    anchors, per_level = generate_anchors(spec, input_hw)
    level_of = np.repeat(np.arange(len(per_level)), per_level)
    best, positives, levels = [], [], []
    for boxes, _ in per_image:
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not keep.any():
            continue
        for chunk in np.array_split(boxes[keep], max(1, int(keep.sum()) // OBJECT_CHUNK)):
            iou = box_iou(chunk, anchors)  # (objects, anchors), a bounded number of objects at a time
            arg = iou.argmax(axis=1)
            best.append(iou[np.arange(len(arg)), arg])
            positives.append((iou >= fg_iou).sum(axis=1))
            levels.append(level_of[arg])
    sizes = [list(map(float, level)) for level in spec.sizes]
    if not best:
        return Coverage(sizes, list(spec.aspect_ratios), 0, 0.0, 0.0, 0.0, 0.0)
    best_iou, pos, lev = np.concatenate(best), np.concatenate(positives), np.concatenate(levels)
    names = [f"P{int(np.log2(s))}" for s in spec.strides]
    return Coverage(sizes, list(spec.aspect_ratios), len(best_iou), round(float((pos > 0).mean()), 4),
                    round(float((pos == 0).mean()), 4), round(float(pos.mean()), 3), round(float(best_iou.mean()), 4),
                    {n: round(float((lev == i).mean()), 4) for i, n in enumerate(names)})


def suggest(per_image: list[tuple[np.ndarray, np.ndarray]], spec: AnchorSpec, input_hw: tuple[int, int],
            fg_iou: float) -> tuple[float, Coverage]:
    """The base scale (sizes = base x stride x 2^(i/n), n = sizes per level, the spec's ratios) giving the most
    objects a real positive anchor (ties: more positives per object), and its coverage."""
    n = len(spec.sizes[0])
    best: tuple[tuple[float, float], float, Coverage] | None = None
    for base in BASE_SCALES:
        sizes = tuple(tuple(round(base * s * 2 ** (i / n), 2) for i in range(n)) for s in spec.strides)
        candidate = spec.model_copy(update={"sizes": sizes})
        cov = coverage(per_image, candidate, input_hw, fg_iou)
        key = (cov.with_positive, cov.mean_positives)
        if best is None or key > best[0]:
            best = (key, base, cov)
    assert best is not None
    return best[1], best[2]


def anchor_report(dataset: DetectionSet, input_size: int | None, spec: AnchorSpec | None, fg_iou: float = 0.5,
                  max_images: int = 200, seed: int = 0) -> AnchorReport:
    """Size quantiles per class over the whole split; anchor coverage and suggestion on up to `max_images` images,
    stretched to the network input `input_size` (without one — raw scenes of any size — only the sizes)."""
    report = AnchorReport(input_size, fg_iou, 0, class_sizes(dataset, input_size))
    if spec is None or not input_size or not dataset.records:
        return report
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(dataset.records), min(max_images, len(dataset.records)), replace=False))
    sample = DetectionSet(dataset.name, dataset.classes, [dataset.records[i] for i in picked])
    per_image = scaled_boxes(sample, input_size)
    input_hw = (input_size, input_size)
    report.images_sampled = len(sample.records)
    report.current = coverage(per_image, spec, input_hw, fg_iou)
    report.suggested_base_scale, report.suggested = suggest(per_image, spec, input_hw, fg_iou)
    return report
