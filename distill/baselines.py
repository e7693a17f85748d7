"""Feature-distillation baselines run in the same harness as DS2D2: FitNet and PKD, summed over FPN levels."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def fitnet_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """FitNet: plain MSE between adapted student maps and teacher maps, no weighting."""
    return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True))


def _standardise(x: Tensor, eps: float = 1e-6) -> Tensor:
    # Per channel over batch and positions (as PKD does); the biased std keeps a 1x1 P7 of one image finite.
    flat = x.float().transpose(0, 1).flatten(1)
    return (flat - flat.mean(-1, keepdim=True)) / (flat.std(-1, keepdim=True, unbiased=False) + eps)


def pkd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """PKD (Pearson correlation): MSE between channel-wise standardised student and teacher maps, halved as in PKD."""
    return sum(F.mse_loss(_standardise(s), _standardise(t)) / 2 for s, t in zip(student, teacher, strict=True))
