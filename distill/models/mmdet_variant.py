"""MMDetection 3.x conventions as small overrides of torchvision's detection modules.

A checkpoint trained with MMDetection (e.g. the DS2D2 reference code) only reproduces its outputs in torchvision when
the few places where the two libraries compute differently follow MMDetection:

- base anchors are centred at 0 and *not* rounded (torchvision rounds them to whole pixels);
- dw/dh are clamped to +-log(1000/16) on both sides (torchvision clamps only from above);
- RoIAlign uses `aligned=True` (half-pixel offset) and MMDetection's level rule floor(log2(sqrt(area)/56 + 1e-6));
- RetinaNet's P7 is conv(P6) with no ReLU in between (torchvision's LastLevelP6P7 applies ReLU to P6 first).

`to_mmdet_variant(model)` swaps these modules into a built RetinaNet / FasterRCNN in place; weights are unaffected.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

BOX_CLIP = math.log(1000.0 / 16)


class UnroundedAnchorGenerator(AnchorGenerator):
    """AnchorGenerator whose zero-centred base anchors keep their fractional size, as MMDetection's do."""

    def generate_anchors(
        self,
        scales: Sequence[float],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
    ) -> Tensor:
        """(len(ratios) * len(scales), 4) xyxy anchors around (0, 0), ratio-major; ratio = height / width."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = ((1 / h_ratios)[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)


class SymmetricClampBoxCoder(BoxCoder):
    """BoxCoder that also clamps dw/dh from below (MMDetection's DeltaXYWHBBoxCoder clamps both sides)."""

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """Decode like torchvision after raising dw/dh to at least -clip (scaled by the coder weights)."""
        codes = rel_codes.reshape(rel_codes.shape[0], rel_codes.shape[1] // 4, 4)
        lower = codes.new_tensor([-self.bbox_xform_clip * self.weights[2], -self.bbox_xform_clip * self.weights[3]])
        codes = torch.cat([codes[..., :2], torch.maximum(codes[..., 2:], lower)], dim=-1)
        return super().decode_single(codes.reshape(rel_codes.shape), boxes)


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign as MMDetection's SingleRoIExtractor: aligned=True, fixed strides, its level rule."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int,
                 strides: Sequence[int] = (4, 8, 16, 32), finest_scale: float = 56.0):
        super().__init__(featmap_names, output_size, sampling_ratio)
        if len(strides) != len(featmap_names):
            raise ValueError(f"{len(featmap_names)} feature maps but {len(strides)} strides")
        self.strides, self.finest_scale = tuple(strides), finest_scale

    def levels(self, rois: Tensor) -> Tensor:
        """FPN level index per (K, 5) RoI: floor(log2(sqrt(w h) / 56 + 1e-6)), clamped to the pooled levels."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        return torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(self.strides) - 1).long()

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """(K, C, out, out) features of the boxes of every image (xyxy input pixels), in the order given."""
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.levels(rois)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for level, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, 1.0 / stride, self.sampling_ratio, aligned=True)
            out = out.index_copy(0, idx, pooled.to(out.dtype))
        return out


class P6P7WithoutReLU(LastLevelP6P7):
    """RetinaNet P6/P7 with P7 = conv(P6) directly (MMDetection FPN, relu_before_extra_convs=False)."""

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """Append P6 (from P5 or C5, per use_P5) and P7 to the pyramid."""
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        return [*p, p6, self.p7(p6)], [*names, "p6", "p7"]


def _unrounded(generator: AnchorGenerator) -> UnroundedAnchorGenerator:
    return UnroundedAnchorGenerator(generator.sizes, generator.aspect_ratios)


def _symmetric(coder: BoxCoder) -> SymmetricClampBoxCoder:
    return SymmetricClampBoxCoder(coder.weights, coder.bbox_xform_clip)


def to_mmdet_variant(model: nn.Module) -> nn.Module:
    """Swap MMDetection's anchor, box-coder, RoIAlign and P7 conventions into a torchvision detector, in place."""
    if isinstance(model, RetinaNet):
        extra = model.backbone.fpn.extra_blocks
        if isinstance(extra, LastLevelP6P7) and not isinstance(extra, P6P7WithoutReLU):
            plain = P6P7WithoutReLU(extra.p6.in_channels, extra.p6.out_channels)
            plain.use_P5 = extra.use_P5
            plain.load_state_dict(extra.state_dict())
            model.backbone.fpn.extra_blocks = plain.to(extra.p6.weight.device)
        model.anchor_generator = _unrounded(model.anchor_generator)
        model.box_coder = _symmetric(model.box_coder)
    elif isinstance(model, FasterRCNN):
        model.rpn.anchor_generator = _unrounded(model.rpn.anchor_generator)
        model.rpn.box_coder = _symmetric(model.rpn.box_coder)
        model.roi_heads.box_coder = _symmetric(model.roi_heads.box_coder)
        pool = model.roi_heads.box_roi_pool
        if not isinstance(pool, AlignedMultiScaleRoIAlign):
            strides = tuple(4 * 2**i for i in range(len(pool.featmap_names)))  # '0'.. = P2.. of the FPN
            model.roi_heads.box_roi_pool = AlignedMultiScaleRoIAlign(
                list(pool.featmap_names), pool.output_size[0], pool.sampling_ratio, strides)
    else:
        raise TypeError(f"no MMDetection variant for {type(model).__name__}")
    model.mmdet_compat = True
    return model
