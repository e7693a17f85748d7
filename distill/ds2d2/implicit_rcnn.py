"""DS2D2 for Faster R-CNN: the high-frequency amplifier detector (stage 2) and the two-stage implicit stream (stage 3).

The FasterRCNN entry of distill.tasks.ARCH_MODULES (same interface as implicit_retina: NUM_LEVELS, PKD_WEIGHT,
train_step, amplifier_model, amplifier_part, ImplicitStream).

Stage 2, as the reference's DS2D2_FasterRCNN_Amplifier: the teacher's backbone + FPN frozen, an RPN and a RoI head
initialised from the teacher's and trained with the normal detection losses on hf(F). Stage 3 uses its RoI head.

Stage 3: both amplifiers are RoI box heads run on the RoIs sampled for the student's own RoI loss: the frozen teacher
RoI head on F (full frequency) and the frozen stage-2 RoI head on hf(F). Per amplifier, as the reference computes it:
- cls: 0.5 * T^2 * KL(softmax(t/T) || softmax(s/T)) summed over classes and **summed over the sampled RoIs** (the
  reference passes the RoI count as the `weight` of a mean-reduced loss: mean x N_rois). This is why the paper's
  Faster R-CNN implicit weights are small (1e-5 DIOR, 1.5e-3 / 3e-3 DOTA): they multiply a sum over ~1024 RoIs;
- box: L1 between the student's and the teacher's deltas of the foreground class the teacher rates highest, each RoI
  weighted by that teacher probability, normalised by 4 x the sum of the weights.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead

from distill.ds2d2.haar import high_frequency
from distill.ds2d2.hf_backbone import HighFrequencyBackbone
from distill.models.faster_rcnn import as_feature_dict
from distill.models.faster_rcnn import rcnn_train_step as train_step  # noqa: F401  (the arch-module interface)

NUM_LEVELS = 5  # P2..P6 (P6 = the max-pool level)
PKD_WEIGHT = 6.0  # mmrazor pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco: loss_weight 6 on FPN levels 0-3
DEFAULT_TEMPERATURE = 3.0
KL_LOSS_WEIGHT = 0.5  # the reference's KD_KLDivLoss(class_reduction='sum', T=3, loss_weight=0.5)


def amplifier_model(teacher: FasterRCNN, init_from_teacher: bool = True) -> FasterRCNN:
    """The stage-2 detector: the teacher's backbone + FPN (shared, frozen, hf() applied) + trainable copies of its RPN
    and RoI heads, starting from the teacher's weights (the reference loads teacher.pth) or freshly initialised.

    Its state_dict holds `backbone.frozen.*`, `rpn.*` and `roi_heads.*`: a complete detector on hf(F) that evaluates
    like any other. Note: this freezes the teacher's backbone in place (it is shared, not copied).
    """
    model = copy.deepcopy(teacher, memo={id(teacher.backbone): teacher.backbone})  # copy all but the backbone
    model.backbone = HighFrequencyBackbone(teacher.backbone)
    if not init_from_teacher:
        device = next(teacher.parameters()).device
        rpn_head, heads = model.rpn.head, model.roi_heads
        model.rpn.head = RPNHead(rpn_head.conv[0][0].in_channels, rpn_head.cls_logits.out_channels).to(device)
        fc6, fc7, predictor = heads.box_head.fc6, heads.box_head.fc7, heads.box_predictor
        heads.box_head = TwoMLPHead(fc6.in_features, fc7.out_features).to(device)
        heads.box_predictor = FastRCNNPredictor(predictor.cls_score.in_features,
                                                predictor.cls_score.out_features).to(device)
    model.rpn.requires_grad_(True)
    model.roi_heads.requires_grad_(True)
    return model


def amplifier_part(model: FasterRCNN) -> nn.Module:
    """What the student stage uses from the stage-2 detector: its RoI heads (trained on hf(F))."""
    return model.roi_heads


def roi_outputs(heads: nn.Module, feats: dict[str, Tensor], proposals: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Class logits (K, C+1) and class-specific deltas (K, (C+1)*4) of a RoI head for the given boxes."""
    pooled = heads.box_roi_pool(feats, proposals, image_sizes)
    return heads.box_predictor(heads.box_head(pooled))


def rcnn_kd_terms(s_cls: Tensor, s_box: Tensor, t_cls: Tensor, t_box: Tensor,
                  temperature: float = DEFAULT_TEMPERATURE) -> tuple[Tensor, Tensor]:
    """(cls, box) KD losses on K RoIs, class index 0 = background (torchvision layout).

    cls: 0.5 * T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes and over the K RoIs.
    box: sum over RoIs of w * |s_delta - t_delta| (4 coordinates, class c = the foreground class the teacher rates
    highest, w = its softmax probability at T = 1) divided by 4 x the sum of w.
    """
    s_cls, s_box = s_cls.float(), s_box.float()
    t_cls, t_box = t_cls.float().detach(), t_box.float().detach()
    if s_cls.shape[0] == 0:
        zero = s_cls.sum() + s_box.sum()
        return zero, zero
    kl = F.kl_div(F.log_softmax(s_cls / temperature, dim=1), F.softmax(t_cls / temperature, dim=1),
                  reduction="none").sum(dim=1)
    cls = KL_LOSS_WEIGHT * temperature**2 * kl.sum()
    weight, best = t_cls.softmax(dim=1)[:, 1:].max(dim=1)
    rows = torch.arange(len(best), device=best.device)
    s_sel = s_box.reshape(len(best), -1, 4)[rows, best + 1]
    t_sel = t_box.reshape(len(best), -1, 4)[rows, best + 1]
    box = (weight[:, None] * (s_sel - t_sel).abs()).sum() / (4 * weight.sum() + torch.finfo(torch.float32).eps)
    return cls, box


class ImplicitStream(nn.Module):
    """Both Faster R-CNN amplifiers (frozen teacher RoI head on F, frozen stage-2 RoI head on hf(F)) as KD terms.

    `distill` (runtime.config.DistillConfig): weights.implicit_full / implicit_high scale cls and box of their
    amplifier (the reference); the optional implicit_*_box give the box term its own weight; temperature: the KL's T.
    """

    def __init__(self, teacher: FasterRCNN, amplifier_heads: nn.Module, distill):
        super().__init__()
        self.full_heads, self.high_heads = teacher.roi_heads, amplifier_heads
        self.weights = {name: distill.weights.implicit(name) for name in ("full", "high")}
        self.temperature = distill.temperature

    def forward(self, student: list[Tensor], teacher: list[Tensor], state) -> dict[str, Tensor]:
        """`student` FPN maps at the teacher's width; `state` = (sampled RoIs per image, image sizes, level names)."""
        proposals, image_sizes, names = state
        proposals = [p.detach() for p in proposals]
        terms = {}
        for name, heads, prep in (("full", self.full_heads, lambda f: f), ("high", self.high_heads, high_frequency)):
            s_feats = as_feature_dict(names, [prep(f) for f in student])
            with torch.no_grad():
                t_feats = as_feature_dict(names, [prep(f) for f in teacher])
                t_cls, t_box = roi_outputs(heads, t_feats, proposals, image_sizes)
            s_cls, s_box = roi_outputs(heads, s_feats, proposals, image_sizes)
            cls, box = rcnn_kd_terms(s_cls, s_box, t_cls, t_box, self.temperature)
            w_cls, w_box = self.weights[name]
            terms[f"kd_implicit_{name}_cls"] = w_cls * cls
            terms[f"kd_implicit_{name}_box"] = w_box * box
        return terms
