"""INT8 Q/DQ: the right quantizer per target, head outputs left in float, calibration rules, sensitivity pass."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import json

import cv2
import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper

from deploy import quantize as quantize_mod
from deploy.calibration import CalibrationSet, calibration_set, choose_records, preprocess_spec
from deploy.export import ExportOnnx, SimplifyOnnx, deploy_network
from deploy.fidelity import ort_session
from deploy.gate import ModelScore, accuracy_gate, float_groups, layer_groups
from deploy.quantize import QuantizeOnnx, head_output_nodes, int8_weight_nodes, prediction_layers, quantized_nodes
from deploy.ranges import ActivationRanges
from distill.models import build_detector
from runtime.errors import UserError
from runtime.preprocess import preprocess_batch, read_image
from runtime.records import ImageRecord

SIZE = 64


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    spec = SimpleNamespace(arch="retinanet", backbone="resnet18", fpn_width=16, head_convs=1,
                           pretrained_backbone=False, norm="bn")
    model = build_detector(spec, 3, SIZE).eval()
    out = tmp_path_factory.mktemp("q") / "model_fp32.onnx"
    return SimplifyOnnx(ExportOnnx(deploy_network(model, SIZE), out, SIZE))()


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> CalibrationSet:
    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        path = root / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (80, 96, 3), np.uint8))
        records.append(ImageRecord(path, 96, 80))
    return CalibrationSet(records, preprocess_spec(SIZE), "train", str(root), "minmax", 0)


@pytest.fixture(scope="module")
def modelopt_int8(fp32_path, calib, tmp_path_factory):
    return QuantizeOnnx(fp32_path, tmp_path_factory.mktemp("mo") / "int8.onnx", calib, "modelopt")()


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def quant_params(model: onnx.ModelProto) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Zero points of activation QuantizeLinear nodes, and scales of weight DequantizeLinear nodes (int8 inits)."""
    inits = {i.name for i in model.graph.initializer}
    zero_points = [_init(model, n.input[2]) for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[0] not in inits and len(n.input) > 2]
    weight_scales = [_init(model, n.input[1]) for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    return zero_points, weight_scales


def assert_head_outputs_float(model: onnx.ModelProto) -> None:
    outputs = prediction_layers(model)
    assert len(outputs) == 10  # cls_logits + bbox_reg convs on 5 levels
    assert not {n.name for n in outputs} & int8_weight_nodes(model)
    assert all(model.graph.initializer and n.input[1] in {i.name for i in model.graph.initializer} for n in outputs)
    produced = {o for n in outputs for o in n.output}
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in produced]
    assert len(int8_weight_nodes(model)) > 30  # everything else that has weights is int8


def test_cpu_quantizer_u8_activations_s8_per_channel_weights(fp32_path, calib, tmp_path):
    result = QuantizeOnnx(fp32_path, tmp_path / "int8.onnx", calib, "ort-u8s8")()
    model = onnx.load(str(result.path))
    assert result.quantizer == "ort-u8s8" and result.qdq["QuantizeLinear"] > 0
    zero_points, weight_scales = quant_params(model)
    assert zero_points and all(z.dtype == np.uint8 for z in zero_points)
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_quantized")]
    assert any(w.dtype == np.int8 for w in weights)
    assert any(s.size > 1 for s in weight_scales)  # per-channel
    assert_head_outputs_float(model)
    feed = {"images": next(calib.batches())}
    q, f = ort_session(result.path).run(None, feed), ort_session(fp32_path).run(None, feed)
    assert np.abs(q[1] - f[1]).max() < 0.1 and not np.array_equal(q[1], f[1])


def test_tensorrt_quantizer_is_symmetric(modelopt_int8):
    result = modelopt_int8
    assert result.quantizer == "modelopt" and result.note == ""
    model = onnx.load(str(result.path))
    zero_points, _ = quant_params(model)
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert_head_outputs_float(model)


def quantized_op_types(model: onnx.ModelProto) -> Counter:
    names = quantized_nodes(model)
    return Counter(n.op_type for n in model.graph.node if n.name in names)


def test_fallback_without_modelopt_is_shaped_like_modelopts(fp32_path, calib, modelopt_int8, tmp_path, monkeypatch):
    """The ONNX Runtime fallback for TensorRT targets writes what TensorRT's parser takes, as modelopt does:
    symmetric int8, no int32 bias DequantizeLinear, float weights behind Q/DQ pairs, the same ops quantised."""
    monkeypatch.setattr(quantize_mod, "missing", lambda fmt: ["nvidia-modelopt[onnx]"])
    result = QuantizeOnnx(fp32_path, tmp_path / "int8.onnx", calib, "modelopt")()
    assert result.quantizer == "ort-symmetric" and "modelopt" in result.note
    model = onnx.load(str(result.path))
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert not [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and inits[n.input[0]].data_type == onnx.TensorProto.INT32]  # biases stay float
    producers = {o: n for n in model.graph.node for o in n.output}
    for conv in (n for n in model.graph.node if n.name in int8_weight_nodes(model)):
        dq = producers[conv.input[1]]
        q = producers[dq.input[0]]  # weight -> QuantizeLinear -> DequantizeLinear -> Conv
        assert q.op_type == "QuantizeLinear" and inits[q.input[0]].data_type == onnx.TensorProto.FLOAT
    assert_head_outputs_float(model)
    assert quantized_op_types(model) == quantized_op_types(onnx.load(str(modelopt_int8.path)))


