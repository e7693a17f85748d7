"""Does the exported graph compute what the PyTorch model computes? Polygraphy's Comparator answers it.

Runners with Polygraphy's surface feed the same real, preprocessed images to PyTorch (``TorchRunner``, a CPU
sibling of polygraphy.backend.pyt.PytRunner, which moves inputs to CUDA) and to ONNX Runtime (Polygraphy's
OnnxrtRunner); ``Comparator.compare_accuracy`` checks every output element against atol/rtol (an element fails when
it exceeds both). The same function compares FP32 against INT8 in ``deploy.verify``.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, SimpleCompareFunc
from polygraphy.logger import G_LOGGER

Feed = Mapping[str, np.ndarray]


class TorchRunner(BaseRunner):
    """Polygraphy runner for a torch module on the CPU: activate / infer(feed_dict) / deactivate."""

    def __init__(self, module: Any, input_metadata: TensorMetadata, output_names: Sequence[str],
                 name: str | None = None):
        super().__init__(name=name, prefix="torch-cpu-runner")
        self._module, self.input_metadata, self.output_names = module, input_metadata, list(output_names)

    def activate_impl(self) -> None:
        """Put the module in eval mode."""
        self._module.eval()

    def get_input_metadata_impl(self) -> TensorMetadata:
        """Input names, dtypes and shapes, as given at construction."""
        return self.input_metadata

    def infer_impl(self, feed_dict: Feed) -> OrderedDict:
        """Run the module on the feed (in input order) and name its outputs."""
        import torch

        inputs = [torch.from_numpy(np.ascontiguousarray(feed_dict[name])) for name in self.input_metadata]
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self._module(*inputs)
        self.inference_time = time.perf_counter() - start
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return OrderedDict((n, o.detach().cpu().numpy()) for n, o in zip(self.output_names, outputs))

    def deactivate_impl(self) -> None:
        """Nothing to free: the module belongs to the caller."""


def ort_session(model: str | Path | bytes | Any, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session (the machine's fidelity reference) of an ONNX file, serialized model bytes or an
    in-memory onnx.ModelProto; `threads` caps intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # Q/DQ models make ORT warn about every un-fused node
    if threads:
        opts.intra_op_num_threads = threads
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_runner(path: str | Path, name: str | None = None, threads: int | None = None) -> OnnxrtRunner:
    """Polygraphy's ONNX Runtime runner over a CPU session of `path` (created lazily, on activate)."""
    return OnnxrtRunner(lambda: ort_session(path, threads), name=name or Path(path).stem)


@dataclass(frozen=True)
class OutputError:
    """Worst-case differences of one output over all compared images."""

    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    passed: bool


@dataclass(frozen=True)
class ComparisonReport:
    """Result of comparing two runners: verdict, tolerances, images compared and per-output errors."""

    passed: bool
    atol: float
    rtol: float
    images: int
    reference: str
    candidate: str
    outputs: list[OutputError] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    def worst(self) -> str:
        """One line naming the output with the largest absolute error (for error messages)."""
        if not self.outputs:
            return "no outputs compared"
        bad = [o for o in self.outputs if not o.passed] or self.outputs
        o = max(bad, key=lambda item: item.max_abs)
        return f"{o.name}: max |diff| {o.max_abs:.3g}, max rel {o.max_rel:.3g} (atol {self.atol:g}, rtol {self.rtol:g})"


def compare_runners(reference: BaseRunner, candidate: BaseRunner, feeds: Sequence[Feed], atol: float,
                    rtol: float) -> ComparisonReport:
    """Run both runners on every feed and compare each output element-wise with Polygraphy's simple compare."""
    # Polygraphy logs every iteration at INFO; relative errors of exact zeros divide by zero by design.
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), np.errstate(divide="ignore", invalid="ignore"):
        results = Comparator.run([reference, candidate], data_loader=[dict(f) for f in feeds])
        accuracy = Comparator.compare_accuracy(
            results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise"))
    per_output: dict[str, list] = {}
    for iteration in next(iter(accuracy[0].values())):
        for name, res in iteration.items():
            per_output.setdefault(name, []).append(res)
    outputs = [OutputError(name, max(float(r.max_absdiff) for r in rs), max(float(r.max_reldiff) for r in rs),
                           float(np.mean([float(r.mean_absdiff) for r in rs])), all(bool(r) for r in rs))
               for name, rs in per_output.items()]
    passed = bool(accuracy) and all(o.passed for o in outputs) and len(outputs) > 0
    return ComparisonReport(passed, atol, rtol, len(feeds), reference.name, candidate.name, outputs)


def check_fidelity(module: Any, output_names: Sequence[str], onnx_path: str | Path, feeds: Sequence[Feed],
                   atol: float, rtol: float) -> ComparisonReport:
    """Compare a torch module (reference) with its ONNX export under ONNX Runtime on the given feeds."""
    first = feeds[0]
    meta = TensorMetadata()
    for name, array in first.items():
        meta.add(name, array.dtype, array.shape)
    torch_runner = TorchRunner(module, meta, output_names, name="pytorch")
    return compare_runners(torch_runner, onnx_runner(onnx_path, name="onnxruntime"), feeds, atol, rtol)
