"""Class-wise non-maximum suppression through OpenCV's ``cv2.dnn.NMSBoxesBatched``, equal to torchvision's.

OpenCV's conventions, checked against ``torchvision.ops.batched_nms`` in tests/test_postprocess.py: boxes go in as
(x, y, w, h) Rect2d (float64, no +1 on the width or height), IoU = inter / (area_a + area_b - inter), a box is
suppressed when its IoU with a kept box is strictly greater than the threshold, candidates are visited in
descending score order, ties in index order (a stable sort, as torchvision's CPU kernel). Three differences are
handled here:

- scores are passed as ranks (n, n-1, ..., 1) of a stable descending sort, so OpenCV's visiting order is exactly
  torchvision's whatever the scores are (ties, zeros, negatives; OpenCV only takes scores above a threshold >= 0);
- OpenCV counts two zero-area boxes as identical (IoU 1) where torchvision gets 0/0 = NaN and keeps both: a box
  without a positive width and height never suppresses nor is suppressed in torchvision, so such boxes bypass
  OpenCV and are always kept;
- OpenCV computes the IoU in double, torchvision in float32: results can differ only for an IoU within float32
  rounding (~1e-7) of the threshold.

NMSFast compares each candidate with every box kept so far, all classes together (it separates classes by shifting
their boxes apart). With ``max_keep`` the work is bounded by running NMS on growing score-ordered prefixes: whether
a box survives depends only on higher-scoring boxes, so the result on a prefix is exact for that prefix, and the
first prefix that yields ``max_keep`` survivors gives the answer.
"""
from __future__ import annotations

import cv2
import numpy as np

_FIRST_PREFIX = 256  # candidates in the first NMS call when only the best max_keep are wanted (grows 4x)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (N, M) of xyxy boxes a (N, 4) and b (M, 4); 0 where both boxes are empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0).astype(np.result_type(a, b), copy=False)


def _ranks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable descending order of ``scores`` and float32 ranks (n for the best ... 1 for the worst) in input order."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), np.float32)  # exact integers up to 2**24 candidates
    ranks[order] = np.arange(len(scores), 0, -1, dtype=np.float32)
    return order, ranks


def _opencv(boxes: np.ndarray, ranks: np.ndarray, labels: np.ndarray | None, iou_threshold: float) -> np.ndarray:
    """Indices kept by OpenCV's NMS (boxes with positive width and height only), best first."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    xywh = np.empty((len(boxes), 4), np.float64)
    xywh[:, :2] = boxes[:, :2]
    xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    if labels is None:
        keep = cv2.dnn.NMSBoxes(xywh, ranks, 0.0, float(iou_threshold))
    else:
        keep = cv2.dnn.NMSBoxesBatched(xywh, ranks, labels.astype(np.int32, copy=False), 0.0, float(iou_threshold))
    keep = np.asarray(keep, np.int64).reshape(-1)
    return keep[np.argsort(-ranks[keep], kind="stable")]


def _suppress(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray | None, iou_threshold: float,
              max_keep: int | None) -> np.ndarray:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if len(boxes) != len(scores) or (labels is not None and len(labels) != len(scores)):
        raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores and {len(labels) if labels is not None else '-'} "
                         "labels: one of each per candidate")
    order, ranks = _ranks(scores)
    with np.errstate(invalid="ignore"):  # NaN coordinates count as degenerate
        proper = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    degenerate = np.flatnonzero(~proper)
    valid = order[proper[order]]  # boxes OpenCV handles, best first
    limit = len(valid) if max_keep is None else min(max_keep, len(valid))
    prefix = len(valid) if max_keep is None else min(len(valid), max(_FIRST_PREFIX, 4 * max_keep))
    while True:
        chosen = valid[:prefix]
        kept = chosen[_opencv(boxes[chosen], ranks[chosen], None if labels is None else labels[chosen],
                              iou_threshold)]
        if len(kept) >= limit or prefix >= len(valid):
            break
        prefix = min(len(valid), 4 * prefix)
    keep = np.concatenate([kept, degenerate])
    keep = keep[np.argsort(-ranks[keep], kind="stable")]
    return keep if max_keep is None else keep[:max_keep]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the xyxy boxes kept by NMS, in decreasing score order (like ``torchvision.ops.nms``)."""
    return _suppress(boxes, scores, None, iou_threshold, None)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float,
                max_keep: int | None = None) -> np.ndarray:
    """Class-wise NMS (boxes only suppress boxes of their own label), in decreasing score order.

    Equal to ``torchvision.ops.batched_nms``; ``max_keep`` returns only the best that many (and does less work).
    """
    return _suppress(boxes, scores, np.asarray(labels).reshape(-1), iou_threshold, max_keep)
