"""In-graph NMS for RetinaNet bundles: a post-processing tail appended to an exported (and quantized) network.

The network ends in ``cls_logits`` (B, A, C) and ``bbox_regression`` (B, A, 4). A tail consumes those two tensors
and ends in the fixed-size, batch-capable outputs TensorRT's EfficientNMS_TRT defines: ``num_detections`` [B, 1]
int32, ``detection_boxes`` [B, M, 4], ``detection_scores`` [B, M], ``detection_classes`` [B, M] int32 (M =
max_detections, zeros past the count). runtime.postprocess.PaddedDetectionsPostprocess reads them.

- ``onnx-nms`` (ONNX Runtime bundles): torchvision's postprocess_detections, batched: sigmoid, top-k per FPN level
  (TopK), threshold, decoding of the candidates only (BoxCoder arithmetic), clipping, class-wise NMS as one ONNX
  ``NonMaxSuppression`` over class-shifted boxes (torchvision's own batched_nms trick; boxes are clipped to the
  image, so a shift of (S + 1) per class separates classes exactly), then the best M survivors per image. The
  detections equal torchvision's (tests/test_export.py).
- ``efficient-nms-trt`` (TensorRT bundles): decoding and clipping of every anchor in the graph, then one
  ``EfficientNMS_TRT`` plugin node (raw logits in, ``score_activation`` 1, ``box_coding`` 0). Its candidate
  selection is a global top-4096 by score, not torchvision's 1000 per level, and its IoU test is inclusive: the
  accuracy gate scores it with runtime.efficient_nms (the plugin's numpy reference) since ONNX Runtime cannot run it.

Tails are separate small graphs (traced from torch, then merged by tensor name), so the network is calibrated and
quantized without them, and both the FP32 and the INT8 file get the very same tail.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.ops.boxes import clip_boxes_to_image

from deploy.export import RAW_OUTPUTS, DeployNetwork
from runtime.efficient_nms import (PLUGIN_DOMAIN, PLUGIN_INPUTS, PLUGIN_OP, PLUGIN_OUTPUTS, EfficientNmsAttributes,
                                   efficient_nms)
from runtime.anchors import generate_anchors
from runtime.errors import UserError
from runtime.postprocess import PostprocessSpec

NmsKind = Literal["host", "onnx-nms", "efficient-nms-trt"]
NMS_CHOICES = ("host", "graph", "onnx-nms", "efficient-nms-trt")
TAIL_PREFIX = "nms/"
MAX_TAIL_OPSET = 20  # the TorchScript exporter's newest opset


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX NonMaxSuppression (selected [N, 3] = batch, class, box); eager forward by torchvision for tracing."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_class: int, iou: float, score_threshold: float) -> Tensor:
        rows = []
        for b in range(boxes.shape[0]):
            for c in range(scores.shape[1]):
                idx = torch.nonzero(scores[b, c] > score_threshold).flatten()
                keep = idx[torchvision.ops.nms(boxes[b, idx], scores[b, c, idx], iou)][:max_per_class]
                rows.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], dim=1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou: float, score_threshold: float):  # noqa: ANN001
        const = lambda value, dtype: g.op("Constant", value_t=torch.tensor([value], dtype=dtype))  # noqa: E731
        return g.op("NonMaxSuppression", boxes, scores, const(max_per_class, torch.int64),
                    const(iou, torch.float32), const(score_threshold, torch.float32))


class _EfficientNmsTrt(torch.autograd.Function):
    """TensorRT's EfficientNMS_TRT plugin node; eager forward by the numpy reference (tracing needs values)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, attrs: EfficientNmsAttributes):  # noqa: ANN205
        out = efficient_nms(boxes.detach().numpy(), scores.detach().numpy(), attrs)
        return tuple(torch.from_numpy(out[name]) for name in PLUGIN_OUTPUTS)

    @staticmethod
    def symbolic(g, boxes, scores, attrs: EfficientNmsAttributes):  # noqa: ANN001, ANN205
        kinds = {float: "f", int: "i", str: "s"}
        named = {f"{k}_{kinds[type(v)]}": v for k, v in attrs.as_onnx().items()}
        return g.op(f"{PLUGIN_DOMAIN}::{PLUGIN_OP}", boxes, scores, outputs=len(PLUGIN_OUTPUTS), **named)


