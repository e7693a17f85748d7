"""Pick the backend and model file of a bundle: forced by ``--backend`` / ``--precision``, or the best that works here.

``auto`` prefers, in order: the bundle's registered TensorRT engine (``engine.json``) when TensorRT, cuda-python and a
GPU are here and the engine was built for this GPU and TensorRT version; ONNX Runtime on CUDA (onnxruntime-gpu and a
GPU); ONNX Runtime on the CPU. When the bundle has an engine that cannot run here, ``auto`` says why in a warning
(and in the choice's reason, which reports record) before it falls back. ONNX Runtime's TensorRT provider is never
chosen automatically: it builds an engine when the session starts (minutes on a Jetson), so it is only used when
asked for. Precision ``auto`` takes the bundle's most reduced model the device runs well: INT8 Q/DQ, else FP32 (an FP16 ONNX
runs well only on a GPU).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from runtime.backends.base import Runner
from runtime.backends.ort import OrtRunner, available_providers, gpu_present
from runtime.backends.trt import TrtRunner, engine_availability
from runtime.errors import UserError
from runtime.manifest import Bundle

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt")
PRECISIONS = ("auto", "fp32", "fp16", "int8")
_ONNX_ROLE = {"fp32": "onnx-fp32", "fp16": "onnx-fp16", "int8": "onnx-int8"}
log = logging.getLogger("runtime.backends")


@dataclass
class BackendChoice:
    """The runner picked for a bundle, the model file it runs, and why."""

    runner: Runner
    backend: str
    model_path: Path
    precision: str
    reason: str
    warning: str | None = None  # why an engine the bundle has was not used (auto only)


def bundle_precisions(bundle: Bundle) -> list[str]:
    """Precisions of the ONNX models the bundle holds ('fp32', 'fp16', 'int8')."""
    roles = {entry.role for entry in bundle.manifest.files.values()}
    return [p for p, role in _ONNX_ROLE.items() if role in roles]


def _engine_warning(bundle: Bundle, why: str) -> str | None:
    """The warning auto owes the user for not running the engine: when the bundle has one (registered or not), or when
    TensorRT is here but the engine was never built; silent on a host that merely lacks TensorRT."""
    has_engine = bundle.engine is not None or bundle.unregistered_engine is not None
    trt_here = importlib.util.find_spec("tensorrt") is not None and bundle.manifest.tensorrt.build_script is not None
    return f"TensorRT engine not used: {why}" if has_engine or trt_here else None


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
    if backend == "trt":
        path = bundle.engine_path()
        return BackendChoice(TrtRunner(path, bundle.engine), "trt", path, bundle.engine.precision,
                             "forced by --backend trt")
    warning = None
    if backend == "auto":
        usable, why = engine_availability(bundle)
        if usable and precision in ("auto", bundle.engine.precision):
            return BackendChoice(TrtRunner(bundle.engine_path(), bundle.engine), "trt", bundle.engine_path(),
                                 bundle.engine.precision, why)
        if usable:
            why = f"--precision {precision} asks for another model than the {bundle.engine.precision} engine"
        warning = _engine_warning(bundle, why)
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
    if warning:
        log.warning("warning: %s; running ONNX Runtime (%s, %s) instead", warning, device, path.name)
        reason = f"{reason}; {warning}"
    return BackendChoice(runner, f"ort-{device}", path, chosen, reason, warning)
