"""DS2D2 explicit stream: DISW-weighted MSE between the Haar low bands and between the high bands, per FPN level."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill.ds2d2.disw import disw_weights
from distill.ds2d2.haar import haar_split


class ExplicitStream(nn.Module):
    """L_low = mean(W (LL_s - LL_t)^2) and L_high = mean(W (H_s - H_t)^2), summed over levels, times their weights."""

    def __init__(self, weight_low: float, weight_high: float):
        super().__init__()
        self.weight_low, self.weight_high = weight_low, weight_high

    def forward(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], boxes: Sequence[Tensor], padded_hw: Sequence[int]
    ) -> dict[str, Tensor]:
        """`student` already adapted to the teacher's width; `boxes` per image, xyxy in padded-input pixels."""
        low = high = 0.0
        for s, t in zip(student, teacher, strict=True):
            ll_s, h_s = haar_split(s.float())
            ll_t, h_t = haar_split(t.float())
            weight = disw_weights(boxes, ll_s.shape[-2:], padded_hw)  # (B,1,h,w)
            low = low + (weight * (ll_s - ll_t) ** 2).mean()
            high = high + (weight.unsqueeze(2) * (h_s - h_t) ** 2).mean()
        return {"kd_explicit_low": self.weight_low * low, "kd_explicit_high": self.weight_high * high}
