"""Post-training INT8 quantization to explicit Q/DQ ONNX, one function per quantizer.

- ``ort-u8s8`` (target cpu): ONNX Runtime static QDQ with uint8 activations and int8 per-channel weights, the
  combination ORT's CPU kernels run fastest (QLinearConv with u8 activations);
- ``modelopt`` (TensorRT targets): nvidia-modelopt ONNX PTQ, symmetric int8 Q/DQ placed the way TensorRT fuses it,
  with the activation ranges of deploy.ranges (or modelopt's per-node calibration when calibration.per_node is set);
- ``ort-symmetric`` (TensorRT fallback when modelopt is missing): ONNX Runtime's quantizer with modelopt's settings for
  TensorRT: symmetric int8 (TensorRT only accepts zero-point 0), weights in float behind Q/DQ pairs, biases in float
  (no int32 DequantizeLinear), Q/DQ on the inputs of the ops modelopt quantises.

Calibration streams one batch at a time and its ranges are cached in the bundle's build folder (deploy.ranges): the
sensitivity pass re-quantizes from the cache.

The head's output convolutions and everything after them stay in float for every quantizer: they produce the
logits and box deltas the host thresholds and decodes, where int8 steps would move scores across the threshold.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from polygraphy.backend.base import BaseLoader

from deploy.calibration import CalibrationSet
from deploy.formats import missing, quiet_tools
from deploy.ranges import (ORT_METHODS, ActivationRanges, calibrate_ort, calibration_key, modelopt_scales,
                           quantize_with_ranges, write_trt_calibration_cache)
from runtime.errors import UserError

# Module paths (as the TorchScript exporter writes them into node names) of the layers whose outputs are the
# network's predictions: RetinaNet's two final head convs; Faster R-CNN's RPN predictors (everything of the second
# stage lies downstream of the proposals) and box predictor.
OUTPUT_LAYER_PREFIXES = (
    "/head/classification_head/cls_logits", "/head/regression_head/bbox_reg",
    "/rpn/head/cls_logits", "/rpn/head/bbox_pred", "/roi_heads/box_predictor/",
)
MODELOPT_METHODS = {"entropy": "entropy", "max": "max", "minmax": "max"}


def _downstream(model: onnx.ModelProto, start: list[onnx.NodeProto]) -> set[str]:
    """Names of the `start` nodes and of every node that consumes, directly or not, one of their outputs."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    seen, queue = {n.name for n in start}, deque(start)
    while queue:
        for out in queue.popleft().output:
            for nxt in consumers.get(out, []):
                if nxt.name not in seen:
                    seen.add(nxt.name)
                    queue.append(nxt)
    return seen


def prediction_layers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The first prediction layers: output convs not downstream of another (RetinaNet head, Faster R-CNN RPN)."""
    start = [n for n in model.graph.node if n.name.startswith(OUTPUT_LAYER_PREFIXES)]
    if not start:
        raise UserError("no head output layer found in the ONNX graph (node names lost their module paths)",
                        where="deploy.export", fix="export with deploy.export.ExportOnnx (TorchScript exporter)")
    later = set()
    for node in start:
        later |= _downstream(model, [node]) - {node.name}
    return [n for n in start if n.name not in later]


def head_output_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the prediction layers' nodes and of every node downstream of them, in graph order."""
    seen = _downstream(model, prediction_layers(model))
    return [n.name for n in model.graph.node if n.name in seen]


def quantized_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of compute nodes fed by a DequantizeLinear, i.e. that run on int8 data in a Q/DQ graph."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_outputs for i in n.input)}


def int8_weight_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of Conv / Gemm / MatMul nodes whose weights come through a DequantizeLinear (int8 compute)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1
            and n.input[1] in dq_outputs}