def test_head_output_nodes_cover_everything_after_the_convs(fp32_path):
    model = onnx.load(str(fp32_path))
    names = head_output_nodes(model)
    producers = {o: n.name for n in model.graph.node for o in n.output}
    assert {producers[o.name] for o in model.graph.output} <= set(names)  # the output Concat nodes
    assert not [n for n in names if n.startswith("/backbone/")]


def test_sensitivity_keeps_groups_in_float_until_the_gate_passes(fp32_path, calib, modelopt_int8, tmp_path):
    out, first = tmp_path / "int8.onnx", modelopt_int8
    int8, fp32 = onnx.load(str(first.path)), onnx.load(str(fp32_path))
    groups = dict(layer_groups(int8, 8))
    assert {"stem", "layer1", "fpn", "cls_tower", "reg_tower"} <= set(groups)
    everything = float_groups(int8, fp32, [n for nodes in groups.values() for n in nodes])
    feed = {"images": next(calib.batches())}
    np.testing.assert_allclose(ort_session(everything).run(None, feed)[0],
                               ort_session(fp32_path).run(None, feed)[0], atol=1e-4)
    requantized: list[list[str]] = []
    scores = iter([0.30, 0.50])  # int8 AP50 before / after keeping the most sensitive group in float

    def evaluate(paths):
        result = {"int8": ModelScore("int8", next(scores), 0.1, 4, 1.0)}
        if "fp32" in paths:
            result["fp32"] = ModelScore("fp32", 0.50, 0.2, 4, 2.0)
        return result

    def requantize(keep):
        requantized.append(list(keep))
        return QuantizeOnnx(fp32_path, out, calib, "modelopt", keep)()

    report, final = accuracy_gate(fp32_path, first, requantize, evaluate, limit=1.0, max_groups=8,
                                  feeds=calib.feeds(2), report_path=tmp_path / "gate.json")
    assert report.passed and report.drop_ap50 == pytest.approx(0.0)
    assert len(report.sensitivity) == len(groups) and report.kept_float_groups == [report.sensitivity[0]["group"]]
    assert (tmp_path / "gate.json").is_file()
    kept = set(requantized[0])
    assert kept and not kept & int8_weight_nodes(onnx.load(str(final.path)))


def test_too_few_calibration_images_says_how_many():
    records = [ImageRecord(Path(f"{i}.png"), 10, 10) for i in range(3)]
    with pytest.raises(UserError, match="found 3, 5 requested") as err:
        choose_records(records, 5, seed=0, where="data split 'train'")
    assert "--calib-images 3" in err.value.line()
    assert choose_records(records, 2, 0, "x") == choose_records(records, 2, 0, "x")  # seeded


def test_calibration_never_uses_the_test_split():
    pipe = SimpleNamespace(calibration=SimpleNamespace(images=4, split="val", method="entropy", seed=0),
                           dataset=SimpleNamespace(test_split="val", train_split="train"))
    with pytest.raises(UserError, match="test split"):
        calibration_set(pipe, SIZE)


def test_calibration_uses_runtime_preprocessing(calib):
    expected = preprocess_batch([read_image(calib.records[0].path)], calib.spec)[0]
    np.testing.assert_array_equal(next(calib.batches()), expected)
    manifest = calib.manifest()
    assert manifest["count"] == 4 and manifest["preprocess"]["input_size"] == [SIZE, SIZE]
    assert all(len(img["sha256"]) == 64 for img in manifest["images"])


