"""Activation ranges for INT8: calibration whose memory does not grow with the number of images, and its cache.

ONNX Runtime's ``quantize_static`` keeps every activation of every calibration image until the end (8.3 GB for two
800 px images of a ResNet-101 RetinaNet) and runs entropy calibration with 128 histogram bins, where 128 quantized
bins leave a single candidate threshold: the full range, i.e. MinMax. Here ONNX Runtime's own calibrators
(``onnxruntime.quantization.calibrate.create_calibrator``) are fed one batch per ``collect_data`` call:

- MinMax merges each batch's minimum and maximum into the running range (``MinMaxCalibrater`` keeps nothing else);
- entropy and percentile merge each batch into one histogram per tensor (``HistogramCollector``) with 2048 bins,
  TensorRT's entropy calibrator's count, so the KL search over thresholds (128 quantized bins) and the 99.999th
  percentile have real choices; the histogram widens (same bin width, more bins) when a later batch goes further.
  Before the entropy search a widened histogram is merged back to at most 2048 bins, and the search itself is
  ``entropy_threshold``: ONNX Runtime's ``get_entropy_threshold`` (same candidates, smoothing and KL divergence,
  equal results: tests/test_calibration.py) with its per-bin Python loops replaced by array operations. Left as it
  is it takes minutes per tensor at 2048 bins.

Memory is then one batch's activations plus one histogram per tensor, whatever the image count. The ranges are
cached as JSON in the bundle's build folder; the sensitivity pass re-quantizes from that file instead of
calibrating again. ``quantize_with_ranges`` is the quantization half of ``quantize_static`` (ONNX Runtime's
``QDQQuantizer`` fed ranges instead of a data reader).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import write_bytes_atomic, write_json_atomic
from runtime.errors import UserError

HISTOGRAM_BINS = 2048  # TensorRT's entropy calibrator's histogram
QUANTIZED_BINS = 128  # int8 levels on one side of zero: the KL search's target resolution
PERCENTILE = 99.999
ORT_METHODS = {"entropy": "Entropy", "max": "MinMax", "minmax": "MinMax", "percentile": "Percentile"}
RANGES_FILE = "calibration_ranges.json"


@dataclass
class ActivationRanges:
    """Per-tensor activation ranges (lowest, highest) and what they were computed from."""

    method: str
    symmetric: bool
    key: str  # hash of the model and calibration inputs: a cache from other inputs is never reused
    ranges: dict[str, tuple[float, float]]
    images: int = 0
    seconds: float = 0.0
    source: str = "onnxruntime"  # or "modelopt" (scales read back from its Q/DQ model)
    extra: dict[str, Any] = field(default_factory=dict)

    def tensors_data(self) -> Any:
        """A fresh onnxruntime TensorsData (the quantizer adjusts ranges in place, so never share one)."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

        return TensorsData(CalibrationMethod.MinMax, {
            name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in self.ranges.items()})

    def save(self, path: Path) -> Path:
        """Write the cache atomically."""
        return write_json_atomic(Path(path), asdict(self), indent=1)

    @classmethod
    def load(cls, path: Path, key: str) -> ActivationRanges | None:
        """The cached ranges at ``path`` if they were computed from the same inputs (``key``), else None."""
        path = Path(path)
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != key:
            return None
        data["ranges"] = {k: (float(v[0]), float(v[1])) for k, v in data["ranges"].items()}
        return cls(**data)


def calibration_key(model_path: Path, calib: Any, quantizer: str, symmetric: bool) -> str:
    """Hash of what the ranges depend on: the model bytes, the images and preprocessing, method and quantizer."""
    digest = hashlib.sha256(Path(model_path).read_bytes())
    digest.update(json.dumps({"images": [str(r.path) for r in calib.records],
                              "spec": calib.spec.model_dump(mode="json"), "method": calib.method, "quantizer": quantizer, "symmetric": symmetric,
                              "bins": HISTOGRAM_BINS, "per_node": getattr(calib, "per_node", False)},
                             sort_keys=True).encode())
    return digest.hexdigest()


class _OneBatch:
    """A CalibrationDataReader over one feed: each collect_data call sees exactly one batch."""

    def __init__(self, feed: dict[str, np.ndarray]):
        self._feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self._feed = self._feed, None
        return feed


