"""Wall-clock statistics of a repeated callable (torch training steps, loss terms, DISW builds).

ONNX Runtime inference latency is measured by runtime.bench; this is the torch-side counterpart used by
benchmarks.distill_cost and benchmarks.gpu_check, with a CUDA synchronise around every call so GPU work is counted.

The headline statistic is the median: on a shared machine a few calls land on a busy moment, which drags a mean (and
a 3-call mean in particular) far from what the code costs. Micro-timings take at least MIN_CALLS calls.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_CALLS = 20  # timed calls behind every micro-timing's median
DEFAULT_WARMUP = 3


@dataclass(frozen=True)
class Timing:
    """Per-call wall time in milliseconds over `iters` timed calls, after `warmup` untimed ones."""

    median_ms: float
    mean_ms: float
    p99_ms: float
    min_ms: float
    iters: int
    warmup: int

    @property
    def summary(self) -> str:
        """What the headline number is, in words."""
        return f"median of {self.iters} calls after {self.warmup} warm-up call{'s' * (self.warmup != 1)}"

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, including the summary sentence."""
        return asdict(self) | {"statistic": "median", "summary": self.summary}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timing(times_ms: list[float], warmup: int) -> Timing:
    t = np.asarray(times_ms)
    return Timing(float(np.median(t)), float(t.mean()), float(np.percentile(t, 99)), float(t.min()), len(t), warmup)


def _timed_call(fn: Callable[[], Any], device: str) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def measure(fn: Callable[[], Any], iters: int = MIN_CALLS, warmup: int = DEFAULT_WARMUP,
            device: str = "cpu") -> Timing:
    """Call `fn` warmup + iters times; time each of the last `iters` calls (synchronising CUDA around each)."""
    return measure_interleaved({"fn": fn}, iters, warmup, device)["fn"]


def measure_interleaved(fns: Mapping[str, Callable[[], Any]], iters: int = MIN_CALLS,
                        warmup: int = DEFAULT_WARMUP, device: str = "cpu") -> dict[str, Timing]:
    """Time several callables side by side: `warmup` untimed calls each, then `iters` rounds calling each once.

    Rounds (A, B, C, A, B, C, ...) spread the load of other processes on a shared machine over every callable, so a
    busy minute does not land on one of them only (the same scheme benchmarks.measure uses for latency).
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got {iters} and {warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            times[name].append(_timed_call(fn, device))
    return {name: _timing(t, warmup) for name, t in times.items()}
