"""ONNX export of a trained detector, as Polygraphy-style lazy loaders.

What is exported is the *network* the runtime feeds: input ``images`` (B, 3, S, S), already normalised by
runtime.preprocess. RetinaNet ends at the head's raw outputs ``cls_logits`` (B, A, C) and ``bbox_regression``
(B, A, 4), concatenated over P3..P7 exactly like torchvision's RetinaNetHead, and the host decodes them
(runtime.postprocess); in-graph NMS (``--nms onnx-nms`` / ``efficient-nms-trt``) is a tail appended to this network
after quantization (deploy.nms_graph). Faster R-CNN exports torchvision's whole two-stage graph (RPN, RoIAlign, box
head, NMS) with outputs ``boxes``, ``labels``, ``scores``.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from polygraphy.backend.base import BaseLoader
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList

from runtime.errors import UserError

INPUT_NAME = "images"
RAW_OUTPUTS = ("cls_logits", "bbox_regression")
DETECTION_OUTPUTS = ("boxes", "scores", "labels")


class RetinaNetNetwork(nn.Module):
    """Backbone + FPN + head of a torchvision RetinaNet on normalised images; returns (cls_logits, bbox_regression)."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(cls_logits, bbox_regression) of a normalised batch."""
        feats = self.backbone(images)
        out = self.head(list(feats.values()) if isinstance(feats, dict) else [feats])
        return out["cls_logits"], out["bbox_regression"]


