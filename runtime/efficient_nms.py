"""A numpy reference of TensorRT's ``EfficientNMS_TRT`` plugin (version 1), for where the plugin cannot run.

TensorRT bundles built with ``--nms efficient-nms-trt`` end in the plugin; ONNX Runtime cannot execute it. The
accuracy gate (and ONNX Runtime on a device whose engine does not load) therefore runs the graph up to the
plugin's inputs and applies this reference. It is a reference, not the plugin: its semantics follow TensorRT's
plugin/efficientNMSPlugin sources (README, efficientNMSInference.cu), float32 path, standard (non-ONNX-indices)
outputs, no fused box decoder:

1. score filter on the raw scores: with ``score_activation`` the threshold moves to logit space,
   ``logit(t) = log(t / (1 - t))``, and a score passes when ``score >= logit(t)`` (inclusive, unlike torchvision's
   ``>``); the background class, if any, is dropped. Below a threshold of 0.007 the plugin switches to a dense
   kernel that keeps every element with below-threshold scores set to -32768 (they sort last but still reach NMS);
2. all passing (box, class) pairs of an image are sorted by descending score (a radix sort: stable; the reference
   breaks ties by element index, anchor-major then class, which is the dense kernel's order; the filter kernel
   collects candidates with atomics, so its tie order is not deterministic);
3. only the best 4096 (``numSelectedBoxes``) reach NMS: a global top-k per image, where torchvision takes the best
   1000 per FPN level before NMS;
4. greedy NMS in that order: a box is dropped when a kept box of the same class (``class_agnostic`` off) overlaps
   it with IoU >= ``iou_threshold`` (inclusive); IoU is computed in float32 on corners put in min/max order, and
   is 0 when the intersection or the union is not positive; it stops once ``max_output_boxes`` boxes are kept;
5. outputs: ``num_detections`` [B, 1] int32, ``detection_boxes`` [B, max_output_boxes, 4] (the input boxes, not
   clipped), ``detection_scores`` [B, max] (sigmoid applied to the kept logits when ``score_activation``),
   ``detection_classes`` [B, max] int32; slots past ``num_detections`` are zeros.

The plugin itself is never executed on this machine (there is no TensorRT here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PLUGIN_OP = "EfficientNMS_TRT"
PLUGIN_VERSION = "1"
# TensorRT's ONNX parser finds plugins by op type whatever the domain; a custom domain keeps onnx's checker happy.
PLUGIN_DOMAIN = "TRT"
SELECTED_BOXES = 4096  # EfficientNMSParameters::numSelectedBoxes
DENSE_THRESHOLD = 0.007  # below this score threshold the plugin uses its dense kernel
DENSE_SCORE = -32768.0  # what the dense kernel writes over below-threshold scores
# The plugin's inputs as deploy/ names them in the graph, and its outputs (TensorRT's names and order).
PLUGIN_INPUTS = ("decoded_boxes", "cls_logits")
PLUGIN_OUTPUTS = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")


@dataclass(frozen=True)
class EfficientNmsAttributes:
    """The plugin's ONNX node attributes (EfficientNMSPluginCreator's fields)."""

    score_threshold: float
    iou_threshold: float
    max_output_boxes: int
    background_class: int = -1
    score_activation: bool = True
    box_coding: int = 0  # 0 = corners (x1, y1, x2, y2): boxes are decoded in the graph before the plugin

    def as_onnx(self) -> dict[str, object]:
        """Attribute dict for onnx.helper.make_node (plugin_version tells the parser which creator to use)."""
        return {"score_threshold": float(self.score_threshold), "iou_threshold": float(self.iou_threshold),
                "max_output_boxes": int(self.max_output_boxes), "background_class": int(self.background_class),
                "score_activation": int(self.score_activation), "box_coding": int(self.box_coding),
                "plugin_version": PLUGIN_VERSION}


def _threshold(attrs: EfficientNmsAttributes) -> tuple[np.float32, bool]:
    """The threshold the filter compares raw scores with, and whether the dense kernel is used."""
    t = attrs.score_threshold
    if not attrs.score_activation:
        return np.float32(t), t < DENSE_THRESHOLD
    logit = np.float32(DENSE_SCORE) if t <= 0 else np.float32(math.log(t / (1 - t)))
    return logit, bool(logit < np.float32(math.log(DENSE_THRESHOLD / (1 - DENSE_THRESHOLD))))


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The plugin's float32 IoU of one corner box with many (corners reordered, 0 for empty overlaps)."""
    a = np.concatenate([np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])])
    b = np.concatenate([np.minimum(others[:, :2], others[:, 2:]), np.maximum(others[:, :2], others[:, 2:])], axis=1)

    def area(x1, y1, x2, y2):
        w, h = x2 - x1, y2 - y1
        return np.where((w > 0) & (h > 0), w * h, np.float32(0))

    inter = area(np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1]), np.minimum(a[2], b[:, 2]),
                 np.minimum(a[3], b[:, 3]))
    union = area(*a) + area(b[:, 0], b[:, 1], b[:, 2], b[:, 3]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((inter > 0) & (union > 0), inter / union, np.float32(0))


def _one_image(boxes: np.ndarray, scores: np.ndarray, attrs: EfficientNmsAttributes
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kept element indices (into the flattened (anchor, class) scores), their raw scores and classes."""
    threshold, dense = _threshold(attrs)
    flat = scores.reshape(-1)
    num_classes = scores.shape[1]
    background = attrs.background_class
    if dense:
        cand = np.arange(flat.size)
        values = np.where(flat >= threshold, flat, np.float32(DENSE_SCORE)).astype(np.float32)
        if 0 <= background < num_classes:
            values[background::num_classes] = np.float32(DENSE_SCORE)
    else:
        cand = np.flatnonzero(flat >= threshold)
        if 0 <= background < num_classes:
            cand = cand[cand % num_classes != background]
        values = flat
    order = cand[np.argsort(-values[cand], kind="stable")][:SELECTED_BOXES]
    anchor, cls = np.divmod(order, num_classes)
    cand_boxes = boxes[anchor]
    kept: list[int] = []
    alive = np.ones(len(order), bool)
    for i in range(len(order)):
        if not alive[i]:
            continue
        if len(kept) >= attrs.max_output_boxes:
            break
        kept.append(i)
        rest = np.flatnonzero(alive[i + 1:]) + i + 1
        same = rest[cls[rest] == cls[i]]
        alive[same[_iou(cand_boxes[i], cand_boxes[same]) >= np.float32(attrs.iou_threshold)]] = False
    kept_idx = np.asarray(kept, np.int64)
    return order[kept_idx], values[order[kept_idx]], cls[kept_idx]


def efficient_nms(boxes: np.ndarray, scores: np.ndarray, attrs: EfficientNmsAttributes) -> dict[str, np.ndarray]:
    """The plugin's four outputs for boxes [B, N, 4] (corners) and scores [B, N, C], per the module docstring."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if boxes.ndim != 3 or boxes.shape[2] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"EfficientNMS needs boxes [B, N, 4] and scores [B, N, C], got {boxes.shape} / {scores.shape}")
    if attrs.box_coding != 0:
        raise ValueError("the reference implements box_coding 0 (corners) only: decode boxes before the plugin")
    batch, limit = boxes.shape[0], attrs.max_output_boxes
    out = {"num_detections": np.zeros((batch, 1), np.int32),
           "detection_boxes": np.zeros((batch, limit, 4), np.float32),
           "detection_scores": np.zeros((batch, limit), np.float32),
           "detection_classes": np.zeros((batch, limit), np.int32)}
    for b in range(batch):
        elements, raw, classes = _one_image(boxes[b], scores[b], attrs)
        n = len(elements)
        out["num_detections"][b, 0] = n
        out["detection_boxes"][b, :n] = boxes[b][elements // scores.shape[2]]
        with np.errstate(over="ignore"):
            out["detection_scores"][b, :n] = (np.float32(1) / (np.float32(1) + np.exp(-raw))
                                              if attrs.score_activation else raw)
        out["detection_classes"][b, :n] = classes
    return out
