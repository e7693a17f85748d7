"""torchvision Faster R-CNN configured like the DS2D2 reference (MMDetection faster-rcnn r50 fpn defaults).

FPN P2-P6 (P6 = max-pool of P5), RPN anchors 8 x stride for strides 4..64 with ratios 0.5/1/2, 1000 proposals per
image in training and test, RoIAlign 7x7 with adaptive sampling on P2-P5, a shared 2-FC box head and a class-specific
box predictor. Labels in and out are 0-based class indices, as for RetinaNet: the background class torchvision's
RoI head needs at index 0 stays inside the model.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from distill.models.backbones import resnet_fpn
from distill.models.retinanet import anchor_generator
from distill.models.mmdet_variant import to_mmdet_variant
from runtime.errors import UserError

ROI_LEVELS = ("0", "1", "2", "3")  # RoIs are pooled from P2..P5, as in the reference
DEFAULT_REPRESENTATION = 1024  # Shared2FCBBoxHead fc_out_channels of the reference


def rpn_anchor_generator(anchors=None) -> AnchorGenerator:
    """RPN anchors of a ModelSpec's `anchors` (sizes per level P2-P6), or the reference's when None: one size
    8 x stride per level (strides 4..64), ratios 0.5/1/2."""
    return anchor_generator("faster_rcnn", anchors)


def shift_labels(targets: list[dict[str, Tensor]] | None, offset: int) -> list[dict[str, Tensor]] | None:
    """Targets with `offset` added to every label (0-based class index <-> torchvision's background-at-0 index)."""
    if targets is None:
        return None
    return [{**t, "labels": t["labels"] + offset} for t in targets]


class ZeroBasedFasterRCNN(FasterRCNN):
    """torchvision FasterRCNN that takes and returns 0-based class labels; background (index 0) stays internal."""

    def forward(self, images, targets=None):
        """Losses in training, detections (labels 0..C-1) in eval, like FasterRCNN."""
        out = super().forward(images, shift_labels(targets, 1))
        if isinstance(out, list):
            out = [{**det, "labels": det["labels"] - 1} for det in out]
        return out


def build_faster_rcnn(
    spec,
    num_classes: int,
    input_size: int,
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
    representation_size: int | None = None,
    mmdet_compat: bool | None = None,
) -> ZeroBasedFasterRCNN:
    """Faster R-CNN for a ModelSpec-like object and `num_classes` object classes (background is added inside).

    `representation_size` (the width of the two shared FCs; default the spec's `roi_fc_width` if it has one, else
    1024) and `mmdet_compat` (MMDetection's anchor / box-coder / RoIAlign conventions, for converted checkpoints;
    default the spec's `mmdet_compat`, else False) are the two settings a ModelSpec does not carry.
    `topk_candidates` is the RPN's per-level candidate count before NMS at test time.
    """
    representation_size = representation_size or getattr(spec, "roi_fc_width", None) or DEFAULT_REPRESENTATION
    if representation_size < 1:
        raise UserError(f"RoI head width must be positive, got {representation_size}", where="model.roi_fc_width")
    backbone = resnet_fpn(
        spec.backbone, spec.fpn_width, pretrained=spec.pretrained_backbone, norm=spec.norm,
        returned_layers=(1, 2, 3, 4), extra_blocks=LastLevelMaxPool(),
    )
    anchors = rpn_anchor_generator(getattr(spec, "anchors", None))
    assign = getattr(spec, "assign", None)
    pool = MultiScaleRoIAlign(list(ROI_LEVELS), output_size=7, sampling_ratio=0)
    model = ZeroBasedFasterRCNN(
        backbone,
        num_classes=None,
        min_size=input_size,
        max_size=input_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(spec.fpn_width, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=topk_candidates,
        rpn_post_nms_top_n_train=1000,  # reference rpn_proposal: nms_pre 2000, max_per_img 1000
        rpn_post_nms_top_n_test=1000,
        **({"rpn_fg_iou_thresh": assign.fg_iou, "rpn_bg_iou_thresh": assign.bg_iou} if assign is not None else {}),
        box_roi_pool=pool,
        box_head=TwoMLPHead(spec.fpn_width * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        box_score_thresh=score_thresh,
        box_nms_thresh=nms_thresh,
        box_detections_per_img=detections_per_img,
    )
    if mmdet_compat if mmdet_compat is not None else getattr(spec, "mmdet_compat", False):
        to_mmdet_variant(model)
    return model


def rcnn_train_step(model: FasterRCNN, images: ImageList, targets: list[dict[str, Tensor]]):
    """Detection losses of an already-transformed batch (0-based labels), plus what the implicit stream reuses.

    Runs RPN and RoI head like GeneralizedRCNN.forward in training, but keeps the RoIs sampled for the RoI loss.
    Returns (losses, FPN features as a list, state) with state = (sampled proposals per image, image sizes,
    feature-map names).
    """
    targets = shift_labels(targets, 1)
    feats = model.backbone(images.tensors)
    proposals, losses = model.rpn(images, feats, targets)
    heads = model.roi_heads
    proposals, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
    pooled = heads.box_roi_pool(feats, proposals, images.image_sizes)
    class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
    loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    losses = {**losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
    return losses, list(feats.values()), (proposals, images.image_sizes, list(feats.keys()))


def as_feature_dict(names: list[str], feats: list[Tensor]) -> OrderedDict[str, Tensor]:
    """FPN maps as the name -> map dict torchvision's RoI pooling expects."""
    return OrderedDict(zip(names, feats, strict=True))