class FasterRCNNNetwork(nn.Module):
    """torchvision Faster R-CNN without its transform: normalised S x S images in, detections of image 0 out."""

    def __init__(self, model: FasterRCNN, input_size: int):
        super().__init__()
        self.model, self.input_size = model, input_size

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(boxes, scores, labels) of image 0; labels count from 1 (0 is torchvision's background)."""
        sizes = [(self.input_size, self.input_size)] * images.shape[0]
        image_list = ImageList(images, sizes)
        feats = self.model.backbone(images)
        proposals, _ = self.model.rpn(image_list, feats)
        det = self.model.roi_heads(feats, proposals, sizes)[0][0]
        return det["boxes"], det["scores"], det["labels"]


@dataclass(frozen=True)
class DeployNetwork:
    """The module to export plus what the manifest needs to know about its outputs."""

    module: nn.Module
    output_names: tuple[str, ...]
    kind: Literal["retinanet", "detections"]  # runtime.postprocess.PostprocessSpec.kind
    label_offset: int = 0  # Faster R-CNN numbers foreground classes from 1
    batch_fixed: bool = False  # Faster R-CNN's graph handles exactly one image


def deploy_network(model: nn.Module, input_size: int) -> DeployNetwork:
    """Wrap a torchvision detector into the network that is exported (eval mode, no gradients)."""
    model = model.eval()
    if isinstance(model, RetinaNet):
        return DeployNetwork(RetinaNetNetwork(model).eval(), RAW_OUTPUTS, "retinanet")
    if isinstance(model, FasterRCNN):
        # torchvision's box predictor has num_classes + 1 outputs, index 0 being background.
        return DeployNetwork(FasterRCNNNetwork(model, input_size).eval(), DETECTION_OUTPUTS, "detections",
                             label_offset=1, batch_fixed=True)
    raise UserError(f"cannot export a {type(model).__name__}", where="checkpoint",
                    fix="deploy exports torchvision RetinaNet and FasterRCNN models")


class ExportOnnx(BaseLoader):
    """Loader: trace a DeployNetwork to an ONNX file at a fixed S x S input; returns the path."""

    def __init__(self, network: DeployNetwork, path: str | Path, input_size: int, opset: int = 17,
                 dynamic_batch: bool = False, batch_size: int = 1):
        self.network, self.path, self.input_size = network, Path(path), input_size
        self.opset, self.dynamic_batch, self.batch_size = opset, dynamic_batch, batch_size

    def call_impl(self) -> Path:
        """Export, run onnx.checker, return the path of the written model."""
        if self.opset < 17:
            raise UserError(f"opset {self.opset} is too old", where="deploy.opset", fix="use 17 or newer")
        if self.network.batch_fixed and (self.dynamic_batch or self.batch_size != 1):
            raise UserError("Faster R-CNN's graph (it ends in variable-length detections) is exported for batch 1",
                            where="deploy.dynamic_batch", fix="set deploy.dynamic_batch=false")
        names = self.network.output_names
        axes = {n: {0: "batch"} for n in (INPUT_NAME, *names)} if self.dynamic_batch else {}
        if self.network.kind == "detections":  # one row per detection: name the data-dependent axis
            axes.update({n: {0: "num_detections"} for n in names})
        probe = torch.zeros(self.batch_size, 3, self.input_size, self.input_size)
        tmp = self.path.with_name(self.path.name + ".tmp")
        # The TorchScript exporter is used on purpose: it handles torchvision's detection ops (RoIAlign, NMS),
        # keeps module paths in node names (the sensitivity pass groups layers by them) and is deterministic.
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(self.network.module, (probe,), str(tmp), input_names=[INPUT_NAME],
                              output_names=list(names), opset_version=self.opset, dynamic_axes=axes or None,
                              do_constant_folding=True, dynamo=False)
        import onnx

        onnx.checker.check_model(str(tmp), full_check=True)
        os.replace(tmp, self.path)
        return self.path


class SimplifyOnnx(BaseLoader):
    """Loader: constant-fold and simplify an ONNX file in place (onnxslim, else Polygraphy's FoldConstants)."""

    def __init__(self, path_loader: BaseLoader | str | Path):
        self.path_loader = path_loader
        self.tool: str | None = None

    def call_impl(self) -> Path:
        """Simplify, re-check, replace the file atomically; returns its path."""
        import onnx

        path = Path(self.path_loader() if callable(self.path_loader) else self.path_loader)
        model = onnx.load(str(path))
        try:
            import onnxslim

            with contextlib.redirect_stdout(io.StringIO()):
                simplified = onnxslim.slim(model)
            self.tool = f"onnxslim {onnxslim.__version__}"
        except ImportError:
            from polygraphy.backend.onnx import FoldConstants

            simplified = FoldConstants(model, error_ok=False)()
            self.tool = "polygraphy FoldConstants"
        onnx.checker.check_model(simplified, full_check=True)
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(simplified, str(tmp))
        os.replace(tmp, path)
        return path


class AutocastFp16(BaseLoader):
    """Loader: ModelOpt AutoCast of an FP32 ONNX file to mixed FP16 (float32 I/O), for strongly typed TensorRT."""

    def __init__(self, fp32: BaseLoader | str | Path, path: str | Path):
        self.fp32, self.path = fp32, Path(path)

    def call_impl(self) -> Path:
        """Convert, check, write atomically; returns the path."""
        import onnx

        from deploy.formats import missing, quiet_tools

        if missing("onnx-fp16"):
            raise UserError("FP16 for TensorRT 11 needs nvidia-modelopt (AutoCast writes the FP16 types into the ONNX)",
                            where="--precision fp16",
                            fix="pip install 'nvidia-modelopt[onnx]', or use --precision int8")
        from modelopt.onnx.autocast import convert_to_mixed_precision

        src = Path(self.fp32() if callable(self.fp32) else self.fp32)
        with quiet_tools():
            model = convert_to_mixed_precision(onnx_path=str(src), low_precision_type="fp16", keep_io_types=True)
        onnx.checker.check_model(model)
        tmp = self.path.with_name(self.path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, self.path)
        return self.path


def onnx_io(path: str | Path) -> tuple[list[tuple[str, list]], list[tuple[str, list]]]:
    """(name, shape) of the inputs and outputs of an ONNX file; dynamic dimensions appear as their names."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inits = {i.name for i in graph.initializer}
    return ([(v.name, dims(v)) for v in graph.input if v.name not in inits],
            [(v.name, dims(v)) for v in graph.output])
