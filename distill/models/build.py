"""One entry point from a ModelSpec to a torchvision detector, plus the size measures the summary table reports."""
from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import RetinaNet

from distill.models.backbones import fpn_features
from runtime.errors import UserError

# arch -> "module:function" building it; the function takes (spec, num_classes, input_size, **test_thresholds).
# distill/models/faster_rcnn.py provides build_faster_rcnn (same signature).
BUILDERS = {
    "retinanet": "distill.models.retinanet:build_retinanet",
    "faster_rcnn": "distill.models.faster_rcnn:build_faster_rcnn",
}


def build_detector(spec, num_classes: int, input_size: int, **thresholds) -> nn.Module:
    """Detector for a ModelSpec-like object (arch, backbone, fpn_width, head_convs, head, pretrained_backbone, norm).

    `thresholds` are the test settings: score_thresh, nms_thresh, detections_per_img, topk_candidates.
    """
    if spec.arch not in BUILDERS:
        raise UserError(f"unknown arch {spec.arch!r}", where="model.arch", fix=f"use one of {sorted(BUILDERS)}")
    if num_classes < 1:
        raise UserError(f"a detector needs at least one class, got {num_classes}", where="dataset.classes")
    if input_size % 32:
        raise UserError(f"input size {input_size} is not a multiple of 32", where="input_size",
                        fix="use e.g. 800 or 1024")
    if getattr(spec, "head", "conv") != "conv" and spec.arch != "retinanet":
        raise UserError(f"head {spec.head!r} is a RetinaNet option; {spec.arch} has no dense head to make separable",
                        where="model.head", fix="remove `head` from the model or set head: conv")
    module_name, func = BUILDERS[spec.arch].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise NotImplementedError(f"arch {spec.arch!r} is not implemented yet ({module_name} is missing)") from exc
    model = getattr(module, func)(spec, num_classes, input_size, **thresholds)
    if getattr(spec, "mmdet_compat", False):  # checkpoints imported from MMDetection keep its conventions
        from distill.models.mmdet_variant import to_mmdet_variant

        to_mmdet_variant(model)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of the model."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gflops(model: nn.Module, input_size: int) -> float:
    """GFLOPs (2 per multiply-add, torch's FlopCounterMode) of one S x S image through the network.

    RetinaNet: backbone + FPN + head (the exported graph, no post-processing). Other archs: the whole eval forward.
    """
    param = next(model.parameters())
    image = torch.zeros(1, 3, input_size, input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            if isinstance(model, RetinaNet):
                model.head(fpn_features(model, image))
            else:
                model([image[0]])
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
