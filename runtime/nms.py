"""Class-wise non-maximum suppression equal to torchvision's, through a library kernel.

Two kernels, checked against ``torchvision.ops.nms`` / ``batched_nms`` in tests/test_postprocess.py:

- **onnxruntime** (used whenever onnxruntime and onnx are installed, i.e. every CPU or GPU install of the runtime):
  the ONNX ``NonMaxSuppression`` operator in a one-node session. Its IoU is torchvision's to the bit: float32,
  inter / (area_kept + area_other - inter), suppression when strictly greater than the threshold, no +1. Boxes go in
  as given (the operator's [y1, x1, y2, x2] order only swaps the roles of x and y, which leaves every product and
  sum the same), each candidate scores its rank in its own class row and 0 elsewhere (the operator runs per class).
- **opencv** (a TensorRT-only Jetson install without onnxruntime): ``cv2.dnn.NMSBoxesBatched``, IoU in double (it
  can differ from torchvision's only for an IoU within float32 rounding, ~1e-7, of the threshold); all classes in
  one pass, separated by shifting their boxes apart.

What both need from here:

- scores are passed as ranks (n, n-1, ..., 1) of a stable descending sort, so the visiting order is exactly
  torchvision's whatever the scores are (ties in index order, zeros, negatives);
- a box without a positive width and height never suppresses nor is suppressed in torchvision (0/0 = NaN), while
  the kernels count two empty boxes as identical or reorder flipped corners: such boxes bypass the kernel and are
  always kept.

With ``max_keep`` the work is bounded by running NMS on growing score-ordered prefixes: whether a box survives
depends only on higher-scoring boxes, so the result on a prefix is exact for that prefix, and the first prefix that
yields ``max_keep`` survivors gives the answer. The prefixes are processed incrementally: a suppressed box never
suppresses anything (greedy NMS only lets kept boxes suppress), so the survivors of one prefix followed by the next
candidates give exactly the survivors of the longer prefix. The prefix grows to what the survival rate seen so far
says is needed (at least 2x a round). A class cannot place more than ``max_keep`` boxes among the best
``max_keep``, so the onnxruntime kernel also stops each class there. Boxes are asked for one prefix segment at a
time (:func:`batched_nms_lazy`), so a detector decodes only the candidates NMS reaches.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import cv2
import numpy as np

_FIRST_PREFIX = 256  # candidates in the first NMS call when only the best max_keep are wanted (at least 2 max_keep)
_GROWTH_MARGIN = 1.25  # next prefix = candidates the survival rate so far needs for max_keep, with this margin

# (boxes float32 (M, 4) with positive sizes, ranks float32 (M,) unique and > 0, class ids int64 (M,) in [0, C) or
# None, IoU threshold, max survivors per class or None) -> indices kept, in any order
Kernel = Callable[[np.ndarray, np.ndarray, "np.ndarray | None", float, "int | None"], np.ndarray]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (N, M) of xyxy boxes a (N, 4) and b (M, 4); 0 where both boxes are empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0).astype(np.result_type(a, b), copy=False)


_NAN_KEY = -2139095042  # below the key of -inf (its float32 bits 0xFF800000 ^ 0x7FFFFFFF)


def _order(scores: np.ndarray) -> np.ndarray:
    """Stable descending order of ``scores``, as ``np.argsort(-scores, kind="stable")``.

    numpy's stable sort of float32 is ~3x slower than its default sort of int64, so the order comes from unique int64
    keys (score key << 32 | index): float32 bits made monotonic in the value (-0.0 counted as 0.0, NaN last), ties in
    index order."""
    scores = np.asarray(scores, np.float32) + np.float32(0)  # -0.0 -> 0.0: numpy's sort counts them equal
    bits = scores.view(np.int32).astype(np.int64)
    key = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key[np.isnan(scores)] = _NAN_KEY
    return np.argsort((-key << 32) | np.arange(len(scores)))


@lru_cache(maxsize=1)
def _ort_session():
    """A one-node ONNX Runtime session running NonMaxSuppression (opset 11) on one thread, without spinning."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, "n", 4]),
              helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, "c", "n"]),
              helper.make_tensor_value_info("max_per_class", TensorProto.INT64, [1]),
              helper.make_tensor_value_info("iou_threshold", TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info("score_threshold", TensorProto.FLOAT, [1])]
    node = helper.make_node("NonMaxSuppression", [i.name for i in inputs], ["selected"])
    graph = helper.make_graph([node], "host_nms", inputs,
                              [helper.make_tensor_value_info("selected", TensorProto.INT64, ["k", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


_NO_SCORE = np.zeros(1, np.float32)  # ranks are >= 1: the operator's strict `score > 0` drops only other classes


def _onnxruntime(boxes: np.ndarray, ranks: np.ndarray, classes: np.ndarray | None, iou_threshold: float,
                 max_per_class: int | None) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    rows = 1 if classes is None else int(classes.max()) + 1
    scores = np.zeros((1, rows, len(boxes)), np.float32)
    at = np.arange(len(boxes)) if classes is None else classes * len(boxes) + np.arange(len(boxes))
    scores.reshape(-1)[at] = ranks  # a flat index: numpy's 1-D fancy assignment is several times faster
    feed = {"boxes": np.ascontiguousarray(boxes, np.float32)[None], "scores": scores,
            "max_per_class": np.array([max_per_class or len(boxes)], np.int64),
            "iou_threshold": np.array([iou_threshold], np.float32), "score_threshold": _NO_SCORE}
    return _ort_session().run(None, feed)[0][:, 2]


def _opencv(boxes: np.ndarray, ranks: np.ndarray, classes: np.ndarray | None, iou_threshold: float,
            max_per_class: int | None) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    xywh = np.empty((len(boxes), 4), np.float64)
    xywh[:, :2] = boxes[:, :2]
    xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    # A list converts several times faster than an array in OpenCV's binding (~0.3 us per box).
    if classes is None:
        keep = cv2.dnn.NMSBoxes(xywh.tolist(), ranks, 0.0, float(iou_threshold))
    else:
        keep = cv2.dnn.NMSBoxesBatched(xywh.tolist(), ranks, classes.astype(np.int32), 0.0, float(iou_threshold))
    return np.asarray(keep, np.int64).reshape(-1)


KERNELS: dict[str, Kernel] = {"onnxruntime": _onnxruntime, "opencv": _opencv}


@lru_cache(maxsize=1)
def default_kernel() -> str:
    """'onnxruntime' where onnxruntime and onnx import, else 'opencv'."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return "opencv"
    return "onnxruntime"


def _class_ids(labels: np.ndarray) -> np.ndarray:
    """Labels as class rows 0..C-1 (any integers: remapped when negative or sparse)."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if len(labels) and (labels.min() < 0 or labels.max() >= 4 * len(labels) + 64):
        labels = np.unique(labels, return_inverse=True)[1].reshape(-1)
    return labels


def _suppress(boxes_of: Callable[[np.ndarray], np.ndarray], scores: np.ndarray, labels: np.ndarray | None,
              iou_threshold: float, max_keep: int | None, kernel: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices kept, best first, and their boxes."""
    scores = np.asarray(scores, np.float32).reshape(-1)
    if labels is not None and len(labels) != len(scores):
        raise ValueError(f"{len(scores)} scores and {len(labels)} labels: one of each per candidate")
    run = KERNELS[kernel or default_kernel()]
    iou_threshold = float(iou_threshold)
    order = _order(scores)
    n = len(order)
    # Everything below is in visiting positions (0 = best): candidate order[p] has rank n - p, and boxes are stored
    # as they arrive, one contiguous segment per round.
    classes = None if labels is None else _class_ids(labels)[order]
    limit = n if max_keep is None else min(max_keep, n)
    prefix = n if max_keep is None else min(n, max(_FIRST_PREFIX, 2 * max_keep))
    boxes = np.empty((n, 4), np.float32)
    kept, empty, empty_count, done = np.zeros(0, np.int64), [], 0, 0
    while True:
        # the next candidates in score order: only their boxes are asked for
        fresh = boxes[done:prefix] = np.asarray(boxes_of(order[done:prefix]), np.float32).reshape(-1, 4)
        with np.errstate(invalid="ignore"):  # NaN coordinates count as empty
            proper = (fresh[:, 2] > fresh[:, 0]) & (fresh[:, 3] > fresh[:, 1])
        empty.append(done + np.flatnonzero(~proper))  # never suppress nor are suppressed: always kept, no kernel
        empty_count += len(empty[-1])
        # survivors so far + the next candidates: exactly the survivors of the longer prefix
        chosen = np.concatenate([kept, done + np.flatnonzero(proper)])
        kept = chosen[run(np.take(boxes, chosen, axis=0), (n - chosen).astype(np.float32),
                          None if classes is None else classes[chosen], iou_threshold, max_keep)]
        done = prefix
        found = len(kept) + empty_count  # >= 1: the best candidate always survives
        if found >= limit or prefix >= n:
            break
        needed = math.ceil(prefix * limit / found * _GROWTH_MARGIN)
        prefix = min(n, max(2 * prefix, needed))
    kept = np.sort(np.concatenate([kept, *empty]))[:max_keep]  # positions: ascending is best first
    return order[kept], np.take(boxes, kept, axis=0)


def _boxes(boxes: np.ndarray, count: int) -> Callable[[np.ndarray], np.ndarray]:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(boxes) != count:
        raise ValueError(f"{len(boxes)} boxes and {count} scores: one of each per candidate")
    return boxes.__getitem__


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, kernel: str | None = None) -> np.ndarray:
    """Indices of the xyxy boxes kept by NMS, in decreasing score order (like ``torchvision.ops.nms``)."""
    return _suppress(_boxes(boxes, np.size(scores)), scores, None, iou_threshold, None, kernel)[0]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float,
                max_keep: int | None = None, kernel: str | None = None) -> np.ndarray:
    """Class-wise NMS (boxes only suppress boxes of their own label), in decreasing score order.

    Equal to ``torchvision.ops.batched_nms``; ``max_keep`` returns only the best that many (and does less work);
    ``kernel`` ('onnxruntime' or 'opencv') overrides :func:`default_kernel`.
    """
    return batched_nms_lazy(_boxes(boxes, np.size(scores)), scores, labels, iou_threshold, max_keep, kernel)[0]


def batched_nms_lazy(boxes_of: Callable[[np.ndarray], np.ndarray], scores: np.ndarray, labels: np.ndarray,
                     iou_threshold: float, max_keep: int | None = None,
                     kernel: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`batched_nms` where ``boxes_of(indices)`` gives the xyxy boxes (k, 4) of those candidates: with
    ``max_keep`` only the score-ordered prefixes NMS reaches are asked for (a detector decodes only those).
    Returns the kept indices, best first, and their boxes."""
    return _suppress(boxes_of, scores, np.asarray(labels).reshape(-1), iou_threshold, max_keep, kernel)
