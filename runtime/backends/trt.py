"""TensorRT engine runner through Polygraphy's ``TrtRunner`` (TensorRT 10 API underneath), imported lazily.

Not executed here: our machines have no GPU and cannot install TensorRT; this path runs on the Jetson (JetPack ships
``tensorrt``). What runs everywhere is tested: a clear error when TensorRT (or Polygraphy) is missing, and the
refusal of an engine built for another GPU or TensorRT version (an engine only deserializes on the exact GPU model
and TensorRT build it was made with, and a mismatch otherwise fails deep inside TensorRT or crashes).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from runtime.backends.base import Runner, TensorMeta
from runtime.errors import UserError
from runtime.machine import UNAVAILABLE, gpu_info
from runtime.manifest import Manifest, check_engine_compat


def import_tensorrt(where: str = "tensorrt") -> ModuleType:
    """``import tensorrt``, or a UserError saying where TensorRT comes from and what to run instead."""
    if importlib.util.find_spec("tensorrt") is None:
        raise UserError("TensorRT is not installed, so this TensorRT engine cannot run here", where,
                        "run it on the Jetson (JetPack ships TensorRT), or use the bundle's ONNX model with "
                        "--backend ort-cpu / ort-cuda")
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:  # a broken install raises ImportError or OSError from its shared libraries
        raise UserError(f"TensorRT is installed but does not import ({type(exc).__name__}: {exc})", where,
                        "check the TensorRT / CUDA libraries (JetPack install), or use --backend ort-cpu") from None


def _cudart_device_name() -> str | None:
    """Name of CUDA device 0 from libcudart's cudaGetDeviceProperties (works on Jetsons, which lack nvidia-smi)."""
    path = ctypes.util.find_library("cudart")
    candidates = [path] if path else []
    candidates += ["libcudart.so", "libcudart.so.12", "libcudart.so.13"]
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        # cudaDeviceProp begins with `char name[256]` in every CUDA version; the rest of the buffer is headroom.
        buf = ctypes.create_string_buffer(8192)
        if lib.cudaGetDeviceProperties(buf, 0) == 0:
            return buf.raw[:256].split(b"\0", 1)[0].decode(errors="replace").strip() or None
        return None
    return None


def current_gpu_name() -> str:
    """This machine's GPU name as CUDA reports it (what an engine's manifest records), or "unavailable"."""
    name = _cudart_device_name()
    if name:
        return name
    gpus = gpu_info()
    return gpus[0]["name"] if isinstance(gpus, list) and gpus else UNAVAILABLE


def _numpy_dtype(dtype: Any) -> np.dtype:
    try:
        from polygraphy.datatype import DataType  # noqa: PLC0415 - Polygraphy >= 0.49

        return np.dtype(DataType.to_dtype(dtype, "numpy"))
    except (ImportError, TypeError, ValueError):
        return np.dtype(dtype)


class TrtRunner(Runner):
    """Runs a serialized TensorRT engine; checks it was built for this GPU and TensorRT version first."""

    def __init__(self, engine_path: str | Path, manifest: Manifest | None = None):
        super().__init__("trt")
        self.engine_path = Path(engine_path)
        self.manifest = manifest
        self._runner: Any = None
        self.trt_version: str | None = None

    def activate_impl(self) -> None:
        """Import TensorRT, check the engine fits this GPU and TensorRT, deserialize it."""
        trt = import_tensorrt(str(self.engine_path))
        self.trt_version = str(trt.__version__)
        if self.manifest is not None:
            check_engine_compat(self.manifest, current_gpu_name(), self.trt_version)
        if importlib.util.find_spec("polygraphy") is None:
            raise UserError("Polygraphy is not installed (it runs the TensorRT engine)", str(self.engine_path),
                            "pip install polygraphy")
        if not self.engine_path.is_file():
            raise UserError("TensorRT engine not found", str(self.engine_path), "run the bundle's build_engine.sh")
        from polygraphy.backend.trt import EngineFromPath  # noqa: PLC0415 - lazy: needs tensorrt
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner  # noqa: PLC0415

        self._runner = PolygraphyTrtRunner(EngineFromPath(str(self.engine_path)))
        try:
            self._runner.activate()
        except Exception as exc:  # TensorRT reports deserialization failures as generic errors
            self._runner = None
            raise UserError(f"TensorRT could not load the engine ({exc})", str(self.engine_path),
                            "rebuild it on this device with the bundle's build_engine.sh") from None

    def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Polygraphy copies inputs to the GPU, runs the context, copies outputs back."""
        outputs = self._runner.infer(dict(feed_dict))
        return {name: np.asarray(value) for name, value in outputs.items()}

    def deactivate_impl(self) -> None:
        """Free the execution context and device buffers."""
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None

    def get_input_metadata(self) -> dict[str, TensorMeta]:
        """Engine inputs with numpy dtypes; -1 (dynamic) becomes None."""
        meta = self._runner.get_input_metadata()
        return {name: TensorMeta(name, _numpy_dtype(m.dtype), tuple(d if d >= 0 else None for d in m.shape))
                for name, m in meta.items()}

    def get_output_names(self) -> list[str]:
        """Engine outputs in I/O-tensor order."""
        engine = self._runner.engine
        trt = import_tensorrt()
        return [n for n in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
                if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def max_batch(self, name: str) -> int | None:
        """The batch the engine's first optimization profile allows at most (engines with a dynamic batch axis)."""
        engine = self._runner.engine
        if -1 not in tuple(engine.get_tensor_shape(name)):
            return None
        _, _, largest = engine.get_tensor_profile_shape(name, 0)
        return int(largest[0])

    def describe(self) -> dict[str, Any]:
        """Engine file, TensorRT version and GPU."""
        return {"name": self.name, "model": self.engine_path.name, "tensorrt": self.trt_version or UNAVAILABLE,
                "gpu": current_gpu_name() if self.is_active else UNAVAILABLE}
