"""The stage-2 input: a frozen teacher backbone + FPN whose outputs are hf(P) of every level (both detectors)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from distill.ds2d2.haar import high_frequency


class HighFrequencyBackbone(nn.Module):
    """Wraps the teacher's backbone + FPN: frozen, always in eval mode, returning hf() of each FPN map."""

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
        """hf() of every FPN level, without gradients (nothing below the amplifier's heads is trained)."""
        return OrderedDict((name, high_frequency(f)) for name, f in self.frozen(x).items())
