"""TensorRT engine runner on TensorRT's own runtime API, with device memory from cuda-python; both imported lazily.

``IRuntime.deserialize_cuda_engine`` -> ``ICudaEngine.create_execution_context`` -> per call ``set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3`` on a CUDA stream, inputs and outputs copied with ``cudaMemcpyAsync``
(the TensorRT 10 I/O-tensor API; TensorRT 11 keeps it). Not executed here: our machines have no GPU and cannot install
TensorRT; the tests drive this code against labelled fakes of ``tensorrt`` and cuda-python (tests/doubles/python).

Before TensorRT touches an engine the runner checks the bundle's registered engine (``engine.json``) against this
machine: TensorRT version, compute capability and GPU model (runtime.manifest.engine_mismatch); a mismatch is one
UserError naming both sides instead of a failure deep inside TensorRT.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from runtime.backends.base import Runner, TensorMeta
from runtime.errors import UserError
from runtime.manifest import Bundle, DeviceIdentity, EngineRecord, check_engine_compat, engine_mismatch


def import_tensorrt(where: str = "tensorrt") -> ModuleType:
    """``import tensorrt``, or a UserError saying where TensorRT comes from and what to run instead."""
    if importlib.util.find_spec("tensorrt") is None:
        raise UserError("TensorRT is not installed, so this TensorRT engine cannot run here", where,
                        "run it on the Jetson (JetPack ships TensorRT: python3-libnvinfer), or use the bundle's ONNX "
                        "model with --backend ort-cpu / ort-cuda")
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:  # a broken install raises ImportError or OSError from its shared libraries
        raise UserError(f"TensorRT is installed but does not import ({type(exc).__name__}: {exc})", where,
                        "check the TensorRT / CUDA libraries (JetPack install), or use --backend ort-cpu") from None


def import_cudart(where: str = "cuda-python") -> ModuleType:
    """cuda-python's CUDA runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before cuda-python 12.6)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise UserError("cuda-python is not installed (the TensorRT runner allocates GPU memory and streams with it)",
                    where, "pip install cuda-python (the release matching the device's CUDA), or use --backend ort-cpu")


def _ok(cudart: ModuleType, result: Any, what: str) -> Any:
    """The value of a cuda-python call returning (error, value...), or RuntimeError naming the call and the error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def cuda_device(cudart: ModuleType) -> tuple[str, str] | None:
    """(name, compute capability 'M.m') of CUDA device 0 as the CUDA runtime reports it (what trtexec prints as
    'Selected Device'), or None when no device answers (no GPU, no driver, CUDA_VISIBLE_DEVICES='')."""
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        return None
    err, prop = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    name = prop.name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.strip(), f"{prop.major}.{prop.minor}"


def device_identity(where: str = "tensorrt") -> DeviceIdentity:
    """This machine's TensorRT version and CUDA device 0; UserError when TensorRT, cuda-python or a GPU is missing."""
    trt = import_tensorrt(where)
    device = cuda_device(import_cudart(where))
    if device is None:
        raise UserError("no CUDA device answers (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)", where,
                        "run on the device the engine was built for, or use --backend ort-cpu")
    return DeviceIdentity(device[0], device[1], str(trt.__version__))


def engine_availability(bundle: Bundle) -> tuple[bool, str]:
    """(True, why) when the bundle's registered engine can run here, else (False, why not) in one line."""
    record = bundle.engine
    if record is None:
        if bundle.unregistered_engine:
            return False, (f"{bundle.unregistered_engine} is not registered (no engine.json): run the bundle's "
                           "./build_engine.sh again, which registers what it builds")
        return False, "the bundle has no TensorRT engine yet (run its ./build_engine.sh on the device)"
    try:
        here = device_identity(record.engine.file)
    except UserError as exc:
        return False, exc.what
    problem = engine_mismatch(record, here)
    if problem is not None:
        return False, problem
    return True, f"registered engine matches this machine ({here.describe()})"


