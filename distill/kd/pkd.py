"""PKD (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient").

Each channel of the student and of the teacher map is standardised over batch and positions (zero mean, unit
variance, unbiased std as mmrazor's PKDLoss), then the MSE between the two is halved; summed over the distilled levels.
Minimising it maximises the Pearson correlation of student and teacher features, whatever their scales, which is why
mmrazor can use one weight (RetinaNet 10, Faster R-CNN 6) across detectors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

STD_EPS = 1e-6  # mmrazor's: added to the std, so a constant channel maps to zeros instead of NaN


def standardise(x: Tensor) -> Tensor:
    """(C, B*H*W): each channel of a (B,C,H,W) map at zero mean and unit (unbiased) std over batch and positions."""
    flat = x.float().transpose(0, 1).flatten(1)
    correction = 1 if flat.shape[1] > 1 else 0  # a single value (1x1 map, one image) has no unbiased std
    mean = flat.mean(dim=1, keepdim=True)
    return (flat - mean) / (flat.std(dim=1, keepdim=True, correction=correction) + STD_EPS)


def pkd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """sum over levels of MSE(standardise(S'), standardise(T)) / 2."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        total = total + F.mse_loss(standardise(s), standardise(t.detach())) / 2
    return total
