"""DS2D2 for RetinaNet: the high-frequency amplifier detector (stage 2) and the implicit stream (stage 3).

This module is the RetinaNet entry of distill.tasks.ARCH_MODULES; an arch module provides NUM_LEVELS, PKD_WEIGHT,
`train_step(model, images, targets) -> (losses, features, state)`, `amplifier_model(teacher, init_from_teacher)`,
`amplifier_part(amplifier_model)` and `ImplicitStream(teacher, amplifier_part, distill)` whose forward takes
(student features at teacher width, teacher features, state) and returns weighted loss terms.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou_loss

from distill.ds2d2.haar import high_frequency
from distill.ds2d2.hf_backbone import HighFrequencyBackbone
from distill.models.retinanet import retina_head
from distill.models.retinanet import retina_train_step as train_step  # noqa: F401  (the arch-module interface)

NUM_LEVELS = 5  # P3..P7
PKD_WEIGHT = 10.0  # mmrazor pkd_fpn_retina_x101_retina_r50_2x_coco: loss_weight 10 on FPN levels 0-3
FOCAL_BETA = 1.0  # the reference's KD_QualityFocalLoss beta


def amplifier_model(teacher: RetinaNet, init_from_teacher: bool = True) -> RetinaNet:
    """The stage-2 detector: the teacher's backbone (shared, frozen, hf() applied) + a trainable copy of its head.

    The head starts as the teacher's (the reference) or freshly initialised. The state_dict holds the teacher
    backbone under `backbone.frozen.*` and the amplifier head under `head.*`: the checkpoint is self-contained and
    evaluates like any detector. Note: this freezes the teacher's backbone in place (it is shared, not copied).
    """
    model = copy.deepcopy(teacher, memo={id(teacher.backbone): teacher.backbone})  # copy all but the backbone
    model.backbone = HighFrequencyBackbone(teacher.backbone)
    if not init_from_teacher:
        cls_head = teacher.head.classification_head
        model.head = retina_head(teacher.backbone.out_channels, cls_head.num_anchors, cls_head.num_classes,
                                 len(cls_head.conv)).to(next(teacher.parameters()).device)
    model.head.requires_grad_(True)
    return model


def amplifier_part(model: RetinaNet) -> nn.Module:
    """What the student stage uses from the stage-2 detector: its head."""
    return model.head


def retina_kd_terms(s_out: dict[str, Tensor], t_out: dict[str, Tensor], anchors: Tensor, label_weight: Tensor,
                    box_coder: BoxCoder, beta: float = FOCAL_BETA) -> tuple[Tensor, Tensor]:
    """Unnormalised (cls, box) KD sums over all anchors of the batch (the caller divides by the positives).

    cls: BCEWithLogits(s, sigmoid(t)) * |sigmoid(s) - sigmoid(t)|^beta, summed over classes, times the anchor's label
    weight (0 for anchors the assigner ignores). box: GIoU loss between the boxes decoded from the student's and the
    teacher's deltas on the same anchors, times sigmoid(max over classes of the teacher logits).
    `s_out`/`t_out`: RetinaNet head outputs (cls_logits (B,A,C), bbox_regression (B,A,4)); anchors (B*A, 4).
    """
    s_logit = s_out["cls_logits"].float().flatten(0, 1)
    t_logit = t_out["cls_logits"].float().flatten(0, 1).detach()
    t_prob = t_logit.sigmoid()
    focal = (s_logit.sigmoid() - t_prob).abs().pow(beta)
    cls = F.binary_cross_entropy_with_logits(s_logit, t_prob, reduction="none") * focal
    s_box = box_coder.decode_single(s_out["bbox_regression"].float().flatten(0, 1), anchors)
    t_box = box_coder.decode_single(t_out["bbox_regression"].float().flatten(0, 1).detach(), anchors)
    box = generalized_box_iou_loss(s_box, t_box, reduction="none") * t_logit.max(dim=1).values.sigmoid()
    return (cls.sum(dim=1) * label_weight).sum(), box.sum()


class ImplicitStream(nn.Module):
    """Both RetinaNet amplifiers (frozen teacher head on F, frozen stage-2 head on hf(F)) as KD loss terms.

    `distill` (runtime.config.DistillConfig): weights.implicit_full / implicit_high scale cls and box of their
    amplifier (the reference); the optional implicit_*_box give the box term its own weight.
    """

    def __init__(self, teacher: RetinaNet, amplifier_head: nn.Module, distill, beta: float = FOCAL_BETA):
        super().__init__()
        self.full_head, self.high_head = teacher.head, amplifier_head
        self.box_coder = teacher.box_coder
        self.weights = {name: distill.weights.implicit(name) for name in ("full", "high")}
        self.beta = beta

    def forward(self, student: list[Tensor], teacher: list[Tensor], state) -> dict[str, Tensor]:
        """Weighted KD terms; `student` at the teacher's width, `state` = the student's (anchors, matched GT idx)."""
        anchors, matched = state
        matched = torch.cat(matched)
        label_weight = (matched != self.full_head.classification_head.BETWEEN_THRESHOLDS).float()
        num_pos = (matched >= 0).sum().clamp(min=1).float()
        anchors = torch.cat(anchors)
        terms = {}
        for name, head, prep in (("full", self.full_head, lambda f: f), ("high", self.high_head, high_frequency)):
            s_out = head([prep(f) for f in student])
            with torch.no_grad():
                t_out = head([prep(f) for f in teacher])
            cls, box = retina_kd_terms(s_out, t_out, anchors, label_weight, self.box_coder, self.beta)
            w_cls, w_box = self.weights[name]
            terms[f"kd_implicit_{name}_cls"] = w_cls * cls / num_pos
            terms[f"kd_implicit_{name}_box"] = w_box * box / num_pos
        return terms

