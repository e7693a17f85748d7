"""Calibration that means what it says: streaming ranges with ONNX Runtime's calibrators, 2048-bin entropy and
percentile that differ from MinMax on heavy tails, and the entropy search equal to ONNX Runtime's own."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy.ranges import HISTOGRAM_BINS, calibrate_ort, cap_bins, entropy_threshold


def conv_model(path) -> str:
    """input (1, 1, 32, 32) -> 1x1 Conv (weight 1) -> output: the Conv's input is the calibrated activation."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 32, 32])
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return str(path)


def heavy_tailed(batches: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Mostly |x| < 3, plus rare outliers to +-200: the activations where MinMax wastes int8 levels."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_t(2, (1, 1, 32, 32)).astype(np.float32)} for _ in range(batches)]


def test_entropy_and_percentile_differ_from_minmax_on_a_heavy_tailed_activation(tmp_path):
    model = conv_model(tmp_path / "m.onnx")
    feeds = heavy_tailed(6)
    everything = np.concatenate([f["x"].ravel() for f in feeds])
    ranges = {m: calibrate_ort(model, iter(feeds), m, symmetric=False, op_types=["Conv"], key="k").ranges["x"]
              for m in ("minmax", "entropy", "percentile")}
    # MinMax streams: the running min / max over all batches
    assert ranges["minmax"] == pytest.approx((everything.min(), everything.max()), rel=1e-6)
    width = {m: hi - lo for m, (lo, hi) in ranges.items()}
    assert width["entropy"] < 0.5 * width["minmax"]
    assert width["percentile"] < width["minmax"]
    assert ranges["entropy"] != ranges["percentile"]


class _AllBatches:
    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def test_onnxruntime_entropy_at_128_bins_is_minmax(tmp_path):
    """Why the bin count matters: quantize_static's entropy (one collect_data over every image: 128 bins, 128
    quantized bins) has one candidate threshold, the full range."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    model = conv_model(tmp_path / "m.onnx")
    calibrator = create_calibrator(model, ["Conv"], str(tmp_path / "aug.onnx"), CalibrationMethod.Entropy,
                                   extra_options={"num_bins": 128, "num_quantized_bins": 128})
    feeds = heavy_tailed(6)
    with contextlib.redirect_stdout(io.StringIO()):
        calibrator.collect_data(_AllBatches(feeds))  # what quantize_static does: every activation kept, then one pass
        lo, hi = calibrator.compute_data()["x"].range_value
    everything = np.concatenate([f["x"].ravel() for f in feeds])
    assert (hi - lo) == pytest.approx(everything.max() - everything.min(), rel=0.05)
    ours = calibrate_ort(model, iter(feeds), "entropy", symmetric=False, op_types=["Conv"], key="k").ranges["x"]
    assert ours[1] - ours[0] < 0.5 * (hi - lo)


@pytest.mark.parametrize("seed,relu", [(0, False), (1, True)])
def test_entropy_threshold_equals_onnxruntimes(seed, relu):
    """The array-operation search returns ONNX Runtime's get_entropy_threshold result (512 bins: ORT's own loop
    takes seconds there, minutes at 2048)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(seed)
    data = np.concatenate([rng.standard_t(3, 20000), rng.laplace(0, 2, 5000)]).astype(np.float32)
    data = np.maximum(data, 0) if relu else data
    collector = HistogramCollector("entropy", False, 512, 128, None, None)
    with contextlib.redirect_stdout(io.StringIO()):
        collector.collect({"t": [data[:10000]]})
        collector.collect({"t": [data[10000:] * 10]})  # a wider batch: the histogram grows past 512 bins
    histogram = collector.histogram_dict["t"]
    assert histogram[0].size > 512
    expected = collector.get_entropy_threshold(histogram, 128)
    assert [float(v) for v in entropy_threshold(histogram, 128)] == [float(v) for v in expected]


def test_cap_bins_keeps_zero_and_counts():
    rng = np.random.default_rng(0)
    data = rng.normal(0, 1, 10000).astype(np.float32)
    edges = np.linspace(-5, 5, 3001).astype(np.float32)
    hist, _ = np.histogram(data, edges)
    capped, new_edges, *_ = cap_bins((hist, edges, data.min(), data.max(), np.float32(5)), HISTOGRAM_BINS)
    assert capped.size <= HISTOGRAM_BINS and capped.sum() == hist.sum()
    assert 0.0 in new_edges and new_edges[0] == -new_edges[-1] and new_edges[-1] >= 5
