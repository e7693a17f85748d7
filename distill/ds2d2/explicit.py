"""DS2D2 explicit stream: DISW-weighted MSE between the Haar low bands and between the high bands, per FPN level.

`norm="raw"` is the reference: L_low = sum over levels of mean(W (LL_s - LL_t)^2), L_high alike with the three high
bands. Their size follows the feature scale (the paper's 1e-5 suits MMDetection's R101/R18 features, the CPU demo's
narrower from-scratch FPN needed 5e-5 / 2e-4). `norm="teacher_energy"` divides each level's term by the detached
mean square of the teacher's band (mean(LL_t^2), resp. mean(H_t^2)): the terms become relative errors of order one
at the start of training whatever the backbone and width, so one set of weights transfers.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill.ds2d2.disw import disw_weights
from distill.ds2d2.haar import haar_split

EXPLICIT_NORMS = ("raw", "teacher_energy")
ENERGY_EPS = 1e-12  # an all-zero teacher band (a dead level) must not divide by zero


class ExplicitStream(nn.Module):
    """weight_low * L_low and weight_high * L_high, as `kd_explicit_low` / `kd_explicit_high`."""

    def __init__(self, weight_low: float, weight_high: float, norm: str = "raw"):
        super().__init__()
        if norm not in EXPLICIT_NORMS:
            raise ValueError(f"unknown explicit-stream normalisation {norm!r}; use one of {EXPLICIT_NORMS}")
        self.weight_low, self.weight_high, self.norm = weight_low, weight_high, norm

    def forward(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], boxes: Sequence[Tensor], padded_hw: Sequence[int]
    ) -> dict[str, Tensor]:
        """`student` already adapted to the teacher's width; `boxes` per image, xyxy in padded-input pixels."""
        low = high = 0.0
        for s, t in zip(student, teacher, strict=True):
            ll_s, h_s = haar_split(s.float())
            ll_t, h_t = haar_split(t.float().detach())
            weight = disw_weights(boxes, ll_s.shape[-2:], padded_hw)  # (B,1,h,w)
            level_low = (weight * (ll_s - ll_t) ** 2).mean()
            level_high = (weight.unsqueeze(2) * (h_s - h_t) ** 2).mean()
            if self.norm == "teacher_energy":
                level_low = level_low / (ll_t.pow(2).mean() + ENERGY_EPS)
                level_high = level_high / (h_t.pow(2).mean() + ENERGY_EPS)
            low, high = low + level_low, high + level_high
        return {"kd_explicit_low": self.weight_low * low, "kd_explicit_high": self.weight_high * high}
