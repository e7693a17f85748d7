"""One-level Haar decomposition of feature maps (pytorch_wavelets) and the high-frequency map hf(F)."""
from __future__ import annotations

import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

with warnings.catch_warnings():  # pytorch_wavelets imports the deprecated pkg_resources; not ours to fix
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    from pytorch_wavelets import DWTForward


@lru_cache(maxsize=None)
def _dwt(device: torch.device, dtype: torch.dtype) -> DWTForward:
    # The transform only holds four fixed 2-tap filters; one instance per device/dtype avoids rebuilding them per call.
    return DWTForward(J=1, wave="haar", mode="zero").to(device=device, dtype=dtype)


def haar_split(x: Tensor) -> tuple[Tensor, Tensor]:
    """One Haar DWT level of (B,C,H,W): LL (B,C,H',W') and the LH/HL/HH bands (B,C,3,H',W'), H' = ceil(H/2)."""
    # Outside autocast, in x's dtype: pytorch_wavelets' hand-written backward convolves the incoming gradient with
    # its filters, so forward outputs, gradients and filters must all share one dtype.
    with torch.autocast(x.device.type, enabled=False):
        low, (high,) = _dwt(x.device, x.dtype)(x)
    return low, high


def high_frequency(x: Tensor) -> Tensor:
    """hf(F): the three high bands summed and upsampled bilinearly (align_corners=False) back to F's size."""
    _, high = haar_split(x)
    return F.interpolate(high.sum(dim=2), size=x.shape[-2:], mode="bilinear", align_corners=False)
