"""Backends: the runner interface, ONNX Runtime providers, backend / model choice, the TensorRT path without
TensorRT, and the machine facts the latency harness reports."""
from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_detector_equivalence import make_tiny_bundle

from runtime import machine
from runtime.backends import trt as trt_backend
from runtime.backends.ort import OrtRunner, gpu_present
from runtime.backends.select import select_backend
from runtime.backends.trt import TrtRunner
from runtime.errors import UserError
from runtime.manifest import load_bundle

no_gpu = pytest.mark.skipif(gpu_present(), reason="checks the behaviour on a machine without a GPU")
no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")


@pytest.fixture(scope="module")
def relu_onnx(tmp_path_factory) -> Path:
    """A one-node model: y = relu(x), x of shape (batch, 3)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path_factory.mktemp("relu") / "relu.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("backend_bundles")
    make_tiny_bundle(root / "plain", size=64)
    make_tiny_bundle(root / "both", size=64, int8_copy=True)
    make_tiny_bundle(root / "engine", size=64, engine=True)
    return root


def test_runner_lifecycle_and_inference(relu_onnx):
    runner = OrtRunner(relu_onnx, "cpu", threads=1)
    with pytest.raises(RuntimeError, match="activated"):
        runner.infer({"x": np.zeros((1, 3), np.float32)})
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.0]], np.float32)
    with runner as active:
        assert active.is_active and active.get_output_names() == ["y"]
        assert active.get_input_metadata()["x"].static_batch is None  # dynamic batch axis
        out = active.infer({"x": x})
        np.testing.assert_array_equal(out["y"], np.maximum(x, 0))
        assert active.last_inference_time() is not None and active.last_inference_time() > 0
        assert active.describe()["intra_op_threads"] == 1 and active.describe()["providers"] == ["CPUExecutionProvider"]
        with pytest.raises(ValueError, match="do not match"):
            active.infer({"images": x})
        with pytest.raises(ValueError, match="expects"):
            active.infer({"x": x[:, :2]})
    assert not runner.is_active
    runner.deactivate()  # a second deactivate is harmless


def test_missing_or_corrupt_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        OrtRunner(tmp_path / "nothing.onnx").activate()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(UserError, match="cannot load the model"):
        OrtRunner(bad).activate()


@no_gpu
def test_auto_runs_on_the_cpu_without_a_gpu(bundles):
    choice = select_backend(load_bundle(bundles / "plain"))
    assert choice.backend == "ort-cpu" and choice.precision == "fp32" and "no usable GPU" in choice.reason


@no_gpu
def test_forced_cuda_without_a_gpu_says_so(bundles):
    runner = select_backend(load_bundle(bundles / "plain"), "ort-cuda").runner
    with pytest.raises(UserError, match="CUDAExecutionProvider"):
        runner.activate()


def test_precision_choice(bundles):
    both = load_bundle(bundles / "both")
    auto = select_backend(both, "ort-cpu")
    assert auto.precision == "int8" and auto.model_path.name == "model_int8.onnx"
    assert select_backend(both, "ort-cpu", "fp32").model_path.name == "model_fp32.onnx"
    with pytest.raises(UserError, match="no int8 ONNX model .*fp32"):
        select_backend(load_bundle(bundles / "plain"), "ort-cpu", "int8")
    with pytest.raises(UserError, match="unknown backend"):
        select_backend(both, "onnx")


def test_trt_backend_needs_an_engine(bundles):
    with pytest.raises(UserError, match="no TensorRT engine"):
        select_backend(load_bundle(bundles / "plain"), "trt")


@no_tensorrt
def test_engine_without_tensorrt_is_a_clear_error(bundles):
    choice = select_backend(load_bundle(bundles / "engine"), "trt")
    assert isinstance(choice.runner, TrtRunner)
    with pytest.raises(UserError, match="TensorRT is not installed") as err:
        choice.runner.activate()
    assert "--backend ort-cpu" in err.value.line() and "\n" not in err.value.line()
    # auto never picks an engine it cannot run
    assert select_backend(load_bundle(bundles / "engine")).backend.startswith("ort-")


@pytest.mark.parametrize(("gpu", "version", "message"), [
    ("NVIDIA H100 80GB HBM3", "10.3.0.30", "built for GPU 'Orin'"),
    ("Orin", "10.7.0", "built with TensorRT 10.3.0.30"),
])
def test_engine_for_another_gpu_or_tensorrt_is_refused(bundles, monkeypatch, gpu, version, message):
    """The compatibility check runs before TensorRT touches the engine (faked TensorRT module: not executed here)."""
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda where="": types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(trt_backend, "current_gpu_name", lambda: gpu)
    runner = select_backend(load_bundle(bundles / "engine"), "trt").runner
    with pytest.raises(UserError, match=message):
        runner.activate()
    assert not runner.is_active


def test_jetson_facts_parse_the_real_formats(tmp_path, monkeypatch):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: ...\n")
    assert machine.l4t_release(release) == "R36.3.0"
    assert machine.l4t_release(tmp_path / "absent") == "unavailable"
    line = ("RAM 2431/7620MB (lfb 3x4MB) CPU [2%@729,1%@729] EMC_FREQ 0% GR3D_FREQ 0% cpu@47.5C "
            "VDD_IN 4812mW/4790mW VDD_CPU_GPU_CV 602mW/598mW VDD_SOC 1403mW/1400mW")
    assert machine.parse_tegrastats_power(line) == {"VDD_IN": 4812.0, "VDD_CPU_GPU_CV": 602.0, "VDD_SOC": 1403.0}
    outputs = {"nvpmodel": "NV Power Mode: 15W\n0\n",
               "jetson_clocks": "SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano\n"
                                "cpu0: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1\n"
                                "cpu1: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1\n"}
    monkeypatch.setattr(machine, "_run", lambda cmd, timeout=5.0: outputs.get(cmd[0]))
    assert machine.nvpmodel_mode() == "15W (mode 0)"
    assert machine.jetson_clocks_state() == "on"
    outputs["jetson_clocks"] = outputs["jetson_clocks"].replace("MinFreq=1510400 MaxFreq", "MinFreq=729600 MaxFreq")
    assert machine.jetson_clocks_state() == "off"


@pytest.mark.skipif(Path("/etc/nv_tegra_release").exists(), reason="on a Jetson these facts exist")
def test_machine_facts_say_unavailable_off_a_jetson():
    facts = machine.machine_facts()
    assert facts["cpu_model"] and facts["cpu_cores_logical"] >= 1
    assert facts["versions"]["numpy"] == np.__version__
    assert set(facts["jetson"].values()) == {"unavailable"}
    with machine.TegrastatsSampler() as power:
        pass
    assert power.summary() == "unavailable"
