"""torchvision RetinaNet configured like the DS2D2 reference (P3-P7 with P6/P7 from C5, 3x3 anchors, N head convs)."""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation

from distill.models.backbones import c5_channels, fpn_features, resnet_fpn
from runtime.anchors import anchor_spec_for
from runtime.errors import UserError



def anchor_generator(arch: str, anchors=None, levels: tuple[int, int] | None = None) -> AnchorGenerator:
    """torchvision AnchorGenerator of a ModelSpec's `anchors` (sizes per level, aspect ratios), or of the
    reference's anchors when None (runtime.anchors.reference_sizes: RetinaNet P3-P7, the Faster R-CNN RPN P2-P6)."""
    try:
        spec = anchor_spec_for(arch, anchors, levels)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise UserError(f"bad anchors for {arch}: {exc}", where="model.anchors",
                        fix="one list of sizes per FPN level (RetinaNet P3-P7: 5, Faster R-CNN P2-P6: 5)") from None
    return AnchorGenerator(spec.sizes, (spec.aspect_ratios,) * len(spec.strides))


def retina_anchor_generator(anchors=None, levels: tuple[int, int] | None = None) -> AnchorGenerator:
    """RetinaNet anchors on its FPN levels (default P3-P7): the ModelSpec's `anchors`, or the reference's
    (4 x stride x 2^(i/3), 3 ratios)."""
    return anchor_generator("retinanet", anchors, levels)


class LastLevelP6(ExtraFPNBlock):
    """RetinaNet's P6 alone (a stride-2 3x3 conv of C5), for pyramids that end at P6."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        nn.init.kaiming_uniform_(self.p6.weight, a=1)  # as torchvision's LastLevelP6P7
        nn.init.constant_(self.p6.bias, 0)

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """Append P6 computed from C5."""
        return [*p, self.p6(c[-1])], [*names, "p6"]


def head_norm_layer(norm: str, width: int):
    """The head's norm layer: None (the reference), or GroupNorm with 32 groups (fewer when the width needs it) —
    per-level statistics for a head shared by all levels, as torchvision's RetinaNet v2 and FCOS use."""
    if norm == "none":
        return None
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if width % g == 0)
    return partial(nn.GroupNorm, groups)


def retina_head(width: int, num_anchors: int, num_classes: int, num_convs: int, norm: str = "none") -> RetinaNetHead:
    """torchvision's RetinaNetHead with `num_convs` conv(+GroupNorm)+ReLU layers in each subnet instead of 4."""
    if num_convs < 0:
        raise UserError(f"head_convs must be >= 0, got {num_convs}", where="model.head_convs")
    head = RetinaNetHead(width, num_anchors, num_classes)
    norm_layer = head_norm_layer(norm, width)
    for subnet in (head.classification_head, head.regression_head):
        subnet.conv = nn.Sequential(*(Conv2dNormActivation(width, width, norm_layer=norm_layer)
                                      for _ in range(num_convs)))
        for layer in subnet.conv.modules():
            if isinstance(layer, nn.Conv2d):  # torchvision's (and the reference's) head init
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:  # a conv followed by GroupNorm has none
                    nn.init.zeros_(layer.bias)
    return head


def build_retinanet(
    spec,
    num_classes: int,
    input_size: int,
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
) -> RetinaNet:
    """RetinaNet from a ModelSpec-like object; images arrive S x S in [0,1], so the transform's resize is a no-op."""
    levels = tuple(getattr(spec, "fpn_levels", None) or (3, 7))
    low, high = levels
    if high == 7:
        extra: ExtraFPNBlock = LastLevelP6P7(c5_channels(spec.backbone), spec.fpn_width)
        extra.use_P5 = False  # always from C5 (reference add_extra_convs='on_input'), even when C5 width == fpn_width
    else:
        extra = LastLevelP6(c5_channels(spec.backbone), spec.fpn_width)
    backbone = resnet_fpn(
        spec.backbone, spec.fpn_width, pretrained=spec.pretrained_backbone, norm=spec.norm,
        returned_layers=tuple(range(low - 1, 5)), extra_blocks=extra,  # ResNet layer k gives C_{k+1}
    )
    anchors = retina_anchor_generator(getattr(spec, "anchors", None), levels)
    assign = getattr(spec, "assign", None)
    model = RetinaNet(
        backbone,
        num_classes,
        min_size=input_size,
        max_size=input_size,
        anchor_generator=anchors,
        head=retina_head(spec.fpn_width, anchors.num_anchors_per_location()[0], num_classes, spec.head_convs,
                         getattr(spec, "head_norm", "none")),
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=topk_candidates,
        **({"fg_iou_thresh": assign.fg_iou, "bg_iou_thresh": assign.bg_iou} if assign is not None else {}),
    )
    # torchvision's switch for the regression loss (its own RetinaNet v2 sets "giou" the same way)
    model.head.regression_head._loss_type = getattr(spec, "box_loss", "l1")
    return model


def features_and_head(model: RetinaNet, images: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
    """FPN features and raw head outputs (cls_logits (B,A,C), bbox_regression (B,A,4)) of a [0,1] batch."""
    feats = fpn_features(model, model.transform.normalize(images))
    return feats, model.head(feats)


def match_anchors(model: RetinaNet, anchors: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
    """Per image, the GT index each anchor is matched to (-1 background, -2 ignored), as RetinaNet.compute_loss does."""
    matched = []
    for anchors_per_image, target in zip(anchors, targets):
        if target["boxes"].numel() == 0:
            matched.append(anchors_per_image.new_full((anchors_per_image.shape[0],), -1, dtype=torch.int64))
        else:
            matched.append(model.proposal_matcher(box_ops.box_iou(target["boxes"], anchors_per_image)))
    return matched


def retina_train_step(model: RetinaNet, images: ImageList, targets: list[dict[str, Tensor]]):
    """Detection losses of an already-transformed batch, plus what the implicit stream reuses.

    Returns (losses, features, (anchors, matched_idxs)); one target assignment serves both the detection loss
    and the KD label weights.
    """
    feats = fpn_features(model, images.tensors)
    head_out = model.head(feats)
    anchors = model.anchor_generator(images, feats)
    matched = match_anchors(model, anchors, targets)
    return model.head.compute_loss(targets, head_out, anchors, matched), feats, (anchors, matched)
