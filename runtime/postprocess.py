"""Detector outputs -> boxes, scores, labels in numpy, reproducing torchvision's RetinaNet post-processing.

``RetinaNetPostprocess`` mirrors ``RetinaNet.postprocess_detections``: per FPN level, sigmoid scores above the
threshold, the top-k of them, box decoding (BoxCoder weights, dw/dh clamped at log(1000/16)) from the anchors of
:mod:`runtime.anchors`, clipping to the image; then class-wise NMS over all levels and the best ``max_detections``.
``DetectionsPostprocess`` handles networks whose graph already ends in boxes / scores / labels (Faster R-CNN).
``PaddedDetectionsPostprocess`` reads the fixed-size outputs of a graph that ends in NMS (ONNX NonMaxSuppression or
TensorRT's EfficientNMS_TRT: ``num_detections`` [B, 1] + [B, max] slots); ``EfficientNmsReference`` produces those
outputs on the host from the plugin's inputs where the plugin cannot run (runtime.efficient_nms).
Boxes come out in network-input pixels; ``Transform.boxes_to_original`` maps them back to the image.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.anchors import AnchorSpec, generate_anchors
from runtime.boxes import clip_boxes
from runtime.efficient_nms import PLUGIN_INPUTS, PLUGIN_OUTPUTS, EfficientNmsAttributes, efficient_nms
from runtime.errors import UserError
from runtime.nms import batched_nms_lazy

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class PostprocessSpec(BaseModel):
    """Post-processing of one exported network; stored in the deploy bundle's manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # retinanet: raw head outputs, NMS on the host; detections: variable-length boxes/scores/labels (Faster R-CNN);
    # padded: the graph ends in NMS with fixed [B, max_detections] outputs and a count per image.
    kind: Literal["retinanet", "detections", "padded"]
    num_classes: int = Field(gt=0)
    anchors: AnchorSpec | None = None
    score_thresh: float = Field(0.05, ge=0, lt=1)
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_detections: int = Field(100, gt=0)
    topk_candidates: int = Field(1000, gt=0)
    box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    # 'detections' graphs may number classes from 1 (torchvision Faster R-CNN keeps 0 for background).
    label_offset: int = 0

    @model_validator(mode="after")
    def _anchors_for_retinanet(self) -> "PostprocessSpec":
        if self.kind == "retinanet" and self.anchors is None:
            raise ValueError("kind 'retinanet' needs 'anchors'")
        return self


@dataclass
class Detections:
    """Detections of one image: boxes float32 (N, 4) xyxy px, scores float32 (N,), labels int64 (N,) 0-based."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco_results(self, image_id: int, category_offset: int = 1) -> list[dict[str, Any]]:
        """COCO results entries (bbox xywh); category_id = label + ``category_offset`` (our COCO dicts use +1)."""
        xywh = np.concatenate([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], axis=1).tolist()
        return [{"image_id": image_id, "category_id": int(label) + category_offset, "bbox": box, "score": float(score)}
                for box, score, label in zip(xywh, self.scores, self.labels)]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in the input's dtype, computed as torch does: 1 / (1 + exp(-x))."""
    with np.errstate(over="ignore"):  # exp overflow -> inf -> 0, the right limit
        return np.reciprocal(1 + np.exp(-x))


def anchor_geometry(anchors: np.ndarray) -> np.ndarray:
    """(A, 4) float32 centre x, centre y, width, height of xyxy anchors, computed as BoxCoder.decode_single does."""
    anchors = np.asarray(anchors, np.float32).reshape(-1, 4)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    ctr_x = anchors[:, 0] + np.float32(0.5) * widths
    ctr_y = anchors[:, 1] + np.float32(0.5) * heights
    return np.stack([ctr_x, ctr_y, widths, heights], axis=1)


def decode_boxes(rel_codes: np.ndarray, anchors: np.ndarray, weights: tuple[float, float, float, float]) -> np.ndarray:
    """Decode (dx, dy, dw, dh) against xyxy anchors in float32, like torchvision's BoxCoder.decode_single."""
    return _decode(rel_codes, anchor_geometry(anchors), weights)


