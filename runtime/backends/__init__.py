"""Inference backends with one runner interface (activate / infer / deactivate), and the choice among them.

Only ``base`` is imported eagerly; ONNX Runtime and TensorRT load when a runner activates.
"""
from __future__ import annotations

from runtime.backends.base import Runner, TensorMeta

__all__ = ["Runner", "TensorMeta"]
