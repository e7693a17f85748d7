"""Pick the backend and model file of a bundle: forced by ``--backend`` / ``--precision``, or the best that works here.

``auto`` prefers, in order: the bundle's TensorRT engine (when TensorRT imports and a GPU exists), ONNX Runtime on
CUDA (onnxruntime-gpu and a GPU), ONNX Runtime on the CPU. ONNX Runtime's TensorRT provider is never chosen
automatically: it builds an engine when the session starts (minutes on a Jetson), so it is only used when asked for.
Precision ``auto`` takes the bundle's most reduced model the device runs well: INT8 Q/DQ, else FP32 (an FP16 ONNX
runs well only on a GPU).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from runtime.backends.base import Runner
from runtime.backends.ort import OrtRunner, available_providers, gpu_present
from runtime.backends.trt import TrtRunner
from runtime.errors import UserError
from runtime.manifest import Bundle

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt")
PRECISIONS = ("auto", "fp32", "fp16", "int8")
_ONNX_ROLE = {"fp32": "onnx-fp32", "fp16": "onnx-fp16", "int8": "onnx-int8"}


@dataclass
class BackendChoice:
    """The runner picked for a bundle, the model file it runs, and why."""

    runner: Runner
    backend: str
    model_path: Path
    precision: str
    reason: str


def bundle_precisions(bundle: Bundle) -> list[str]:
    """Precisions of the ONNX models the bundle holds ('fp32', 'fp16', 'int8')."""
    roles = {entry.role for entry in bundle.manifest.files.values()}
    return [p for p, role in _ONNX_ROLE.items() if role in roles]


def _engine_usable(bundle: Bundle) -> bool:
    return bundle.manifest.tensorrt.engine is not None and importlib.util.find_spec("tensorrt") is not None \
        and gpu_present()


def _onnx_precision(bundle: Bundle, precision: str, on_gpu: bool) -> str:
    have = bundle_precisions(bundle)
    if precision != "auto":
        if precision not in have:
            raise UserError(f"bundle has no {precision} ONNX model (it has: {', '.join(have) or 'none'})",
                            str(bundle.root), f"use --precision {' / '.join(have) or 'auto'}, or rebuild the bundle")
        return precision
    preference = ("int8", "fp16", "fp32") if on_gpu else ("int8", "fp32")
    for candidate in preference:
        if candidate in have:
            return candidate
    raise UserError("bundle holds no ONNX model that runs here", str(bundle.root),
                    "rebuild it with `python -m deploy.build` (it always writes model_fp32.onnx)")


def select_backend(bundle: Bundle, backend: str = "auto", precision: str = "auto",
                   threads: int | None = None) -> BackendChoice:
    """The runner for ``bundle`` (not yet activated) given ``--backend`` and ``--precision``."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}", "--backend", f"choose one of: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", "--precision", f"choose one of: {', '.join(PRECISIONS)}")
    engine = bundle.manifest.tensorrt.engine

    if backend == "trt" or (backend == "auto" and _engine_usable(bundle)):
        if engine is None:
            raise UserError("bundle has no TensorRT engine", str(bundle.root),
                            "build it on the device with the bundle's build_engine.sh, or use --backend ort-cpu")
        path = bundle.path(engine.file)
        built = bundle.manifest.files[engine.file].precision or "engine"
        reason = "forced by --backend trt" if backend == "trt" else "TensorRT and a GPU are present"
        return BackendChoice(TrtRunner(path, bundle.manifest), "trt", path, built, reason)

    if backend == "auto":
        cuda_ok = gpu_present() and "CUDAExecutionProvider" in available_providers()
        device = "cuda" if cuda_ok else "cpu"
        reason = "GPU and onnxruntime-gpu present" if cuda_ok else "no usable GPU: ONNX Runtime on the CPU"
    else:
        device = backend.removeprefix("ort-")
        reason = f"forced by --backend {backend}"
    chosen = _onnx_precision(bundle, precision, on_gpu=device != "cpu")
    path = bundle.path_for_role(_ONNX_ROLE[chosen])
    # auto may fall back to the CPU if the CUDA provider does not load; a forced backend must not.
    runner = OrtRunner(path, device, threads=threads, strict=backend != "auto",  # type: ignore[arg-type]
                       int8=chosen == "int8")
    return BackendChoice(runner, f"ort-{device}", path, chosen, reason)