def _decode(rel_codes: np.ndarray, geometry: np.ndarray, weights: tuple[float, float, float, float]) -> np.ndarray:
    """:func:`decode_boxes` from the anchors' :func:`anchor_geometry` (RetinaNetPostprocess keeps it per input size)."""
    rel_codes = np.asarray(rel_codes, np.float32).reshape(-1, 4)
    ctr_x, ctr_y, widths, heights = geometry[:, 0], geometry[:, 1], geometry[:, 2], geometry[:, 3]
    wx, wy, ww, wh = (np.float32(w) for w in weights)
    clip = np.float32(BBOX_XFORM_CLIP)
    pred_ctr_x = rel_codes[:, 0] / wx * widths + ctr_x
    pred_ctr_y = rel_codes[:, 1] / wy * heights + ctr_y
    half_w = np.float32(0.5) * (np.exp(np.minimum(rel_codes[:, 2] / ww, clip)) * widths)
    half_h = np.float32(0.5) * (np.exp(np.minimum(rel_codes[:, 3] / wh, clip)) * heights)
    boxes = np.empty((len(rel_codes), 4), np.float32)
    np.subtract(pred_ctr_x, half_w, out=boxes[:, 0])
    np.subtract(pred_ctr_y, half_h, out=boxes[:, 1])
    np.add(pred_ctr_x, half_w, out=boxes[:, 2])
    np.add(pred_ctr_y, half_h, out=boxes[:, 3])
    return boxes


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first (argpartition first: candidate counts can be large)."""
    if scores.size > 2 * k:
        part = np.argpartition(-scores, k - 1)[:k]
        return part[np.argsort(-scores[part], kind="stable")]
    return np.argsort(-scores, kind="stable")[:k]


def _select(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> Detections:
    return Detections(np.ascontiguousarray(boxes[keep], np.float32), scores[keep].astype(np.float32),
                      labels[keep].astype(np.int64))


class RetinaNetPostprocess:
    """RetinaNet head outputs (concatenated over P3-P7) -> Detections, as torchvision's postprocess_detections.

    Vectorised: one threshold pass over every level's logits and one ``np.argpartition`` per level that has more than
    ``topk_candidates`` candidates, both in logit space (the sigmoid is monotonic: only the top-k pay for it), then
    class-wise NMS by a library kernel (runtime.nms: ONNX Runtime's NonMaxSuppression, else OpenCV) that asks for
    boxes one score-ordered prefix at a time, so only the candidates NMS reaches are decoded.
    """

    def __init__(self, spec: PostprocessSpec):
        if spec.kind != "retinanet" or spec.anchors is None:
            raise ValueError(f"RetinaNetPostprocess needs a 'retinanet' spec with anchors, got kind {spec.kind!r}")
        self.spec = spec
        thresh = spec.score_thresh
        # A margin keeps float32 rounding of the logit at the boundary on the safe side; the exact test on the
        # sigmoid scores (torchvision's `score > thresh`) follows.
        self._logit_floor = -np.inf if thresh <= 0 else math.log(thresh / (1 - thresh)) - 1e-3
        # per input size: anchors per level and anchor_geometry of all anchors (kept here: hashing the spec for the
        # shared anchor cache costs ~20 us a call)
        self._anchors: dict[tuple[int, int], tuple[tuple[int, ...], np.ndarray]] = {}

    def __call__(self, cls_logits: np.ndarray, bbox_regression: np.ndarray, image_size: tuple[int, int]) -> Detections:
        """Post-process one image: cls_logits (A, C), bbox_regression (A, 4); image_size = input (height, width)."""
        spec = self.spec
        size = (int(image_size[0]), int(image_size[1]))
        if size not in self._anchors:
            anchors, per_level = generate_anchors(spec.anchors, size)
            self._anchors[size] = per_level, anchor_geometry(anchors)
        per_level, geometry = self._anchors[size]
        cls_logits = np.asarray(cls_logits, np.float32)
        bbox_regression = np.asarray(bbox_regression, np.float32)
        if cls_logits.shape != (len(geometry), spec.num_classes) or bbox_regression.shape != (len(geometry), 4):
            raise UserError(
                f"network outputs cls_logits {cls_logits.shape} / bbox_regression {bbox_regression.shape} do not "
                f"match {len(geometry)} anchors x {spec.num_classes} classes for input {tuple(image_size)}",
                "postprocess", "the manifest's anchors, num_classes and input size must be those of the exported model")
        num_classes = spec.num_classes
        flat = cls_logits.reshape(-1)
        idx = np.flatnonzero(flat > self._logit_floor)  # flat (anchor, class) indices, in level order
        logits = flat[idx]
        # Candidates of each level are a contiguous run of idx: per-level top-k is one argpartition per long run, on
        # the logits (the sigmoid is monotonic), so only the survivors pay for the sigmoid. Where a level's k-th logit
        # lies in the floor's margin, fewer than k candidates pass the exact test below, and all of them are kept.
        edges = np.searchsorted(idx, np.cumsum((0, *per_level)) * num_classes)
        k = spec.topk_candidates
        picked = [lo + np.argpartition(-logits[lo:hi], k - 1)[:k] if hi - lo > k else np.arange(lo, hi)
                  for lo, hi in zip(edges[:-1], edges[1:])]
        chosen = np.sort(np.concatenate(picked))  # index order: ties then rank as torchvision's stable sorts
        scores = sigmoid(logits[chosen])
        passed = scores > spec.score_thresh
        idx, scores = idx[chosen][passed], scores[passed]
        anchor_idx, labels = np.divmod(idx, num_classes)

        def boxes_of(which: np.ndarray) -> np.ndarray:  # decoded and clipped: only for candidates NMS reaches
            a = anchor_idx[which]  # np.take: row gathers several times faster than fancy indexing
            return clip_boxes(_decode(np.take(bbox_regression, a, axis=0), np.take(geometry, a, axis=0),
                                      spec.box_coder_weights),
                              image_size[1], image_size[0])

        keep, boxes = batched_nms_lazy(boxes_of, scores, labels, spec.nms_iou, max_keep=spec.max_detections)
        return Detections(boxes, scores[keep], labels[keep].astype(np.int64))

    def from_outputs(self, outputs: Mapping[str, np.ndarray], image_size: tuple[int, int]) -> list[Detections]:
        """Post-process a batch given the network's named outputs ``cls_logits`` (B, A, C), ``bbox_regression``."""
        cls_logits, bbox = _named(outputs, ("cls_logits", "bbox_regression"))
        if cls_logits.ndim == 2:
            cls_logits, bbox = cls_logits[None], bbox[None]
        return [self(c, b, image_size) for c, b in zip(cls_logits, bbox)]


class DetectionsPostprocess:
    """Outputs that already are detections (boxes, scores, labels): shift labels, threshold, clip, keep the best."""

    def __init__(self, spec: PostprocessSpec):
        self.spec = spec

    def __call__(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                 image_size: tuple[int, int]) -> Detections:
        """Filter one image's detections (boxes (N, 4) xyxy in input pixels)."""
        boxes = clip_boxes(np.asarray(boxes, np.float32), image_size[1], image_size[0])
        scores = np.asarray(scores, np.float32).reshape(-1)
        labels = np.asarray(labels, np.int64).reshape(-1) - self.spec.label_offset
        valid = np.flatnonzero((scores > self.spec.score_thresh) & (labels >= 0) & (labels < self.spec.num_classes))
        keep = valid[_top_k(scores[valid], min(self.spec.max_detections, valid.size))]
        return _select(boxes, scores, labels, keep)

    def from_outputs(self, outputs: Mapping[str, np.ndarray], image_size: tuple[int, int]) -> list[Detections]:
        """Post-process named outputs ``boxes``, ``scores``, ``labels``, with or without a batch axis."""
        boxes, scores, labels = _named(outputs, ("boxes", "scores", "labels"))
        if boxes.ndim == 2:
            boxes, scores, labels = boxes[None], scores[None], labels[None]
        return [self(b, s, lab, image_size) for b, s, lab in zip(boxes, scores, labels)]


class PaddedDetectionsPostprocess:
    """Fixed-size NMS outputs (num_detections [B, 1], detection_boxes [B, M, 4], detection_scores [B, M],
    detection_classes [B, M]) -> the first num_detections of each image, clipped. The graph's NMS applied the score
    threshold already; slots scored 0 are dropped (EfficientNMS_TRT's dense kernel, used below a 0.007 threshold,
    fills them with below-threshold elements)."""

    def __init__(self, spec: PostprocessSpec):
        self.spec = spec

    def from_outputs(self, outputs: Mapping[str, np.ndarray], image_size: tuple[int, int]) -> list[Detections]:
        """Post-process a batch of padded NMS outputs (the names EfficientNMS_TRT gives them)."""
        count, boxes, scores, classes = _named(outputs, PLUGIN_OUTPUTS)
        if boxes.ndim == 2:
            count, boxes, scores, classes = count[None], boxes[None], scores[None], classes[None]
        results = []
        for n, b, s, c in zip(count.reshape(len(boxes), -1)[:, 0], boxes, scores, classes):
            n = int(min(max(n, 0), len(s)))
            s = np.asarray(s[:n], np.float32)
            labels = np.asarray(c[:n], np.int64) - self.spec.label_offset
            keep = np.flatnonzero((s > 0) & (labels >= 0) & (labels < self.spec.num_classes))
            results.append(_select(clip_boxes(np.asarray(b[:n], np.float32), image_size[1], image_size[0]), s, labels, keep))
        return results


class EfficientNmsReference:
    """Runs the numpy reference of EfficientNMS_TRT on the plugin's inputs (``decoded_boxes``, ``cls_logits``),
    then reads its padded outputs: how ONNX Runtime serves a bundle whose graph ends in the TensorRT plugin."""

    def __init__(self, spec: PostprocessSpec):
        self.spec = spec
        self.attributes = efficient_nms_attributes(spec)
        self.padded = PaddedDetectionsPostprocess(spec)

    def from_outputs(self, outputs: Mapping[str, np.ndarray], image_size: tuple[int, int]) -> list[Detections]:
        """Plugin inputs of a batch -> reference NMS -> Detections."""
        boxes, logits = _named(outputs, PLUGIN_INPUTS)
        if boxes.ndim == 2:
            boxes, logits = boxes[None], logits[None]
        return self.padded.from_outputs(efficient_nms(boxes, logits, self.attributes), image_size)


def efficient_nms_attributes(spec: PostprocessSpec) -> EfficientNmsAttributes:
    """The EfficientNMS_TRT attributes that apply ``spec``'s thresholds to raw logits and decoded corner boxes."""
    return EfficientNmsAttributes(score_threshold=spec.score_thresh, iou_threshold=spec.nms_iou,
                                  max_output_boxes=spec.max_detections, background_class=-1, score_activation=True,
                                  box_coding=0)


def _named(outputs: Mapping[str, np.ndarray], names: tuple[str, ...]) -> list[np.ndarray]:
    missing = [n for n in names if n not in outputs]
    if missing:
        raise UserError(f"network outputs {sorted(outputs)} lack {missing}", "postprocess",
                        "export the model with the output names the manifest's postprocess kind expects")
    return [np.asarray(outputs[n]) for n in names]


Postprocess = RetinaNetPostprocess | DetectionsPostprocess | PaddedDetectionsPostprocess | EfficientNmsReference


def build_postprocess(spec: PostprocessSpec, plugin_on_host: bool = False) -> Postprocess:
    """The post-processor for ``spec.kind``; ``plugin_on_host``: the backend runs the graph only up to the
    EfficientNMS_TRT plugin, whose numpy reference then runs here."""
    if plugin_on_host:
        return EfficientNmsReference(spec)
    kinds = {"retinanet": RetinaNetPostprocess, "detections": DetectionsPostprocess,
             "padded": PaddedDetectionsPostprocess}
    return kinds[spec.kind](spec)
