"""RetinaNet's dense head at any depth, with full 3x3 convs (the reference) or depthwise-separable ones (edge).

Both are torchvision's RetinaNetHead (same losses, same (B, HWA, C) / (B, HWA, 4) outputs, same parameter names for
the full-conv head, so MMDetection imports and old checkpoints load unchanged). Two things differ:

- `separable=True` replaces every 3x3 conv of the towers and of the two output layers by a depthwise 3x3 followed
  by a pointwise 1x1 (the SSDLite / EfficientDet head). At 800 px the head runs on 100 x 100 P3 cells, where a full
  3x3 conv costs 9 C^2 multiply-adds per cell and its separable version 9 C + C^2; the output layers (9 anchors x 20
  DIOR classes = 180 channels) stay in float after INT8 quantization, so they are what an edge student pays most for.
- outputs are reordered NCHW -> NHWC with one 4-D transpose instead of torchvision's 5-D permute. The values are
  identical ((A, C) is the fastest-varying pair of channels either way); ONNX Runtime runs the 4-D transpose
  markedly faster, and it is on the critical path of every exported RetinaNet.

DS2D2 never runs a student's head on teacher features (the implicit stream runs the *teacher's* heads on adapted
student features), so a student may use either head whatever its teacher uses; only the anchors must match.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.ops.misc import Conv2dNormActivation

from runtime.errors import UserError

HEAD_TYPES = ("conv", "separable")


def separable_conv(in_channels: int, out_channels: int, relu: bool) -> nn.Sequential:
    """Depthwise 3x3 (no bias) then pointwise 1x1 (with bias), optionally followed by ReLU; no norm, like the
    reference head (a norm shared by five pyramid levels would mix their statistics)."""
    layers = [nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
              nn.Conv2d(in_channels, out_channels, 1)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))


def _tower(width: int, num_convs: int, separable: bool) -> nn.Sequential:
    if separable:
        return nn.Sequential(*(separable_conv(width, width, relu=True) for _ in range(num_convs)))
    return nn.Sequential(*(Conv2dNormActivation(width, width, norm_layer=None) for _ in range(num_convs)))


def _init_tower(tower: nn.Module, separable: bool) -> None:
    for layer in tower.modules():
        if isinstance(layer, nn.Conv2d):
            if separable:
                # std 0.01 on both halves of a separable conv would shrink the signal ~300x per layer; He init
                # keeps activations (and gradients) at scale through the stack, as in MobileNet.
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            else:  # torchvision's (and the reference's) head init
                nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _separable_output(width: int, channels: int, bias: float) -> nn.Sequential:
    """Separable output layer: He-initialised depthwise, then a pointwise with the usual std 0.01 and `bias`."""
    out = separable_conv(width, channels, relu=False)
    nn.init.kaiming_normal_(out[0].weight, mode="fan_out", nonlinearity="relu")
    nn.init.normal_(out[1].weight, std=0.01)
    nn.init.constant_(out[1].bias, bias)
    return out


def _nhwc(out: Tensor, last: int) -> Tensor:
    """(N, A*K, H, W) -> (N, H*W*A, K): the layout torchvision's 5-D permute produces, with one 4-D transpose."""
    return out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, last)


class ClassificationHead(RetinaNetClassificationHead):
    """torchvision's classification subnet, outputs reordered with one NHWC transpose; `configure` sets its tower."""

    separable = False

    def configure(self, num_convs: int, separable: bool) -> None:
        """`num_convs` tower layers (full 3x3 or separable); separable also makes the output layer separable."""
        self.conv = _tower(self.cls_logits.in_channels, num_convs, separable)
        _init_tower(self.conv, separable)
        if separable:
            prior = self.cls_logits.bias.detach()[0].item()  # torchvision's -log((1 - p) / p), p = 0.01
            self.cls_logits = _separable_output(self.cls_logits.in_channels, self.cls_logits.out_channels, prior)
        self.separable = separable

    def forward(self, x: list[Tensor]) -> Tensor:
        """(N, sum of H*W*A over levels, num_classes) logits."""
        return torch.cat([_nhwc(self.cls_logits(self.conv(f)), self.num_classes) for f in x], dim=1)


class RegressionHead(RetinaNetRegressionHead):
    """torchvision's box subnet, outputs reordered with one NHWC transpose; `configure` sets its tower."""

    separable = False

    def configure(self, num_convs: int, separable: bool) -> None:
        """`num_convs` tower layers (full 3x3 or separable); separable also makes the output layer separable."""
        self.conv = _tower(self.bbox_reg.in_channels, num_convs, separable)
        _init_tower(self.conv, separable)
        if separable:
            self.bbox_reg = _separable_output(self.bbox_reg.in_channels, self.bbox_reg.out_channels, 0.0)
        self.separable = separable

    def forward(self, x: list[Tensor]) -> Tensor:
        """(N, sum of H*W*A over levels, 4) box deltas."""
        return torch.cat([_nhwc(self.bbox_reg(self.conv(f)), 4) for f in x], dim=1)


class RetinaHead(RetinaNetHead):
    """RetinaNetHead (losses unchanged) made of the two subnets above.

    Built in torchvision's order (both default subnets, then the configured towers, classification first), so a
    seeded full-conv head gets exactly the weights it got before this module existed.
    """

    def __init__(self, width: int, num_anchors: int, num_classes: int, num_convs: int, separable: bool):
        nn.Module.__init__(self)  # RetinaNetHead.__init__ only builds the two subnets built here
        self.classification_head = ClassificationHead(width, num_anchors, num_classes)
        self.regression_head = RegressionHead(width, num_anchors)
        for subnet in (self.classification_head, self.regression_head):
            subnet.configure(num_convs, separable)


def retina_head(width: int, num_anchors: int, num_classes: int, num_convs: int, head: str = "conv") -> RetinaNetHead:
    """torchvision's RetinaNetHead with `num_convs` conv+ReLU layers (no norm) in each subnet; `head` 'conv' (full
    3x3, the reference) or 'separable' (depthwise 3x3 + pointwise 1x1 everywhere, outputs included)."""
    if num_convs < 0:
        raise UserError(f"head_convs must be >= 0, got {num_convs}", where="model.head_convs")
    if head not in HEAD_TYPES:
        raise UserError(f"unknown head {head!r}", where="model.head", fix=f"use one of {HEAD_TYPES}")
    return RetinaHead(width, num_anchors, num_classes, num_convs, separable=head == "separable")


def head_type(head: RetinaNetHead) -> str:
    """'separable' or 'conv': what `retina_head` was asked for (for copies of a head, e.g. the amplifier)."""
    return "separable" if getattr(head.classification_head, "separable", False) else "conv"