def _forbid_calibration(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("calibrated again instead of reusing the cached ranges")

    monkeypatch.setattr(quantize_mod, "calibrate_ort", refuse)


def test_sensitivity_requantization_reuses_cached_ranges(fp32_path, calib, tmp_path, monkeypatch):
    """ONNX Runtime: the ranges of the first quantization are cached; re-quantizing with groups kept in float reads
    them back instead of calibrating (same scales on the tensors both models quantize)."""
    cache = tmp_path / "ranges.json"
    first = QuantizeOnnx(fp32_path, tmp_path / "a.onnx", calib, "ort-u8s8", ranges_cache=cache)()
    cached = json.loads(cache.read_text())
    assert cached["images"] == 4 and cached["method"] == "minmax" and len(cached["ranges"]) > 30
    _forbid_calibration(monkeypatch)
    groups = dict(layer_groups(onnx.load(str(first.path)), 8))
    again = QuantizeOnnx(fp32_path, tmp_path / "b.onnx", calib, "ort-u8s8", groups["layer1"], ranges_cache=cache)()
    assert again.calibration["images"] == 4 and again.qdq["QuantizeLinear"] < first.qdq["QuantizeLinear"]
    scales = lambda m: {n.input[0]: numpy_helper.to_array(_inits(m)[n.input[1]]).item()  # noqa: E731
                        for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in _inits(m)}
    a, b = scales(onnx.load(str(first.path))), scales(onnx.load(str(again.path)))
    shared = set(a) & set(b)
    assert len(shared) > 20 and all(a[t] == b[t] for t in shared)
    # A cache from other inputs (another method) is not reused: it calibrates.
    other = CalibrationSet(calib.records, calib.spec, "train", calib.dataset_root, "entropy", 0)
    with pytest.raises(AssertionError, match="calibrated again"):
        QuantizeOnnx(fp32_path, tmp_path / "c.onnx", other, "ort-u8s8", ranges_cache=cache)()


def _activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    inits = _inits(model)
    return {n.input[0]: numpy_helper.to_array(inits[n.input[1]]).item()
            for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_modelopt_takes_our_ranges_and_reuses_them(fp32_path, calib, tmp_path, monkeypatch):
    """modelopt places Q/DQ, the scales are deploy.ranges' (amax / 127), and re-quantizing reads the cache."""
    cache = tmp_path / "ranges.json"
    first = QuantizeOnnx(fp32_path, tmp_path / "a.onnx", calib, "modelopt", ranges_cache=cache)()
    ranges = ActivationRanges.load(cache, json.loads(cache.read_text())["key"])
    assert ranges is not None and ranges.source == "onnxruntime" and ranges.images == 4
    scales = _activation_scales(onnx.load(str(first.path)))
    assert len(scales) > 20
    for tensor, scale in scales.items():
        lo, hi = ranges.ranges[tensor]
        assert scale == pytest.approx(max(abs(lo), abs(hi)) / 127, rel=1e-6)
    _forbid_calibration(monkeypatch)
    again = QuantizeOnnx(fp32_path, tmp_path / "b.onnx", calib, "modelopt", ranges_cache=cache)()
    assert _activation_scales(onnx.load(str(again.path))) == pytest.approx(scales, rel=1e-6)


def test_modelopt_per_node_calibration_when_asked(fp32_path, calib, tmp_path, monkeypatch):
    """calibration.per_node hands calibration to modelopt's per-node mode (its scales are then cached)."""
    import modelopt.onnx.quantization as mq

    _forbid_calibration(monkeypatch)  # modelopt calibrates itself
    real, seen = mq.quantize, {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        # Per-node calibration is modelopt's (slow on a loaded CPU); here only that it is asked for is checked.
        return real(*args, **{**kwargs, "calibrate_per_node": False})

    monkeypatch.setattr(mq, "quantize", spy)
    per_node = CalibrationSet(calib.records, calib.spec, "train", calib.dataset_root, "max", 0, per_node=True)
    cache = tmp_path / "ranges.json"
    result = QuantizeOnnx(fp32_path, tmp_path / "a.onnx", per_node, "modelopt", ranges_cache=cache)()
    assert seen["calibrate_per_node"] is True and "calibration_cache_path" not in seen
    assert result.calibration["source"] == "modelopt" and result.qdq["QuantizeLinear"] > 20
    assert json.loads(cache.read_text())["extra"] == {"per_node": True}


def _inits(model: onnx.ModelProto) -> dict:
    return {i.name: i for i in model.graph.initializer}


def test_empty_calibration_set_is_one_clear_error(fp32_path, tmp_path):
    empty = CalibrationSet([], preprocess_spec(SIZE), "train", str(tmp_path), "minmax", 0)
    with pytest.raises(UserError, match="calibration set is empty") as err:
        QuantizeOnnx(fp32_path, tmp_path / "int8.onnx", empty, "ort-u8s8")()
    assert "--calib-images" in err.value.line()
    assert not (tmp_path / "int8.onnx").exists()
    with pytest.raises(UserError, match="no images"):
        choose_records([], 4, 0, "data split 'train'")


def test_calibration_count_defaults_to_500_or_the_whole_split(tmp_path):
    from conftest import tiny_config
    from runtime.config import load_config

    config = tiny_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    del data["pipelines"]["tiny"]["calibration"]["images"]  # the pipeline names no count
    config.write_text(yaml.safe_dump(data))
    pipe = load_config(config).pipeline()
    assert pipe.calibration.images == 500
    assert len(calibration_set(pipe, SIZE)) == 12  # the whole (12-image) split: it has fewer than 500
    with pytest.raises(UserError, match="found 12, 20 requested"):
        calibration_set(pipe, SIZE, 20)  # an explicit count is exact