class TrtRunner(Runner):
    """Runs a registered TensorRT engine after checking it was built for this GPU and TensorRT version."""

    def __init__(self, engine_path: str | Path, record: EngineRecord | None = None):
        super().__init__("tensorrt")
        self.engine_path = Path(engine_path)
        self.record = record
        self.here: DeviceIdentity | None = None
        self._trt: Any = None
        self._cudart: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor -> (device pointer, bytes allocated)
        self._inputs: list[str] = []
        self._outputs: list[str] = []

    def activate_impl(self) -> None:
        """Check compatibility, deserialize, create the execution context and a CUDA stream."""
        where = str(self.engine_path)
        self.here = device_identity(where)
        if self.record is not None:  # before TensorRT sees the plan: a mismatch fails deep inside it otherwise
            check_engine_compat(self.record, self.here)
        self._trt, self._cudart = import_tensorrt(where), import_cudart(where)
        if not self.engine_path.is_file():
            raise UserError("TensorRT engine not found", where, "run the bundle's ./build_engine.sh")
        trt = self._trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if self.record is not None and self.record.version_compatible:
            runtime.engine_host_code_allowed = True  # version-compatible plans carry TensorRT's lean runtime
        if self.record is not None and self.record.dla_core is not None:
            runtime.DLA_core = self.record.dla_core
        self._runtime = runtime  # the engine must not outlive its runtime
        self._engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise UserError("TensorRT could not deserialize the engine (its messages above say why)", where,
                            "rebuild it on this device with the bundle's ./build_engine.sh")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [n for n in names if not is_input[n]]
        self._stream = _ok(self._cudart, self._cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _device(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for tensor ``name`` (grown when a larger batch arrives)."""
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _ok(self._cudart, self._cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_ok(self._cudart, self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))

    def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs in, run the context on the stream, copy outputs back, wait for the stream."""
        cudart, ctx, stream = self._cudart, self._context, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = []  # host arrays must live until the stream is synchronised
        for name in self._inputs:
            array = np.ascontiguousarray(feed_dict[name], dtype=self._dtype(name))
            if not ctx.set_input_shape(name, tuple(array.shape)):
                raise UserError(f"input {name} of shape {array.shape} is outside the engine's optimization profile",
                                str(self.engine_path), "send batches the engine was built for (see engine.json)")
            ptr = self._device(name, array.nbytes)
            _ok(cudart, cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, stream), "cudaMemcpyAsync")
            ctx.set_tensor_address(name, ptr)
            keep.append(array)
        outputs: dict[str, np.ndarray] = {}
        for name in self._outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"output {name} has a data-dependent shape {shape}, which needs an output allocator",
                                str(self.engine_path), "export with host post-processing, or use --backend ort-*")
            outputs[name] = np.empty(shape, self._dtype(name))
            ctx.set_tensor_address(name, self._device(name, outputs[name].nbytes))
        if not ctx.execute_async_v3(int(stream)):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.engine_path}")
        for name, array in outputs.items():
            ptr, _ = self._buffers[name]
            _ok(cudart, cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, d2h, stream), "cudaMemcpyAsync")
        _ok(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        del keep
        return outputs

    def deactivate_impl(self) -> None:
        """Free device buffers and the stream, then the context, engine and runtime (in that order)."""
        cudart = self._cudart
        for ptr, _ in self._buffers.values():
            cudart.cudaFree(ptr)
        self._buffers.clear()
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
        self._stream = self._context = self._engine = self._runtime = None

    def get_input_metadata(self) -> dict[str, TensorMeta]:
        """Engine inputs with numpy dtypes; -1 (dynamic) becomes None."""
        return {n: TensorMeta(n, self._dtype(n), tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(n)))
                for n in self._inputs}

    def get_output_names(self) -> list[str]:
        """Engine outputs in I/O-tensor order."""
        return list(self._outputs)

    def max_batch(self, name: str) -> int | None:
        """The largest batch the engine's first optimization profile allows (engines with a dynamic batch axis)."""
        if -1 not in tuple(self._engine.get_tensor_shape(name)):
            return None
        _, _, largest = self._engine.get_tensor_profile_shape(name, 0)
        return int(largest[0])

    def describe(self) -> dict[str, Any]:
        """Engine file, TensorRT version and GPU, and what the engine was built as."""
        rec = self.record
        return {"name": self.name, "model": self.engine_path.name,
                "tensorrt": self.here.trt_version if self.here else "unavailable",
                "gpu": self.here.gpu_name if self.here else "unavailable",
                "compute_capability": self.here.compute_capability if self.here else "unavailable",
                "engine_precision": rec.precision if rec else "unknown",
                "dla_core": rec.dla_core if rec else None,
                "version_compatible": rec.version_compatible if rec else None,
                "hardware_compatibility": rec.hardware_compatibility if rec else None}
