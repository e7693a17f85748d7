"""Wall-clock statistics of a repeated callable (torch training steps, loss terms, DISW builds).

ONNX Runtime inference latency is measured by runtime.bench; this is the torch-side counterpart used by
benchmarks.distill_cost and benchmarks.gpu_check, with a CUDA synchronise around every call so GPU work is counted.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Per-call wall time in milliseconds over `iters` calls (after `warmup` untimed ones)."""

    mean_ms: float
    p50_ms: float
    p99_ms: float
    min_ms: float
    iters: int
    warmup: int

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], iters: int, warmup: int = 1, device: str = "cpu") -> Timing:
    """Call `fn` warmup + iters times; time each of the last `iters` calls (synchronising CUDA around each)."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    t = np.asarray(times)
    return Timing(float(t.mean()), float(np.percentile(t, 50)), float(np.percentile(t, 99)), float(t.min()),
                  iters, warmup)
