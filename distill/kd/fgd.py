"""FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022), as mmrazor's FGDLoss.

Per distilled FPN level, with the student map S (adapted to the teacher's width) and the teacher map T:
- attention of a map F: spatial A_S = H*W * softmax over positions of mean_c|F| / temp, channel A_C = C * softmax over
  channels of mean_hw|F| / temp;
- scale mask M_fg: every ground-truth box projected on the level's grid (scale = grid / padded input, x1 and y1
  floored, x2 and y2 ceiled, inclusive range) gives its cells 1/(its cell count); where boxes overlap the largest value
  stays, so small objects win. M_bg = 1 on the cells no box covers, divided by their number (per image);
- focal terms: alpha * sum(M_fg (S-T)^2 A_S(T) A_C(T)) / B and beta * the same with M_bg;
- attention term: gamma * (sum|A_C(S) - A_C(T)| + sum|A_S(S) - A_S(T)|) / B;
- global term: lambda * sum((GC_s(S) - GC_t(T))^2) / B, GC(F) = F + a GCNet context block (attention pooling to
  one vector per map, then a 1x1 bottleneck with LayerNorm and ReLU); student and teacher have their own block,
  both learnt with the student (training only: never exported, checkpointed for exact resume).
B is the batch size. Defaults (mmrazor's RetinaNet setting): temp 0.5, alpha 1e-3, beta 5e-4, gamma 5e-4,
lambda 5e-6, one loss per FPN level.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class GlobalContext(nn.Module):
    """F + transform(context(F)): GCNet's context block, FGD's relation module for one map."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(nn.Conv2d(channels, hidden, kernel_size=1), nn.LayerNorm([hidden, 1, 1]),
                                       nn.ReLU(), nn.Conv2d(hidden, channels, kernel_size=1))
        # FGD's initialisation: Kaiming (fan-in) for the pooling mask, and a zero last layer so the block starts as F
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B,C,H,W) -> (B,C,H,W): the map plus its transformed global context vector."""
        weights = self.mask(x).flatten(2).softmax(dim=2)  # (B, 1, HW): where the context is pooled from
        context = torch.einsum("bcp,bop->bc", x.flatten(2), weights)[..., None, None]
        return x + self.transform(context)


def attention(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Spatial (B,H,W) and channel (B,C) attention of a map: H*W resp. C times a softmax of the mean |x|."""
    b, c, h, w = x.shape
    value = x.abs()
    spatial = (h * w) * (value.mean(dim=1).flatten(1) / temperature).softmax(dim=1).view(b, h, w)
    channel = c * (value.mean(dim=(2, 3)) / temperature).softmax(dim=1)
    return spatial, channel


def scale_masks(boxes_per_image: Sequence[Tensor], grid_hw: Sequence[int], padded_hw: Sequence[int]
                ) -> tuple[Tensor, Tensor]:
    """FGD's foreground scale mask and normalised background mask, both (B,H,W), for xyxy boxes in input pixels."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    device = boxes_per_image[0].device if len(boxes_per_image) else torch.device("cpu")
    fg = torch.zeros(len(boxes_per_image), h, w, device=device)
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    scale = torch.tensor([w / padded_hw[1], h / padded_hw[0]] * 2, device=device)
    for i, boxes in enumerate(boxes_per_image):  # a handful of images; the boxes of one image are one tensor op
        if boxes.numel() == 0:
            continue
        scaled = boxes.reshape(-1, 4).float() * scale
        x0, y0 = scaled[:, 0].floor(), scaled[:, 1].floor()
        x1, y1 = scaled[:, 2].ceil(), scaled[:, 3].ceil()
        count = (y1 + 1 - y0) * (x1 + 1 - x0)  # FGD counts the unclipped range
        value = torch.where(count > 0, 1.0 / count.clamp(min=1), torch.zeros_like(count))
        in_x = (cols >= x0[:, None]) & (cols <= x1[:, None])  # (N, W); out-of-grid cells simply do not exist
        in_y = (rows >= y0[:, None]) & (rows <= y1[:, None])  # (N, H)
        cover = in_y[:, :, None] & in_x[:, None, :]  # (N, H, W)
        fg[i] = (cover * value[:, None, None]).amax(dim=0)
    bg = (fg == 0).float()
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1)  # per image; an image covered everywhere keeps zeros
    return fg, bg


class FGDLoss(nn.Module):
    """The four weighted FGD terms summed over the distilled levels, with one pair of GcBlocks per level."""

    def __init__(self, channels: int, num_levels: int, temperature: float = 0.5, alpha: float = 1e-3,
                 beta: float = 5e-4, gamma: float = 5e-4, lambda_: float = 5e-6):
        super().__init__()
        self.temperature, self.alpha, self.beta, self.gamma, self.lambda_ = temperature, alpha, beta, gamma, lambda_
        self.student_context = nn.ModuleList(GlobalContext(channels) for _ in range(num_levels))
        self.teacher_context = nn.ModuleList(GlobalContext(channels) for _ in range(num_levels))

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor], boxes: Sequence[Tensor],
                padded_hw: Sequence[int]) -> dict[str, Tensor]:
        """kd_fgd_fg, kd_fgd_bg, kd_fgd_attention, kd_fgd_global (weighted); boxes xyxy in padded-input pixels."""
        if len(student) != len(self.student_context):
            raise ValueError(f"FGD was built for {len(self.student_context)} levels, got {len(student)}")
        fg_total = bg_total = att_total = global_total = 0.0
        for s, t, gc_s, gc_t in zip(student, teacher, self.student_context, self.teacher_context, strict=True):
            s, t = s.float(), t.float().detach()
            batch = s.shape[0]
            spatial_s, channel_s = attention(s, self.temperature)
            spatial_t, channel_t = attention(t, self.temperature)
            fg, bg = scale_masks(boxes, s.shape[-2:], padded_hw)
            weighted = (s - t) ** 2 * spatial_t[:, None] * channel_t[:, :, None, None]
            fg_total = fg_total + (weighted * fg[:, None]).sum() / batch
            bg_total = bg_total + (weighted * bg[:, None]).sum() / batch
            att_total = att_total + ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / batch
            global_total = global_total + ((gc_s(s) - gc_t(t)) ** 2).sum() / batch
        return {"kd_fgd_fg": self.alpha * fg_total, "kd_fgd_bg": self.beta * bg_total,
                "kd_fgd_attention": self.gamma * att_total, "kd_fgd_global": self.lambda_ * global_total}