class _Tail(nn.Module):
    """Shared state: the anchors (a constant: the input size is fixed) and torchvision's box decoding."""

    def __init__(self, model: RetinaNet, anchors: np.ndarray, per_level: tuple[int, ...], input_size: int,
                 score_thresh: float, nms_iou: float, max_detections: int, topk_candidates: int):
        super().__init__()
        self.register_buffer("anchors", torch.from_numpy(np.array(anchors, np.float32)), persistent=False)
        self.box_coder = model.box_coder
        self.per_level, self.size = tuple(per_level), input_size
        self.score_thresh, self.nms_iou = score_thresh, nms_iou
        self.max_detections, self.topk = max_detections, topk_candidates

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """(B, K, 4) deltas against (B or 1, K, 4) anchors -> clipped xyxy boxes, as torchvision decodes them."""
        batch, count = deltas.shape[0], deltas.shape[1]
        flat = self.box_coder.decode_single(deltas.reshape(-1, 4), anchors.expand(batch, -1, -1).reshape(-1, 4))
        return clip_boxes_to_image(flat.reshape(batch, count, 4), (self.size, self.size))


class OnnxNmsTail(_Tail):
    """torchvision's RetinaNet.postprocess_detections for a batch, ending in padded [B, M] outputs."""

    def forward(self, cls_logits: Tensor, bbox_regression: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(num_detections, detection_boxes, detection_scores, detection_classes) of a batch."""
        batch, num_classes = cls_logits.shape[0], cls_logits.shape[2]
        scores, flat_idx, start = [], [], 0
        for count in self.per_level:
            level = torch.sigmoid(cls_logits[:, start:start + count]).reshape(batch, count * num_classes)
            top_scores, top_idx = level.topk(min(self.topk, count * num_classes), dim=1)
            scores.append(top_scores)
            flat_idx.append(top_idx + start * num_classes)
            start += count
        scores, flat_idx = torch.cat(scores, dim=1), torch.cat(flat_idx, dim=1)  # (B, K) candidates
        anchor_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
        labels = flat_idx % num_classes
        deltas = torch.gather(bbox_regression, 1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4))
        boxes = self.decode(deltas, self.anchors[anchor_idx])
        shifted = boxes + (labels.to(boxes.dtype) * (self.size + 1)).unsqueeze(-1)  # classes never overlap
        # Candidates at or below the threshold are torchvision's `score > thresh` filter: NMS skips them.
        selected = _NonMaxSuppression.apply(shifted, scores.unsqueeze(1), self.max_detections, self.nms_iou,
                                            self.score_thresh)
        kept = torch.zeros_like(scores)
        kept[selected[:, 0], selected[:, 2]] = 1.0
        ranked = torch.where(kept > 0, scores, torch.full_like(scores, -1.0))
        top_scores, top = ranked.topk(min(self.max_detections, ranked.shape[1]), dim=1)
        valid = top_scores > -0.5
        out_boxes = torch.gather(boxes, 1, top.unsqueeze(-1).expand(-1, -1, 4)) * valid.unsqueeze(-1)
        out_scores = torch.where(valid, top_scores, torch.zeros_like(top_scores))
        out_classes = torch.where(valid, torch.gather(labels, 1, top), torch.zeros_like(top)).to(torch.int32)
        count = valid.sum(dim=1, keepdim=True).to(torch.int32)
        return count, out_boxes, out_scores, out_classes


class EfficientNmsTail(_Tail):
    """Decode and clip every anchor's box, then TensorRT's EfficientNMS_TRT on raw logits."""

    def forward(self, cls_logits: Tensor, bbox_regression: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The plugin's four outputs."""
        boxes = self.decode(bbox_regression, self.anchors.unsqueeze(0))
        attrs = EfficientNmsAttributes(score_threshold=self.score_thresh, iou_threshold=self.nms_iou,
                                       max_output_boxes=self.max_detections)
        return _EfficientNmsTrt.apply(boxes, cls_logits, attrs)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version."""
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_tail(tail: _Tail, num_anchors: int, num_classes: int, batch: int | None, opset: int) -> onnx.ModelProto:
    """Trace a tail to ONNX: inputs cls_logits / bbox_regression, outputs the four padded tensors.

    ``batch`` None exports a dynamic batch axis; otherwise the batch is fixed like the network's.
    """
    probe_batch = batch or 2
    torch.manual_seed(0)
    probe = (torch.randn(probe_batch, num_anchors, num_classes) - 3, 0.1 * torch.randn(probe_batch, num_anchors, 4))
    axes = None if batch else {n: {0: "batch"} for n in (*RAW_OUTPUTS, *PLUGIN_OUTPUTS)}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "tail.onnx")
        plugin_opsets = {PLUGIN_DOMAIN: 1} if isinstance(tail, EfficientNmsTail) else None
        torch.onnx.export(tail.eval(), probe, path, input_names=list(RAW_OUTPUTS), output_names=list(PLUGIN_OUTPUTS),
                          opset_version=min(opset, MAX_TAIL_OPSET), dynamic_axes=axes, do_constant_folding=True,
                          dynamo=False, custom_opsets=plugin_opsets)
        model = onnx.load(path)
    _type_outputs(model, batch, tail.max_detections)
    plugin = [n for n in model.graph.node if n.op_type == PLUGIN_OP]
    if plugin:  # name the plugin's box input so that ONNX Runtime can stop there (runtime.backends.ort.graph_until)
        _rename(model.graph, plugin[0].input[0], PLUGIN_INPUTS[0])
        if plugin[0].input[1] != PLUGIN_INPUTS[1]:
            raise RuntimeError(f"the plugin's score input is {plugin[0].input[1]}, not the network's cls_logits")
    return model


def _type_outputs(model: onnx.ModelProto, batch: int | None, max_detections: int) -> None:
    """Give the four outputs their declared types and shapes (a plugin's outputs have none after tracing)."""
    b = batch or "batch"
    shapes = {"num_detections": (onnx.TensorProto.INT32, [b, 1]),
              "detection_boxes": (onnx.TensorProto.FLOAT, [b, max_detections, 4]),
              "detection_scores": (onnx.TensorProto.FLOAT, [b, max_detections]),
              "detection_classes": (onnx.TensorProto.INT32, [b, max_detections])}
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, *shapes[n]) for n in PLUGIN_OUTPUTS)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def attach_tail(network: onnx.ModelProto, tail: onnx.ModelProto) -> onnx.ModelProto:
    """The network with the tail appended: the network's raw outputs feed the tail, whose outputs become the graph's.

    The tail's nodes, initializers and internal tensors are prefixed with ``nms/`` so no name can clash.
    """
    merged = onnx.ModelProto()
    merged.CopyFrom(network)
    graph, keep = merged.graph, {*RAW_OUTPUTS, *PLUGIN_OUTPUTS, *PLUGIN_INPUTS}
    if sorted(o.name for o in graph.output) != sorted(RAW_OUTPUTS):
        raise UserError(f"in-graph NMS needs a network ending in {RAW_OUTPUTS}, this one ends in "
                        f"{[o.name for o in graph.output]}", "deploy --nms", "use --nms host")
    rename = lambda name: name if not name or name in keep else TAIL_PREFIX + name  # noqa: E731
    for node in tail.graph.node:
        new = graph.node.add()
        new.CopyFrom(node)
        new.name = TAIL_PREFIX + (node.name or node.op_type)
        new.input[:] = [rename(n) for n in node.input]
        new.output[:] = [rename(n) for n in node.output]
    for init in tail.graph.initializer:
        new_init = graph.initializer.add()
        new_init.CopyFrom(init)
        new_init.name = rename(init.name)
    del graph.output[:]
    graph.output.extend(tail.graph.output)
    for opset in tail.opset_import:
        if opset.domain not in ("", "ai.onnx") and opset.domain not in {o.domain for o in merged.opset_import}:
            merged.opset_import.add().CopyFrom(opset)
    merged.ir_version = max(merged.ir_version, tail.ir_version)
    return merged


