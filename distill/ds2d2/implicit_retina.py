"""DS2D2 for RetinaNet: the high-frequency amplifier detector (stage 2) and the implicit stream (stage 3).

This module is the RetinaNet entry of distill.tasks.ARCH_MODULES; an arch module provides NUM_LEVELS,
`train_step(model, images, targets) -> (losses, features, state)`, `amplifier_model(teacher, init_from_teacher)`,
`amplifier_part(amplifier_model)` and `ImplicitStream(teacher, amplifier_part, weights)` whose forward takes
(student features at teacher width, teacher features, state) and returns weighted loss terms.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.ops import generalized_box_iou_loss

from distill.ds2d2.haar import high_frequency
from distill.models.heads import head_type, retina_head
from distill.models.retinanet import retina_train_step as train_step  # noqa: F401  (the arch-module interface)

NUM_LEVELS = 5  # P3..P7


class HighFrequencyBackbone(nn.Module):
    """A frozen backbone + FPN whose outputs are hf(P_l): what the stage-2 head sees and is trained on."""

    def __init__(self, frozen: nn.Module):
        super().__init__()
        self.frozen = frozen.requires_grad_(False).eval()
        self.out_channels = frozen.out_channels

    def train(self, mode: bool = True) -> "HighFrequencyBackbone":
        """Switch the wrapper only; the frozen backbone stays in eval mode (its BN statistics never move)."""
        super().train(mode)
        self.frozen.eval()
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """hf() of every FPN level, without gradients (nothing below the head is trained)."""
        return OrderedDict((name, high_frequency(f)) for name, f in self.frozen(x).items())


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
                                 len(cls_head.conv), head_type(teacher.head)).to(next(teacher.parameters()).device)
    model.head.requires_grad_(True)
    return model


def amplifier_part(model: RetinaNet) -> nn.Module:
    """What the student stage uses from the stage-2 detector: its head."""
    return model.head


class ImplicitStream(nn.Module):
    """Both RetinaNet amplifiers (frozen teacher head on F, frozen stage-2 head on hf(F)) as KD loss terms."""

    def __init__(self, teacher: RetinaNet, amplifier_head: nn.Module, weights, beta: float = 1.0):
        super().__init__()
        self.full_head, self.high_head = teacher.head, amplifier_head
        self.box_coder = teacher.box_coder
        self.weight_full, self.weight_high, self.beta = weights.implicit_full, weights.implicit_high, beta

    def forward(self, student: list[Tensor], teacher: list[Tensor], state) -> dict[str, Tensor]:
        """Weighted KD terms; `student` at the teacher's width, `state` = the student's (anchors, matched GT idx)."""
        anchors, matched = state
        matched = torch.cat(matched)
        label_weight = (matched != self.full_head.classification_head.BETWEEN_THRESHOLDS).float()
        num_pos = (matched >= 0).sum().clamp(min=1).float()
        anchors = torch.cat(anchors)
        terms = {}
        for name, head, weight, prep in (
            ("full", self.full_head, self.weight_full, lambda f: f),
            ("high", self.high_head, self.weight_high, high_frequency),
        ):
            s_out = head([prep(f) for f in student])
            with torch.no_grad():
                t_out = head([prep(f) for f in teacher])
            cls, box = self._kd(s_out, t_out, anchors, label_weight)
            terms[f"kd_implicit_{name}_cls"] = weight * cls / num_pos
            terms[f"kd_implicit_{name}_box"] = weight * box / num_pos
        return terms

    def _kd(self, s_out: dict, t_out: dict, anchors: Tensor, label_weight: Tensor) -> tuple[Tensor, Tensor]:
        # Soft quality-focal cls loss against the teacher's probabilities; GIoU between boxes decoded from the same
        # anchors, weighted by the teacher's confidence. Both are sums; the caller divides by the positives.
        s_logit = s_out["cls_logits"].float().flatten(0, 1)
        t_prob = t_out["cls_logits"].float().flatten(0, 1).sigmoid()
        focal = (s_logit.sigmoid() - t_prob).abs().pow(self.beta)
        cls = F.binary_cross_entropy_with_logits(s_logit, t_prob, reduction="none") * focal
        s_box = self.box_coder.decode_single(s_out["bbox_regression"].float().flatten(0, 1), anchors)
        t_box = self.box_coder.decode_single(t_out["bbox_regression"].float().flatten(0, 1), anchors)
        box = generalized_box_iou_loss(s_box, t_box, reduction="none") * t_prob.max(dim=1).values
        return (cls.sum(dim=1) * label_weight).sum(), box.sum()