def qdq_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes a model has."""
    ops = [n.op_type for n in model.graph.node]
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear")}


# What TensorRT's ONNX parser takes as explicit INT8 (modelopt's ONNX PTQ settings for ONNX Runtime's quantizer):
# symmetric int8 activations and per-channel weights, weights kept in float behind a Q/DQ pair, biases left in float
# (no int32 DequantizeLinear), Q/DQ only on the inputs of the ops modelopt quantises.
TRT_OP_TYPES = ["Add", "AveragePool", "BatchNormalization", "Clip", "Conv", "ConvTranspose", "Gemm",
                "GlobalAveragePool", "MatMul", "MaxPool", "Mul"]
TRT_SHAPED_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                      "AddQDQPairToWeight": True, "DedicatedQDQPair": False, "ForceQuantizeNoInputCheck": True,
                      "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1}}


def _ort_op_types() -> list[str]:
    """Every op type ONNX Runtime's static quantizer handles (quantize_static's default)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def _ort_quantize(fp32: Path, out: Path, calib: CalibrationSet, exclude: list[str], symmetric: bool,
                  cache: Path | None, say: Callable[[str], None]) -> ActivationRanges:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib.method not in ORT_METHODS:
        raise UserError(f"calibration method '{calib.method}' is not supported by ONNX Runtime",
                        where="calibration.method", fix=f"use one of {', '.join(ORT_METHODS)}")
    prepared = out.with_name(out.stem + ".prep.onnx")
    # Shape inference only: ORT's graph optimisations would rename nodes the exclusion list refers to.
    with quiet_tools():
        quant_pre_process(str(fp32), str(prepared), skip_optimization=True)
    try:
        op_types = TRT_OP_TYPES if symmetric else _ort_op_types()
        key = calibration_key(fp32, calib, "ort-symmetric" if symmetric else "ort-u8s8", symmetric)
        ranges = ActivationRanges.load(cache, key) if cache else None
        if ranges is None:
            ranges = calibrate_ort(prepared, _progress(calib), calib.method, symmetric, op_types, key)
            say(f"calibrated {ranges.images} images ({calib.method}, {len(ranges.ranges)} tensors) in "
                f"{ranges.seconds:.1f} s")
            if cache:
                ranges.save(cache)
        else:
            say(f"reused the calibration ranges in {cache.name} ({ranges.images} images, {calib.method})")
        options = (dict(TRT_SHAPED_OPTIONS, OpTypesToExcludeOutputQuantization=_op_types_in(prepared))
                   if symmetric else {"ActivationSymmetric": False, "WeightSymmetric": True})
        with quiet_tools():
            quantize_with_ranges(prepared, out, ranges, QuantType.QInt8 if symmetric else QuantType.QUInt8,
                                 exclude, op_types, options)
    finally:
        prepared.unlink(missing_ok=True)
    return ranges


def _op_types_in(path: Path) -> list[str]:
    return sorted({n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node})


def _progress(calib: CalibrationSet) -> Iterator[dict[str, np.ndarray]]:
    """The calibration feeds with a progress bar on a terminal (tqdm stays silent when output is redirected)."""
    from tqdm import tqdm

    yield from tqdm(calib.feeds_iter(), total=calib.num_batches(), desc="calibrating", unit="batch", disable=None,
                    leave=False)


@contextlib.contextmanager
def _ort_unpatched_afterwards() -> Iterator[None]:
    """modelopt patches ONNX Runtime's calibrators and quantizers in place, for good; undo that after the block so
    a later ORT quantization in the same process (cpu target, fallback, tests) runs ONNX Runtime's own code."""
    from onnxruntime.quantization import base_quantizer, calibrate, qdq_quantizer, registry

    owners = [calibrate, calibrate.CalibraterBase, calibrate.MinMaxCalibrater, calibrate.HistogramCalibrater,
              calibrate.HistogramCollector, qdq_quantizer.QDQQuantizer, base_quantizer.BaseQuantizer]
    saved = [(owner, dict(vars(owner))) for owner in owners]
    # modelopt also edits the op registries in place (drops Relu, Concat, ...; adds BatchNormalization).
    registries = [(table, dict(table)) for table in (registry.QDQRegistry, registry.QLinearOpsRegistry)]
    try:
        yield
    finally:
        for owner, before in saved:
            for key, value in before.items():
                if vars(owner).get(key) is not value:
                    setattr(owner, key, value)
        for table, before in registries:
            table.clear()
            table.update(before)


def _modelopt_quantize(fp32: Path, out: Path, calib: CalibrationSet, exclude: list[str], dla: bool,
                       cache: Path | None, say: Callable[[str], None]) -> ActivationRanges:
    """modelopt places the Q/DQ nodes; the activation ranges come from deploy.ranges (streaming, 2048-bin entropy
    or percentile, or MinMax), handed over as a calibration cache, unless ``calibration.per_node`` asks modelopt
    to calibrate itself node by node.

    modelopt's own ONNX calibration runs ONNX Runtime's calibrators with 128 histogram bins (it passes no bin
    count), so its 'entropy' is close to max calibration and its search time grows with the data's spread.
    """
    from modelopt.onnx.quantization import quantize as modelopt_quantize

    allowed = MODELOPT_METHODS if calib.per_node else ORT_METHODS
    if calib.method not in allowed:
        raise UserError(f"calibration method '{calib.method}' is not supported with modelopt"
                        f"{' per-node calibration' if calib.per_node else ''}", where="calibration.method",
                        fix=f"use one of {', '.join(allowed)}")
    key = calibration_key(fp32, calib, "modelopt", True)
    ranges = ActivationRanges.load(cache, key) if cache else None
    reused = ranges is not None
    if ranges is None and not calib.per_node:
        ranges = calibrate_ort(fp32, _progress(calib), calib.method, True, TRT_OP_TYPES, key)
        say(f"calibrated {ranges.images} images ({calib.method}, {len(ranges.ranges)} tensors) in "
            f"{ranges.seconds:.1f} s")
        if cache:
            ranges.save(cache)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modelopt.") as tmp:
        extra: dict[str, Any] = {}
        reader = calib.reader()
        if ranges is not None:
            # modelopt always runs its calibrator: on one image here, then every activation scale is overwritten
            # with the given one (and nothing is quantized that the ranges do not cover).
            extra["calibration_cache_path"] = str(write_trt_calibration_cache(ranges, Path(tmp) / "calib.cache"))
            reader = calib.reader(limit=1)
        with quiet_tools(), _ort_unpatched_afterwards():  # modelopt logs every step and prints progress bars
            modelopt_quantize(
                str(fp32), quantize_mode="int8", calibration_data_reader=reader,
                calibration_method=MODELOPT_METHODS.get(calib.method, "max"), calibration_eps=["cpu"],
                nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude],  # modelopt takes regular expressions
                high_precision_dtype="fp32",  # float parts stay fp32 so ORT on the CPU runs the very same graph
                output_path=str(out), log_level="ERROR", target_dla=dla,
                calibrate_per_node=calib.per_node and ranges is None,  # one node at a time: least memory
                **extra)
    if reused:
        say(f"reused the calibration ranges in {cache.name} ({ranges.images} images, {calib.method})")
    if ranges is not None:
        return ranges
    scales = modelopt_scales(onnx.load(str(out), load_external_data=False))
    ranges = ActivationRanges(calib.method, True, key, {t: (-127 * s, 127 * s) for t, s in scales.items()},
                              images=len(calib), seconds=time.perf_counter() - start, source="modelopt",
                              extra={"per_node": True})
    say(f"calibrated {len(calib)} images with modelopt per node ({calib.method}) in {ranges.seconds:.1f} s")
    if cache:
        ranges.save(cache)
    return ranges


