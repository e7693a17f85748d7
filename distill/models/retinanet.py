"""torchvision RetinaNet configured like the DS2D2 reference (P3-P7 with P6/P7 from C5, 3x3 anchors, N head convs)."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from distill.models.backbones import backbone_fpn, c5_channels, fpn_features
from distill.models.heads import retina_head

STRIDES = (8, 16, 32, 64, 128)


def retina_anchor_generator() -> AnchorGenerator:
    """Anchors of the reference: base size 4x stride, 3 scales per octave, ratios 0.5/1/2, strides 8..128."""
    sizes = tuple(tuple(4 * s * 2 ** (i / 3) for i in range(3)) for s in STRIDES)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


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
    extra = LastLevelP6P7(c5_channels(spec.backbone), spec.fpn_width)
    extra.use_P5 = False  # always from C5 (reference add_extra_convs='on_input'), even when C5 width == fpn_width
    backbone = backbone_fpn(
        spec.backbone, spec.fpn_width, pretrained=spec.pretrained_backbone, norm=spec.norm,
        returned_layers=(2, 3, 4), extra_blocks=extra,
    )
    anchors = retina_anchor_generator()
    return RetinaNet(
        backbone,
        num_classes,
        min_size=input_size,
        max_size=input_size,
        anchor_generator=anchors,
        head=retina_head(spec.fpn_width, anchors.num_anchors_per_location()[0], num_classes, spec.head_convs,
                         getattr(spec, "head", "conv")),
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=topk_candidates,
    )


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