def nms_tail(kind: NmsKind, model: RetinaNet, anchors: np.ndarray, per_level: tuple[int, ...], input_size: int,
             post: PostprocessSpec) -> _Tail:
    """The tail module for ``kind`` with ``post``'s thresholds (a runtime.postprocess.PostprocessSpec)."""
    cls = {"onnx-nms": OnnxNmsTail, "efficient-nms-trt": EfficientNmsTail}[kind]
    return cls(model, anchors, per_level, input_size, post.score_thresh, post.nms_iou, post.max_detections,
               post.topk_candidates)


def add_nms(path: Path, tail_model: onnx.ModelProto) -> Path:
    """Append the tail to the ONNX file at ``path`` in place (checked, written atomically)."""
    network = onnx.load(str(path))
    # The tail is traced at the network's opset (at most the exporter's newest, whose ops read the same later on).
    merged = attach_tail(network, tail_model)
    onnx.checker.check_model(merged)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(merged, str(tmp))
    os.replace(tmp, path)
    return path



@dataclass
class NmsPlan:
    """Where a bundle's NMS runs, the tail that puts it in the graph (None: host), and what the manifest says."""

    kind: NmsKind
    tail: onnx.ModelProto | None
    postprocess: PostprocessSpec
    output_names: tuple[str, ...]

    @property
    def plugin(self) -> bool:
        """True when the graph ends in TensorRT's EfficientNMS_TRT (ONNX Runtime cannot run it)."""
        return self.kind == "efficient-nms-trt"

    def attach(self, paths: list[Path]) -> None:
        """Append the tail to each ONNX file (FP32, INT8, FP16 alike)."""
        if self.tail is not None:
            for path in paths:
                add_nms(path, self.tail)

    def describe(self) -> str:
        """One sentence for the bundle README."""
        if self.kind == "host":
            return "NMS runs on the host (runtime.postprocess; runtime.nms)."
        if self.kind == "onnx-nms" and self.tail is None:
            return "NMS is part of the exported detector graph (ONNX NonMaxSuppression)."
        if self.kind == "onnx-nms":
            return ("The graph ends in decoding + ONNX NonMaxSuppression (torchvision's post-processing, batched): "
                    "outputs num_detections [B, 1] and detection_* [B, max_detections].")
        return ("The graph ends in box decoding + TensorRT's EfficientNMS_TRT plugin (outputs num_detections [B, 1], "
                "detection_* [B, max_detections]). The plugin itself is not executed on the build machine: the "
                "accuracy gate ran the graph up to the plugin's inputs in ONNX Runtime and applied "
                "runtime.efficient_nms, a numpy reference of the plugin's semantics (global top-4096 candidates, "
                "inclusive IoU and score tests), which is also what ONNX Runtime does with this bundle.")


