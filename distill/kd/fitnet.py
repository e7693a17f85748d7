"""FitNet on detection features: plain MSE between the adapted student FPN maps and the teacher's, summed over levels.

FitNet has no canonical weight for detection features; it gets the scaling rule DS2D2's explicit stream uses on the
same pipeline. With `normalize=True` (the pipeline's `explicit_norm: teacher_energy`) each level's MSE is divided by
the detached mean square of the teacher map, exactly as the explicit stream divides by the teacher band energy.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

ENERGY_EPS = 1e-12  # keeps an all-zero teacher map (e.g. a dead level) from dividing by zero


def fitnet_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], normalize: bool = False) -> Tensor:
    """sum over levels of mean((S' - T)^2), each divided by mean(T^2) (no gradient) when ``normalize``."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.float()
        term = F.mse_loss(s, t)
        if normalize:
            term = term / (t.detach().pow(2).mean() + ENERGY_EPS)
        total = total + term
    return total
