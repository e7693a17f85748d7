"""ONNX Runtime runner: CPU, CUDA or TensorRT execution provider, with explicit thread counts.

``onnxruntime.get_available_providers()`` lists what the *wheel* was built with, not what loads: onnxruntime-gpu on
a machine without CUDA lists CUDA and TensorRT, then silently falls back to the CPU at session creation. So the
runner checks which providers the session really uses, and a forced provider that did not load is a UserError.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from runtime.backends.base import Runner, TensorMeta
from runtime.errors import UserError

Device = Literal["cpu", "cuda", "trt"]

# Provider chains, best first; ORT assigns each node to the first provider in the list that supports it.
PROVIDER_CHAINS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_MAIN_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
              "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def available_providers() -> list[str]:
    """Execution providers the installed onnxruntime was built with (not a promise that they load)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def gpu_present() -> bool:
    """True when an NVIDIA GPU device node exists (desktop driver or Jetson's integrated GPU)."""
    nodes = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl")
    return any(os.path.exists(node) for node in nodes)


def graph_until(source: str | Path | Any, outputs: tuple[str, ...]) -> bytes:
    """The ONNX model (a path or a ModelProto) cut so that ``outputs`` are its outputs, serialized (needs onnx)."""
    path = source if isinstance(source, (str, Path)) else "model"
    try:
        import onnx
    except ImportError:
        raise UserError("running this graph without its TensorRT plugin needs the onnx package", str(path),
                        "pip install onnx, or run the bundle's TensorRT engine (--backend trt)") from None
    if isinstance(source, (str, Path)):
        model = onnx.load(str(source))
    else:
        model = onnx.ModelProto()
        model.CopyFrom(source)
    known = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    missing = [name for name in outputs if name not in known]
    if missing:
        raise UserError(f"the graph has no tensors {missing} to stop at", str(path), "rebuild the bundle")
    needed, kept = set(outputs), []
    for node in reversed(model.graph.node):  # graph order is topological: walk back from the wanted tensors
        if needed & set(node.output):
            kept.append(node)
            needed |= set(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    typed = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    typed.update({v.name: v for v in model.graph.output})
    del model.graph.output[:]
    model.graph.output.extend(typed.get(name) or onnx.helper.make_empty_tensor_value_info(name) for name in outputs)
    return model.SerializeToString()


class OrtRunner(Runner):
    """Runs an ONNX file with ONNX Runtime on the given device ('cpu', 'cuda' or 'trt' execution provider)."""

    def __init__(self, model_path: str | Path, device: Device = "cpu", threads: int | None = None,
                 strict: bool = True, trt_cache_dir: str | Path | None = None, int8: bool = False,
                 stop_at: tuple[str, ...] = ()):
        if device not in PROVIDER_CHAINS:
            raise ValueError(f"device must be one of {list(PROVIDER_CHAINS)}, got {device!r}")
        super().__init__(f"ort-{device}")
        self.model_path = Path(model_path)
        self.device = device
        self.threads = threads
        self.strict = strict  # False: accept a fallback to a lesser provider (auto selection)
        self.trt_cache_dir = Path(trt_cache_dir) if trt_cache_dir else self.model_path.parent / "trt_cache"
        self.int8 = int8
        # Tensors to end the graph at (what follows is dropped before loading): a graph that ends in a TensorRT
        # plugin runs up to the plugin's inputs (runtime.efficient_nms applies the plugin's reference after).
        self.stop_at = tuple(stop_at)
        self.session: Any = None
        self.providers: list[str] = []

    def _provider_list(self) -> list[Any]:
        chain = list(PROVIDER_CHAINS[self.device])
        if self.device == "trt":
            # Not executed here (no GPU). The cache keeps the minutes-long engine build to the first session only.
            options = {"trt_fp16_enable": True, "trt_int8_enable": self.int8, "trt_engine_cache_enable": True,
                       "trt_engine_cache_path": str(self.trt_cache_dir), "trt_timing_cache_enable": True}
            chain[0] = ("TensorrtExecutionProvider", options)
        return chain

    def activate_impl(self) -> None:
        """Create the session with the provider chain; check which providers really loaded."""
        import onnxruntime as ort

        if not self.model_path.is_file():
            raise UserError("ONNX model not found", str(self.model_path), "check the bundle directory")
        wanted = _MAIN_PROVIDER[self.device]
        if wanted not in ort.get_available_providers():
            raise UserError(f"this onnxruntime has no {wanted}", "--backend",
                            f"install onnxruntime-gpu for CUDA / TensorRT, or use --backend ort-cpu "
                            f"(available: {', '.join(ort.get_available_providers())})")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Workers spin between operators (fast) but stop when run() returns: the host pre/post-processing that follows
        # every inference gets the cores instead of sharing them with idle spinning threads.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        if not self.strict:
            # Probing a GPU provider that may not load: its failure is expected and reported by describe(), so
            # silence the process-wide logger meanwhile (a forced provider keeps onnxruntime's reason on stderr).
            ort.set_default_logger_severity(4)
        try:
            model = graph_until(self.model_path, self.stop_at) if self.stop_at else str(self.model_path)
            self.session = ort.InferenceSession(model, sess_options=options,
                                                providers=self._provider_list())
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            first_line = (str(exc).splitlines() or [""])[0]
            raise UserError(f"onnxruntime cannot load the model ({type(exc).__name__}: {first_line})",
                            str(self.model_path), "re-export the bundle (python -m deploy.build)") from None
        finally:
            if not self.strict:
                ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
        self.providers = list(self.session.get_providers())
        if self.strict and wanted not in self.providers:
            self.session = None
            raise UserError(f"{wanted} did not load (onnxruntime fell back to {', '.join(self.providers)})",
                            "--backend", "check the CUDA / cuDNN / TensorRT libraries onnxruntime-gpu needs, "
                            "or use --backend ort-cpu")

    def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One session.run over every output."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, dict(feed_dict))))

    def deactivate_impl(self) -> None:
        """Drop the session (ONNX Runtime frees it with the last reference)."""
        self.session = None

    def get_input_metadata(self) -> dict[str, TensorMeta]:
        """Inputs with numpy dtypes; dynamic axes come as strings or None."""
        return {i.name: TensorMeta(i.name, np.dtype(_ORT_TYPES.get(i.type, np.float32)), tuple(i.shape))
                for i in self.session.get_inputs()}

    def get_output_names(self) -> list[str]:
        """Output names in the graph's order."""
        return [o.name for o in self.session.get_outputs()]

    @property
    def active_device(self) -> Device:
        """The device the session really runs on (after any fallback)."""
        for device in ("trt", "cuda"):
            if _MAIN_PROVIDER[device] in self.providers:
                return device  # type: ignore[return-value]
        return "cpu"

    def describe(self) -> dict[str, Any]:
        """Device really used, providers, threads and onnxruntime version."""
        import onnxruntime as ort

        return {"name": f"ort-{self.active_device}" if self.is_active else self.name, "model": self.model_path.name,
                "providers": self.providers, "intra_op_threads": self.threads or "onnxruntime default (all cores)",
                "onnxruntime": ort.__version__}
