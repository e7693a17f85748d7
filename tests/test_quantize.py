"""INT8 Q/DQ: the right quantizer per target, head outputs left in float, calibration rules, sensitivity pass."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from deploy import quantize as quantize_mod
from deploy.calibration import CalibrationSet, calibration_set, choose_records, preprocess_spec
from deploy.export import ExportOnnx, SimplifyOnnx, deploy_network
from deploy.fidelity import ort_session
from deploy.gate import ModelScore, accuracy_gate, float_groups, layer_groups
from deploy.quantize import QuantizeOnnx, head_output_nodes, int8_weight_nodes, prediction_layers
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


def test_fallback_without_modelopt(fp32_path, calib, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_mod, "missing", lambda fmt: ["nvidia-modelopt[onnx]"])
    result = QuantizeOnnx(fp32_path, tmp_path / "int8.onnx", calib, "modelopt")()
    assert result.quantizer == "ort-symmetric" and "modelopt" in result.note
    model = onnx.load(str(result.path))
    zero_points, _ = quant_params(model)
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert_head_outputs_float(model)


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