def cap_bins(histogram: tuple, max_bins: int = HISTOGRAM_BINS) -> tuple:
    """A zero-centred histogram (hist, edges, min, max, threshold) merged to at most ``max_bins`` bins.

    Bins are merged ``factor`` at a time outward from zero (empty bins pad the ends), so zero stays an edge.
    """
    hist, edges, lo, hi, threshold = histogram
    if hist.size <= max_bins:
        return histogram
    factor = -(-hist.size // max_bins)
    half = hist.size // 2
    new_half = -(-half // factor)
    pad = new_half * factor - half
    merged = np.pad(hist, (pad, pad)).reshape(-1, factor).sum(axis=1)
    stride = (edges[-1] - edges[0]) / hist.size
    width = new_half * factor * stride
    new_edges = np.linspace(-width, width, 2 * new_half + 1).astype(edges.dtype)
    return merged, new_edges, lo, hi, np.array(width, dtype=edges.dtype)


def entropy_threshold(histogram: tuple, num_quantized_bins: int = QUANTIZED_BINS) -> tuple[np.ndarray, np.ndarray]:
    """The (low, high) threshold minimising the KL divergence between the histogram and its int8 version.

    ONNX Runtime's HistogramCollector.get_entropy_threshold, computed with array operations (same candidates
    i = Q/2 .. zero bin, same outlier folding, merging into Q bins, expansion over non-zero bins with int64
    truncation, smoothing and entropy).
    """
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist, edges = histogram[0], histogram[1]
    num_bins = hist.size
    zero = num_bins // 2
    half_q = num_quantized_bins // 2
    cumulative = np.concatenate([[0], np.cumsum(hist)])
    best, best_div = (edges[zero - half_q], edges[min(zero + half_q + 1, num_bins)]), np.inf
    for i in range(half_q, zero + 1):
        start, end = zero - i, min(zero + i + 1, num_bins)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += cumulative[start]
        p[-1] += cumulative[-1] - cumulative[end]
        merged = sliced.size // num_quantized_bins
        body = num_quantized_bins * merged
        quantized = sliced[:body].reshape(num_quantized_bins, merged).sum(axis=1)
        quantized[-1] += sliced[body:].sum()
        norm = (p[:body] != 0).reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_bin = np.where(norm != 0, quantized / np.where(norm != 0, norm, 1), 0)
        q[:body] = np.repeat(per_bin, merged).astype(np.int64)  # ONNX Runtime assigns floats into int64: truncates
        p_s, q_s = smooth_distribution(p), smooth_distribution(q)
        # ONNX Runtime keeps each divergence in the histogram's dtype (float32) before the argmin.
        div = np.inf if p_s is None or q_s is None else float(np.asarray(entropy(p_s, q_s), dtype=edges.dtype))
        if div < best_div:  # the first minimum, as np.argmin
            best, best_div = (edges[start], edges[end]), div
    lo, hi = best
    if lo < histogram[2]:
        lo = histogram[2]
    if hi > histogram[3]:
        hi = histogram[3]
    return np.asarray(lo), np.asarray(hi)


def calibrate_ort(model_path: Path, feeds: Iterable[dict[str, np.ndarray]], method: str, symmetric: bool,
                  op_types: list[str], key: str, progress: Callable[[int], None] = lambda _n: None
                  ) -> ActivationRanges:
    """Streaming calibration with ONNX Runtime's calibrator for ``method``: one batch in memory at a time."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    if method not in ORT_METHODS:
        raise UserError(f"calibration method '{method}' is not supported by ONNX Runtime", "calibration.method",
                        f"use one of {', '.join(ORT_METHODS)}")
    # Percentile always uses the signed-value histogram (bins over [-t, t]): ONNX Runtime's absolute-value variant
    # bins [min|x|, max|x|] and fails on a near-constant tensor ("cannot create 2048 finite-sized bins"). A
    # symmetric quantizer then takes max(|low|, |high|) of the two-sided percentiles.
    options = {"symmetric": symmetric and method != "percentile", "num_bins": HISTOGRAM_BINS,
               "num_quantized_bins": QUANTIZED_BINS, "percentile": PERCENTILE}
    start, count = time.perf_counter(), 0
    with tempfile.TemporaryDirectory(prefix="calib.") as tmp:
        calibrator = create_calibrator(Path(model_path), op_types, str(Path(tmp) / "augmented.onnx"),
                                       getattr(CalibrationMethod, ORT_METHODS[method]), extra_options=options)
        for feed in feeds:
            with contextlib.redirect_stdout(io.StringIO()):  # the collector prints a line per call
                calibrator.collect_data(_OneBatch(feed))
            count += 1
            progress(count)
        if count == 0:
            raise UserError("the calibration set is empty", "calibration",
                            "calibrate on at least one training image (calibration.images / --calib-images)")
        if method == "entropy":
            ranges = {name: entropy_threshold(cap_bins(h)) for name, h in calibrator.collector.histogram_dict.items()}
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                ranges = {name: td.range_value for name, td in calibrator.compute_data().items()}
        del calibrator  # holds the session on the augmented model
    ranges = {name: (float(np.asarray(lo).min()), float(np.asarray(hi).max())) for name, (lo, hi) in ranges.items()}
    ranges = {name: (min(lo, hi), max(lo, hi)) for name, (lo, hi) in ranges.items()}  # near-constant tensors
    return ActivationRanges(method, symmetric, key, ranges, images=count, seconds=time.perf_counter() - start)


def quantize_with_ranges(prepared: Path, out: Path, ranges: ActivationRanges, activation_type: Any,
                         exclude: list[str], op_types: list[str], extra_options: dict[str, Any]) -> None:
    """ONNX Runtime static Q/DQ quantization with given ranges (int8 per-channel weights), no data reader."""
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantType, load_model_with_shape_infer, update_opset_version

    model = update_opset_version(load_model_with_shape_infer(Path(prepared)), QuantType.QInt8)
    quantizer = QDQQuantizer(model, True, False, QuantType.QInt8, activation_type, ranges.tensors_data(), [], exclude,
                             op_types, extra_options)
    quantizer.quantize_model()
    quantizer.model.save_model_to_file(str(out), False)


def modelopt_scales(model: Any) -> dict[str, float]:
    """Activation scales of a modelopt Q/DQ model: QuantizeLinear of a non-constant input -> its scale value."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    scales = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits and node.input[1] in inits:
            value = numpy_helper.to_array(inits[node.input[1]])
            if value.size == 1:
                scales[node.input[0]] = float(value.reshape(-1)[0])
    return scales


def write_trt_calibration_cache(ranges: ActivationRanges, path: Path) -> Path:
    """The ranges as a TensorRT-style calibration cache (scale = amax / 127 per tensor, big-endian float hex),
    the format modelopt's ``calibration_cache_path`` reads."""
    lines = ["TRT-8501-EntropyCalibration2"]
    for name, (lo, hi) in sorted(ranges.ranges.items()):
        scale = max(abs(lo), abs(hi)) / 127.0
        lines.append(f"{name}: {np.array(scale, '>f4').tobytes().hex()}")
    return write_bytes_atomic(Path(path), ("\n".join(lines) + "\n").encode())