@dataclass
class QuantizeResult:
    """What a quantization produced: path, quantizer actually used, nodes kept in float, Q/DQ counts."""

    path: Path
    quantizer: str
    requested: str
    kept_float: list[str] = field(default_factory=list)
    qdq: dict[str, int] = field(default_factory=dict)
    note: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (without the node list, which can be long)."""
        return {"file": self.path.name, "quantizer": self.quantizer, "requested": self.requested,
                "kept_float_nodes": len(self.kept_float), "qdq": self.qdq, "note": self.note,
                "calibration": self.calibration}


class QuantizeOnnx(BaseLoader):
    """Loader: quantize an FP32 ONNX file to an INT8 Q/DQ file; returns a QuantizeResult.

    With ``ranges_cache`` the calibration ranges are read from that file when it holds ranges of the same model,
    images and quantizer, and written there otherwise: the sensitivity pass re-quantizes without calibrating.
    """

    def __init__(self, fp32: str | Path | BaseLoader, out: str | Path, calib: CalibrationSet, quantizer: str,
                 keep_float: list[str] | tuple[str, ...] = (), dla: bool = False, ranges_cache: Path | None = None,
                 progress: Callable[[str], None] = lambda _msg: None):
        self.fp32, self.out, self.calib = fp32, Path(out), calib
        self.quantizer, self.keep_float, self.dla = quantizer, list(keep_float), dla
        self.ranges_cache, self.progress = ranges_cache, progress

    def call_impl(self) -> QuantizeResult:
        """Quantize with head outputs (and `keep_float`) excluded; writes atomically."""
        if len(self.calib) == 0:
            raise UserError("the calibration set is empty", where=f"calibration split '{self.calib.split}'",
                            fix="calibrate on at least one training image (calibration.images / --calib-images)")
        fp32 = Path(self.fp32() if callable(self.fp32) else self.fp32)
        model = onnx.load(str(fp32))
        exclude = list(dict.fromkeys(head_output_nodes(model) + self.keep_float))
        used, note = self.quantizer, ""
        if used == "modelopt" and missing("onnx-int8-modelopt"):
            used, note = "ort-symmetric", "nvidia-modelopt is not installed: used ONNX Runtime symmetric Q/DQ"
        tmp = self.out.with_name(self.out.stem + ".tmp.onnx")
        try:
            if used == "modelopt":
                ranges = _modelopt_quantize(fp32, tmp, self.calib, exclude, self.dla, self.ranges_cache,
                                            self.progress)
            elif used in ("ort-u8s8", "ort-symmetric"):
                ranges = _ort_quantize(fp32, tmp, self.calib, exclude, used == "ort-symmetric", self.ranges_cache,
                                       self.progress)
            else:
                raise UserError(f"unknown quantizer '{used}'", where="targets.*.quantizer",
                                fix="use ort-u8s8, modelopt or ort-symmetric")
            quantized = onnx.load(str(tmp))
            onnx.checker.check_model(quantized)
            os.replace(tmp, self.out)
        finally:
            tmp.unlink(missing_ok=True)
        return QuantizeResult(self.out, used, self.quantizer, exclude, qdq_counts(quantized), note,
                              calibration={"method": ranges.method, "images": ranges.images,
                                           "tensors": len(ranges.ranges), "seconds": round(ranges.seconds, 2),
                                           "source": ranges.source})
