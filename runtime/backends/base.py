"""The one small interface every inference backend has, in the manner of Polygraphy's runners.

A runner is built cheaply (nothing loaded), ``activate()`` loads the model (session, engine), ``infer(feed_dict)``
maps input names to numpy arrays and returns output names to numpy arrays, ``deactivate()`` frees everything.
Used as a context manager it activates on entry and deactivates on exit. The detector and the latency harness only
ever talk to this surface, so a new backend is one subclass.
"""
from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and shape of a network input or output; ``None`` (or a string) marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def static_batch(self) -> int | None:
        """The batch size baked into the network, or None when the batch axis is dynamic."""
        first = self.shape[0] if self.shape else None
        return first if isinstance(first, int) and first > 0 else None


class Runner(abc.ABC):
    """Base runner: activate / infer / deactivate, usable as a context manager, times each inference."""

    def __init__(self, name: str):
        self.name = name
        self.is_active = False
        self.inference_time: float | None = None  # seconds spent in the last infer(), inputs to outputs on the host

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def activate(self) -> None:
        """Load the model so that infer() can run; activating twice is a programming error."""
        if self.is_active:
            raise RuntimeError(f"runner {self.name} is already active")
        self.activate_impl()
        self.is_active = True

    def deactivate(self) -> None:
        """Release the model; a no-op when not active."""
        if self.is_active:
            try:
                self.deactivate_impl()
            finally:
                self.is_active = False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.deactivate()

    # -- inference -------------------------------------------------------------------------------------------------
    def infer(self, feed_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the network on named inputs; returns named outputs as numpy arrays on the host."""
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} must be activated before infer() (use it as a context manager)")
        self._check_feed(feed_dict)
        start = time.perf_counter()
        outputs = self.infer_impl(feed_dict)
        self.inference_time = time.perf_counter() - start
        return outputs

    def last_inference_time(self) -> float | None:
        """Seconds the last infer() took (None before the first)."""
        return self.inference_time

    def _check_feed(self, feed_dict: Mapping[str, np.ndarray]) -> None:
        # Wrong names or ranks otherwise surface as backend-specific errors far from the cause.
        expected = self.get_input_metadata()
        missing = [n for n in expected if n not in feed_dict]
        extra = [n for n in feed_dict if n not in expected]
        if missing or extra:
            raise ValueError(f"{self.name}: inputs {sorted(feed_dict)} do not match the network's {sorted(expected)}")
        for name, meta in expected.items():
            arr = feed_dict[name]
            if arr.ndim != len(meta.shape) or any(
                    isinstance(d, int) and d > 0 and d != a for d, a in zip(meta.shape, arr.shape)):
                raise ValueError(f"{self.name}: input '{name}' has shape {arr.shape}, the network expects {meta.shape}")

    # -- what subclasses provide -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def activate_impl(self) -> None:
        """Load the model."""

    @abc.abstractmethod
    def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference."""

    @abc.abstractmethod
    def deactivate_impl(self) -> None:
        """Free the model."""

    @abc.abstractmethod
    def get_input_metadata(self) -> dict[str, TensorMeta]:
        """Inputs of the active network by name."""

    @abc.abstractmethod
    def get_output_names(self) -> list[str]:
        """Outputs of the active network, in order."""

    def max_batch(self, name: str) -> int | None:
        """Largest batch a dynamic-batch input accepts (None: no limit known)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts about this runner for reports (name; subclasses add providers, threads, engine details)."""
        return {"name": self.name}
