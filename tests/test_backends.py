"""Backends: the runner interface, ONNX Runtime providers, backend / model choice, the TensorRT path without
TensorRT, and the machine facts the latency harness reports."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_detector_equivalence import make_tiny_bundle

from runtime import machine
from runtime.atomic import write_json_atomic
from runtime.backends import trt as trt_backend
from runtime.backends.ort import OrtRunner, gpu_present
from runtime.backends.select import select_backend
from runtime.backends.trt import TrtRunner
from runtime.detector import Detector
from runtime.errors import UserError
from runtime.manifest import DeviceIdentity, file_sha256, load_bundle

no_gpu = pytest.mark.skipif(gpu_present(), reason="checks the behaviour on a machine without a GPU")
no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
DOUBLES = Path(__file__).resolve().parent / "doubles"
FAKE_MODULES = ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime", "fake_device")


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """The labelled fakes of ``tensorrt`` and cuda-python importable for one test, then gone again (the modules
    they shadow, if any were imported, come back)."""
    saved = {name: sys.modules.pop(name) for name in FAKE_MODULES if name in sys.modules}
    monkeypatch.syspath_prepend(str(DOUBLES / "python"))
    for key in ("FAKE_TRT_VERSION", "FAKE_GPU_NAME", "FAKE_GPU_CC", "FAKE_NO_GPU"):
        monkeypatch.delenv(key, raising=False)
    yield
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


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
    with pytest.raises(UserError, match="no registered TensorRT engine"):
        select_backend(load_bundle(bundles / "plain"), "trt")


@no_tensorrt
def test_engine_without_tensorrt_is_a_clear_error(bundles, caplog):
    choice = select_backend(load_bundle(bundles / "engine"), "trt")
    assert isinstance(choice.runner, TrtRunner)
    with pytest.raises(UserError, match="TensorRT is not installed") as err:
        choice.runner.activate()
    assert "--backend ort-cpu" in err.value.line() and "\n" not in err.value.line()
    # auto never picks an engine it cannot run, and says why it did not
    with caplog.at_level(logging.WARNING, logger="runtime.backends"):
        auto = select_backend(load_bundle(bundles / "engine"))
    assert auto.backend.startswith("ort-") and "TensorRT is not installed" in auto.warning
    assert "TensorRT engine not used: TensorRT is not installed" in caplog.text
    assert select_backend(load_bundle(bundles / "plain")).warning is None  # no engine, no TensorRT: nothing to say


@pytest.mark.parametrize(("here", "message"), [
    (DeviceIdentity("NVIDIA H100 80GB HBM3", "9.0", "10.3.0.30"), "compute capabilities differ"),
    (DeviceIdentity("Orin", "8.7", "10.7.0.23"), "TensorRT versions differ"),
])
def test_engine_for_another_gpu_or_tensorrt_is_refused(bundles, monkeypatch, here, message):
    """The compatibility check runs before TensorRT touches the engine."""
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda where="": pytest.fail("TensorRT touched"))
    monkeypatch.setattr(trt_backend, "device_identity", lambda where="": here)
    runner = select_backend(load_bundle(bundles / "engine"), "trt").runner
    with pytest.raises(UserError, match=message) as err:
        runner.activate()
    assert "Orin (compute capability 8.7)" in err.value.line() and here.describe() in err.value.line()
    assert not runner.is_active


# -- the TensorRT runner against the labelled fakes of tensorrt and cuda-python (tests/doubles/python) ------------

def registered(bundle_dir: Path, **fake_env: str) -> None:
    """Write a fake plan of the bundle's FP32 ONNX and register it, as build_engine.sh on the fake device does."""
    import fake_device

    engine = bundle_dir / "model.engine"
    header = {"trt_version": fake_device.trt_version(), "gpu_name": fake_device.gpu()[0],
              "compute_capability": fake_device.gpu()[1], "version_compatible": False,
              "hardware_compatibility": "none", "dla_core": None, "profile": None}
    fake_device.write_plan(str(engine), header, (bundle_dir / "model_fp32.onnx").read_bytes())
    write_json_atomic(bundle_dir / "engine.json", {
        "engine": {"file": engine.name, "sha256": file_sha256(engine), "size": engine.stat().st_size},
        "onnx": {"file": "model_fp32.onnx", "sha256": file_sha256(bundle_dir / "model_fp32.onnx")},
        "tensorrt_version": header["trt_version"], "gpu_name": header["gpu_name"],
        "compute_capability": header["compute_capability"], "precision": "fp32"})