def plan_nms(requested: str, net: DeployNetwork, model: nn.Module, post: PostprocessSpec, input_size: int,
             runtime: str, batch: int | None, opset: int) -> NmsPlan:
    """Resolve ``--nms`` for a network and a target runtime; ``graph`` = the in-graph NMS that runtime runs.

    ``batch`` is the network's fixed batch (None: dynamic) and ``opset`` its opset: the tail follows both.
    """
    if net.kind == "detections":  # Faster R-CNN: torchvision's graph already holds its NMS
        if requested not in ("host", "graph", "onnx-nms"):
            raise UserError(f"--nms {requested} is for RetinaNet; Faster R-CNN's graph holds ONNX NonMaxSuppression",
                            "--nms", "use --nms host (the default)")
        return NmsPlan("onnx-nms", None, post, net.output_names)
    kind = requested
    if requested == "graph":
        kind = "efficient-nms-trt" if runtime == "tensorrt" else "onnx-nms"
    if kind == "host":
        return NmsPlan("host", None, post, net.output_names)
    if kind == "efficient-nms-trt" and runtime != "tensorrt":
        raise UserError("EfficientNMS_TRT is a TensorRT plugin, this target runs ONNX Runtime", "--nms",
                        "use --nms onnx-nms (or graph) for ONNX Runtime targets")
    if kind not in ("onnx-nms", "efficient-nms-trt") or post.anchors is None:
        raise UserError(f"unknown NMS placement {requested!r}", "--nms", f"choose one of {', '.join(NMS_CHOICES)}")
    anchors, per_level = generate_anchors(post.anchors, (input_size, input_size))
    tail_module = nms_tail(kind, model, anchors, per_level, input_size, post)  # type: ignore[arg-type]
    tail = export_tail(tail_module, len(anchors), post.num_classes, batch, opset)
    return NmsPlan(kind, tail, post.model_copy(update={"kind": "padded"}), PLUGIN_OUTPUTS)
