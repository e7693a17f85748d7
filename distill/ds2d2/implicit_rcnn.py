"""DS2D2 for Faster R-CNN: the high-frequency RoI-head amplifier (stage 2) and the two-stage implicit stream (stage 3).

The FasterRCNN entry of distill.tasks.ARCH_MODULES (same interface as implicit_retina: NUM_LEVELS, train_step,
amplifier_model, amplifier_part, ImplicitStream). Both amplifiers are RoI box heads, run on the RoIs sampled for the
student's own RoI loss: the frozen teacher RoI head on F (full frequency) and the frozen stage-2 head on hf(F).

Two deliberate differences from the reference code:
- the reference passes the RoI count as the KL loss's *weight* argument (so its cls term is a sum over RoIs, which is
  why its Faster R-CNN implicit weights are ~1e-5); here the KL term is averaged over RoIs as the spec says;
- in stage 2 the reference trains a new RPN on hf(F); here the teacher's RPN stays frozen on F (as the lead's brief
  asks), so the amplifier head learns on the teacher's own proposals. Only the RoI head is used in stage 3 anyway.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from distill.ds2d2.haar import high_frequency
from distill.models.faster_rcnn import as_feature_dict
from distill.models.faster_rcnn import rcnn_train_step as train_step  # noqa: F401  (the arch-module interface)

NUM_LEVELS = 5  # P2..P6 (P6 = the max-pool level)
DEFAULT_TEMPERATURE = 3.0
KL_LOSS_WEIGHT = 0.5


class FrozenPart(nn.Module):
    """A module that stays in eval mode and runs without gradients (teacher backbone + FPN, RPN in stage 2)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.frozen = module.requires_grad_(False).eval()
        self.out_channels = getattr(module, "out_channels", None)

    def train(self, mode: bool = True) -> "FrozenPart":
        """Switch the wrapper only; the wrapped module stays in eval mode (BN statistics, RPN test settings)."""
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, *args, **kwargs):
        """The wrapped module's output, computed under no_grad."""
        with torch.no_grad():
            return self.frozen(*args, **kwargs)


class HighFrequencyRoIPool(nn.Module):
    """RoI pooling on hf(F): applies the Haar high-frequency map to the pooled FPN levels, then the wrapped pooler."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool
        self.featmap_names, self.output_size = pool.featmap_names, pool.output_size

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """(K, C, 7, 7) features of hf(F) for the boxes."""
        hf = OrderedDict((k, high_frequency(v)) for k, v in x.items() if k in self.featmap_names)
        return self.pool(hf, boxes, image_shapes)


def amplifier_model(teacher: FasterRCNN, init_from_teacher: bool = True) -> FasterRCNN:
    """The stage-2 detector: teacher backbone + FPN and RPN (shared, frozen, on F) + a trainable copy of its RoI
    heads pooling from hf(F), starting from the teacher's weights (the reference) or freshly initialised.

    Its state_dict holds `backbone.frozen.*`, `rpn.frozen.*` and `roi_heads.*`. Note: this freezes the teacher's
    backbone and RPN in place (they are shared, not copied).
    """
    shared = {id(teacher.backbone): teacher.backbone, id(teacher.rpn): teacher.rpn}
    model = copy.deepcopy(teacher, memo=shared)  # copies the transform and RoI heads, shares backbone and RPN
    model.backbone, model.rpn = FrozenPart(teacher.backbone), FrozenPart(teacher.rpn)
    heads = model.roi_heads
    if not init_from_teacher:
        fc6, fc7, predictor = heads.box_head.fc6, heads.box_head.fc7, heads.box_predictor
        heads.box_head = TwoMLPHead(fc6.in_features, fc7.out_features).to(fc6.weight.device)
        heads.box_predictor = FastRCNNPredictor(predictor.cls_score.in_features,
                                                predictor.cls_score.out_features).to(fc6.weight.device)
    heads.box_roi_pool = HighFrequencyRoIPool(heads.box_roi_pool)
    model.roi_heads.requires_grad_(True)
    return model


def amplifier_part(model: FasterRCNN) -> nn.Module:
    """What the student stage uses from the stage-2 detector: its RoI heads (pooling from hf(F))."""
    return model.roi_heads


def roi_outputs(heads: nn.Module, feats: dict[str, Tensor], proposals: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Class logits (K, C+1) and class-specific deltas (K, (C+1)*4) of a RoI head for the given boxes."""
    pooled = heads.box_roi_pool(feats, proposals, image_sizes)
    return heads.box_predictor(heads.box_head(pooled))


def rcnn_kd_terms(s_cls: Tensor, s_box: Tensor, t_cls: Tensor, t_box: Tensor,
                  temperature: float = DEFAULT_TEMPERATURE) -> tuple[Tensor, Tensor]:
    """(cls, box) KD losses on RoIs, class index 0 = background (torchvision layout).

    cls: 0.5 * T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over RoIs.
    box: L1 between student and teacher deltas of the foreground class the teacher rates highest, each RoI weighted
    by that (T = 1) teacher probability, normalised by 4 x the sum of the weights.
    """
    s_cls, s_box, t_cls, t_box = s_cls.float(), s_box.float(), t_cls.float(), t_box.float()
    if s_cls.shape[0] == 0:
        zero = s_cls.sum() + s_box.sum()
        return zero, zero
    kl = F.kl_div(F.log_softmax(s_cls / temperature, dim=1), F.softmax(t_cls / temperature, dim=1),
                  reduction="none").sum(dim=1)
    cls = KL_LOSS_WEIGHT * temperature**2 * kl.mean()
    weight, best = t_cls.softmax(dim=1)[:, 1:].max(dim=1)
    rows = torch.arange(len(best), device=best.device)
    s_sel = s_box.reshape(len(best), -1, 4)[rows, best + 1]
    t_sel = t_box.reshape(len(best), -1, 4)[rows, best + 1]
    box = (weight[:, None] * (s_sel - t_sel).abs()).sum() / (4 * weight.sum() + torch.finfo(torch.float32).eps)
    return cls, box


class ImplicitStream(nn.Module):
    """Both Faster R-CNN amplifiers (frozen teacher RoI head on F, frozen stage-2 RoI head on hf(F)) as KD terms."""

    def __init__(self, teacher: FasterRCNN, amplifier_heads: nn.Module, weights):
        super().__init__()
        self.full_heads, self.high_heads = teacher.roi_heads, amplifier_heads
        self.weight_full, self.weight_high = weights.implicit_full, weights.implicit_high
        self.temperature = float(getattr(weights, "temperature", DEFAULT_TEMPERATURE))

    def forward(self, student: list[Tensor], teacher: list[Tensor], state) -> dict[str, Tensor]:
        """`student` FPN maps at the teacher's width; `state` = (sampled RoIs per image, image sizes, level names)."""
        proposals, image_sizes, names = state
        proposals = [p.detach() for p in proposals]
        s_feats, t_feats = as_feature_dict(names, student), as_feature_dict(names, teacher)
        terms = {}
        for name, heads, weight in (("full", self.full_heads, self.weight_full),
                                    ("high", self.high_heads, self.weight_high)):
            s_cls, s_box = roi_outputs(heads, s_feats, proposals, image_sizes)
            with torch.no_grad():
                t_cls, t_box = roi_outputs(heads, t_feats, proposals, image_sizes)
            cls, box = rcnn_kd_terms(s_cls, s_box, t_cls, t_box, self.temperature)
            terms[f"kd_implicit_{name}_cls"] = weight * cls
            terms[f"kd_implicit_{name}_box"] = weight * box
        return terms
