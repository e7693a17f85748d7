"""The 1x1 adapter mapping student FPN maps to the teacher's width (training only; never exported)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from runtime.errors import UserError

ADAPTER_MODES = ("shared", "per_level")


class FeatureAdapter(nn.Module):
    """1x1 conv without bias, C_student -> C_teacher, one shared by all levels (reference) or one per level."""

    def __init__(self, student_width: int, teacher_width: int, num_levels: int, mode: str = "shared"):
        super().__init__()
        if mode not in ADAPTER_MODES:
            raise UserError(f"unknown adapter mode {mode!r}", where="distill.adapter",
                            fix=f"use one of {ADAPTER_MODES}")
        count = 1 if mode == "shared" else num_levels
        self.mode, self.num_levels = mode, num_levels
        self.convs = nn.ModuleList(nn.Conv2d(student_width, teacher_width, 1, bias=False) for _ in range(count))

    @torch.no_grad()
    def init_identity(self) -> "FeatureAdapter":
        """Set every conv to the identity on the shared channels (zeros elsewhere); used when widths are equal."""
        for conv in self.convs:
            conv.weight.zero_()
            n = min(conv.in_channels, conv.out_channels)
            conv.weight[torch.arange(n), torch.arange(n), 0, 0] = 1.0
        return self

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """Adapt each level's map with its conv (the same conv for all levels when shared)."""
        return [self.convs[0 if len(self.convs) == 1 else i](f) for i, f in enumerate(feats)]