def test_trt_runner_on_the_fakes_matches_onnx_runtime(bundles, fake_tensorrt, tmp_path, monkeypatch, caplog):
    """Inputs reach the engine and outputs come back through the runner's CUDA copies: same detections as ORT."""
    import shutil

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(bundles / "plain", bundle_dir)
    registered(bundle_dir)
    image = np.random.default_rng(0).integers(0, 256, (80, 100, 3), np.uint8)
    with Detector(bundle_dir) as trt_det, Detector(bundle_dir, backend="ort-cpu") as ort_det:
        assert trt_det.choice.backend == "trt" and "matches this machine" in trt_det.choice.reason
        ours, theirs = trt_det.detect([image, image[::-1].copy()]), ort_det.detect([image, image[::-1].copy()])
        assert trt_det.describe()["runner"]["gpu"] == "Orin"
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
        np.testing.assert_array_equal(a.labels, b.labels)
    # the same bundle on another TensorRT release: auto falls back and says why; forced trt is refused
    monkeypatch.setenv("FAKE_TRT_VERSION", "10.3.0.31")
    sys.modules.pop("tensorrt")  # a process sees one TensorRT release: import the "newer" one afresh
    with caplog.at_level(logging.WARNING, logger="runtime.backends"):
        auto = select_backend(load_bundle(bundle_dir))
    assert auto.backend == "ort-cpu" and "TensorRT 10.3.0.30 on Orin" in auto.warning and "10.3.0.31" in auto.warning
    assert "TensorRT engine not used" in caplog.text
    with pytest.raises(UserError, match="TensorRT versions differ"):
        Detector(bundle_dir, backend="trt").open()
    monkeypatch.setenv("FAKE_NO_GPU", "1")
    assert "no CUDA device answers" in select_backend(load_bundle(bundle_dir)).warning


def test_unregistered_engine_is_never_run(bundles, fake_tensorrt, tmp_path):
    import shutil

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(bundles / "plain", bundle_dir)
    registered(bundle_dir)
    (bundle_dir / "engine.json").unlink()
    choice = select_backend(load_bundle(bundle_dir))
    assert choice.backend == "ort-cpu" and "model.engine is not registered" in choice.warning
    with pytest.raises(UserError, match="no registered TensorRT engine"):
        select_backend(load_bundle(bundle_dir), "trt")


def test_jetson_facts_parse_the_real_formats(tmp_path, monkeypatch):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: ...\n")
    assert machine.l4t_release(release) == "R36.3.0"
    assert machine.l4t_release(tmp_path / "absent") == "unavailable"
    line = ("RAM 2431/7620MB (lfb 3x4MB) CPU [2%@729,1%@729] EMC_FREQ 0% GR3D_FREQ 0% cpu@47.5C "
            "VDD_IN 4812mW/4790mW VDD_CPU_GPU_CV 602mW/598mW VDD_SOC 1403mW/1400mW")
    assert machine.parse_tegrastats_power(line) == {"VDD_IN": 4812.0, "VDD_CPU_GPU_CV": 602.0, "VDD_SOC": 1403.0}
    assert machine.parse_tegrastats(line) == {"power_mw": {"VDD_IN": 4812.0, "VDD_CPU_GPU_CV": 602.0,
                                                           "VDD_SOC": 1403.0},
                                              "gpu_load_pct": 0.0, "emc_load_pct": 0.0, "temperature_c": {"cpu": 47.5}}
    older = "RAM 1200/3964MB CPU [5%@1479] EMC_FREQ 3%@1600 GR3D_FREQ 12%@921 POM_5V_IN 2345/2300 thermal@41C"
    sample = machine.parse_tegrastats(older)  # Jetson Nano / JetPack 4 layout
    assert sample["gpu_mhz"] == 921.0 and sample["emc_mhz"] == 1600.0 and sample["power_mw"] == {"POM_5V_IN": 2345.0}
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


def test_jetson_facts_from_the_device_tools(tmp_path, monkeypatch):
    """On a (doubled) Jetson: JetPack, L4T, power mode, clock state and clocks, temperatures, and what tegrastats
    sees while a measurement runs. The tools are labelled stand-ins printing the real formats (tests/doubles/bin)."""
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: ...\n")
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("tj-thermal\n")
    (zone / "temp").write_text("48500\n")
    monkeypatch.setattr(machine, "TEGRA_RELEASE", release)
    monkeypatch.setattr(machine, "THERMAL_ROOT", tmp_path / "thermal")
    monkeypatch.setenv("PATH", f"{DOUBLES / 'bin'}:{os.environ['PATH']}")
    jetson = machine.machine_facts()["jetson"]
    assert (jetson["l4t"], jetson["jetpack"], jetson["nvpmodel"]) == ("R36.4.0", "6.1+b123", "15W (mode 0)")
    assert jetson["jetson_clocks"] == "on" and jetson["gpu_mhz"]["current"] == pytest.approx(624.75)
    assert jetson["emc_mhz"]["max"] == pytest.approx(2133.0) and jetson["temperature_c"] == {"tj-thermal": 48.5}
    monkeypatch.setenv("FAKE_JETSON_CLOCKS", "off")
    monkeypatch.setenv("FAKE_JETPACK", "")  # no nvidia-jetpack package: derived from L4T, and said so
    jetson = machine.machine_facts()["jetson"]
    assert jetson["jetson_clocks"] == "off" and jetson["jetpack"] == "6.1 (from L4T R36.4.0)"
    with machine.TegrastatsSampler(interval_ms=50) as during:
        time.sleep(0.4)
    summary = during.summary()
    assert summary["samples"] >= 1 and summary["total_input_mw"] == 7012.0
    assert summary["gpu_mhz"]["mean"] == 624.0 and summary["emc_mhz"]["mean"] == 2133.0
    assert summary["gpu_load_pct"]["max"] == 87.0 and summary["temperature_max_c"]["tj"] == 53.0
