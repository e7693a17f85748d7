"""Greedy non-maximum suppression in numpy, matching ``torchvision.ops.nms`` / ``batched_nms`` on the CPU.

Same arithmetic as torchvision's CPU kernel: float32 areas and intersections, a box is suppressed when its IoU with
a kept, higher-scoring box is strictly greater than the threshold, and the result is sorted by decreasing score.
"""
from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (N, M) of xyxy boxes a (N, 4) and b (M, 4); 0 where both boxes are empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0).astype(np.result_type(a, b), copy=False)


def _greedy(boxes: np.ndarray, order: np.ndarray, iou_threshold: float, labels: np.ndarray | None = None,
            max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS over ``order`` (descending score); with ``labels`` a box only suppresses boxes of its label."""
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    limit = len(order) if max_keep is None else max_keep
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 for degenerate boxes: NaN, never suppresses
        while order.size and len(keep) < limit:
            i = order[0]
            keep.append(i)
            rest = order[1:]
            w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
            h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
            inter = w * h
            # torchvision compares the float32 IoU with the threshold as a double.
            suppressed = (inter / (areas[i] + areas[rest] - inter)).astype(np.float64) > iou_threshold
            if labels is not None:
                suppressed &= labels[rest] == labels[i]
            order = rest[~suppressed]
    return np.asarray(keep, np.int64)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept by NMS, in decreasing score order (like ``torchvision.ops.nms``)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
    return _greedy(boxes, order, iou_threshold)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float,
                max_keep: int | None = None) -> np.ndarray:
    """Class-wise NMS (boxes only suppress boxes of their own label), in decreasing score order.

    The result is that of NMS run per class, torchvision's own path for large inputs (its small-input path, boxes
    shifted by per-class offsets, agrees up to float32 rounding of the shifted coordinates). ``max_keep`` returns
    only the best that many, and stops early: whether a box survives depends only on higher-scoring boxes.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32)
    labels = np.asarray(labels)
    if max_keep is not None:
        # One pass in global score order, classes kept apart by the label mask, done after max_keep survivors.
        return _greedy(boxes, np.argsort(-scores, kind="stable"), iou_threshold, labels, max_keep)
    kept = [np.zeros(0, np.int64)]
    for label in np.unique(labels):  # per class: each pass only compares boxes of one class
        idx = np.nonzero(labels == label)[0]
        kept.append(idx[_greedy(boxes[idx], np.argsort(-scores[idx], kind="stable"), iou_threshold)])
    keep = np.concatenate(kept)
    return keep[np.argsort(-scores[keep], kind="stable")]
