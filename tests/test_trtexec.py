"""The trtexec commands written into every TensorRT bundle (right flags per target, precision and TensorRT major),
the build / timing scripts, where an engine may be built, and engine_record.py's reading of trtexec's output.

TensorRT itself is never run here (none can be installed); the scripts run end to end in test_jetson_flow.py."""
from __future__ import annotations

import shlex
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy import formats
from deploy import tensorrt as trt_mod
from deploy.tensorrt import (bench_command, bench_engine_script, build_decision, build_engine_script, engine_plan,
                             float_types, tensorrt_status, trtexec_command)
from runtime import engine_record
from runtime.config import load_config
from runtime.errors import UserError
from runtime.postprocess import Detections
from runtime.tiling import TILE_BATCH, tiled_detect

COMMON = {"--saveEngine=model.engine", "--timingCacheFile=timing.cache", "--profilingVerbosity=detailed",
          "--exportLayerInfo=engine_layers.json"}
PRECISION_FLAGS = {"--int8", "--fp16", "--best", "--bf16", "--fp8"}


@pytest.fixture(scope="module")
def targets():
    return load_config().targets  # the repository's pipelines.yaml


# target -> (onnx file, flags that must be present, flags that must be absent); precision = the target's own (int8)
EXPECTED = {
    "jetson": ("model_int8.onnx", {"--int8", "--fp16", "--memPoolSize=workspace:2048M"},
               {"--stronglyTyped", "--allowGPUFallback"}),
    "jetson-orin-nano": ("model_int8.onnx", {"--int8", "--fp16", "--memPoolSize=workspace:1024M"},
                         {"--stronglyTyped", "--useDLACore=0"}),
    "jetson-orin-nx": ("model_int8.onnx", {"--int8", "--fp16", "--useDLACore=0", "--allowGPUFallback",
                                           "--memPoolSize=workspace:2048M"}, {"--stronglyTyped"}),
    "jetson-agx-orin": ("model_int8.onnx", {"--int8", "--fp16", "--useDLACore=0", "--allowGPUFallback",
                                            "--memPoolSize=workspace:4096M"}, {"--stronglyTyped"}),
    "x86-cuda": ("model_int8.onnx", {"--stronglyTyped", "--memPoolSize=workspace:8192M"},
                 PRECISION_FLAGS | {"--useDLACore=0"}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_command_per_target(targets, name):
    onnx_file, present, absent = EXPECTED[name]
    target = targets[name]
    cmd = trtexec_command(engine_plan(target, target.precision, 800, target_name=name))
    assert cmd[0] == "trtexec" and cmd[1] == f"--onnx={onnx_file}"
    flags = set(cmd[1:])
    assert COMMON <= flags and present <= flags
    assert not flags & absent
    # static input: no shape ranges; --workspace was removed in TensorRT 10
    assert not any(f.startswith(("--minShapes", "--workspace=")) for f in flags)


@pytest.mark.parametrize("major", [10, 11])
@pytest.mark.parametrize("precision", ["int8", "fp16", "fp32"])
def test_precision_by_major(targets, major, precision):
    target = targets["jetson"].model_copy(update={"trt_major": major})
    cmd = trtexec_command(engine_plan(target, precision, 640))
    flags = set(cmd[1:])
    if major >= 11:  # strongly typed: no precision flags exist; the ONNX carries the types
        assert "--stronglyTyped" in flags and not flags & PRECISION_FLAGS
        expected_onnx = {"int8": "model_int8.onnx", "fp16": "model_fp16.onnx", "fp32": "model_fp32.onnx"}[precision]
    else:
        assert "--stronglyTyped" not in flags
        assert flags & PRECISION_FLAGS == {"int8": {"--int8", "--fp16"}, "fp16": {"--fp16"}, "fp32": set()}[precision]
        expected_onnx = "model_int8.onnx" if precision == "int8" else "model_fp32.onnx"
    assert cmd[1] == f"--onnx={expected_onnx}"


class RecordingDetector:
    """What tiling needs from a detector; records how many tiles each call sends."""

    input_size, nms_iou = (64, 64), 0.5

    def __init__(self):
        self.calls: list[int] = []

    def detect(self, images):
        self.calls.append(len(images))
        return [Detections() for _ in images]


def test_dynamic_batch_profile_is_tuned_for_the_batch_the_tiler_sends(targets):
    plan = engine_plan(targets["jetson"], "int8", 512, dynamic_batch=True)
    cmd = trtexec_command(plan)
    assert {"--minShapes=images:1x3x512x512", f"--optShapes=images:{TILE_BATCH}x3x512x512",
            f"--maxShapes=images:{plan.max_batch}x3x512x512"} <= set(cmd)
    assert plan.max_batch >= TILE_BATCH
    detector = RecordingDetector()
    tiled_detect(detector, np.zeros((200, 300, 3), np.uint8))  # 6 x 4 tiles of 64 px, overlap 16
    assert detector.calls == [plan.opt_batch] * 6
    assert f"--shapes=images:{TILE_BATCH}x3x512x512" in bench_command(plan)  # the timing uses that batch too


def test_impossible_combinations_are_user_errors(targets):
    with pytest.raises(UserError, match="TensorRT 11 builds no DLA"):
        engine_plan(targets["jetson-agx-orin"].model_copy(update={"trt_major": 11}), "int8", 800,
                    target_name="jetson-agx-orin")
    with pytest.raises(UserError, match="DLA runs INT8 or FP16"):
        engine_plan(targets["jetson-orin-nx"], "fp32", 800)
    with pytest.raises(UserError, match="DLA needs static shapes") as err:
        engine_plan(targets["jetson-orin-nx"], "int8", 800, dynamic_batch=True, target_name="jetson-orin-nx")
    assert "deploy.dynamic_batch=false" in err.value.line()
    with pytest.raises(UserError, match="not supported on Jetson"):
        engine_plan(targets["jetson"].model_copy(update={"hardware_compatibility": "ampere+"}), "int8", 800)


def test_compatibility_flags(targets):
    x86 = targets["x86-cuda"].model_copy(update={"version_compatible": True, "hardware_compatibility": "ampere+"})
    plan = engine_plan(x86, "int8", 640)
    assert {"--versionCompatible", "--hardwareCompatibilityLevel=ampere+"} <= set(trtexec_command(plan))
    assert "--versionCompatible" in bench_command(plan)
    plain = trtexec_command(engine_plan(targets["x86-cuda"], "int8", 640))
    assert not [f for f in plain if f.startswith(("--versionCompatible", "--hardwareCompatibilityLevel"))]


def script_command(script: str) -> list[str]:
    """argv of the CMD=(...) array a script runs."""
    line = next(ln for ln in script.splitlines() if ln.startswith("CMD=("))
    return shlex.split(line[len("CMD=("):-1])


def test_build_script_runs_exactly_that_command_then_registers(targets):
    plan = engine_plan(targets["jetson-orin-nx"], "int8", 800, target_name="jetson-orin-nx")
    script = build_engine_script(plan, "jetson-orin-nx", calib_cache=True)
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    assert 'cd "$(dirname "$0")"' in script
    assert script_command(script) == ["$TRTEXEC", *trtexec_command(plan)[1:]]
    lines = script.splitlines()
    unregister = next(i for i, ln in enumerate(lines) if ln.startswith("rm -f engine.json"))
    build = next(i for i, ln in enumerate(lines) if ln.startswith('"${CMD[@]}"'))
    register = next(i for i, ln in enumerate(lines) if "engine_record.py register" in ln)
    assert unregister < build < register  # a failed build leaves no record; a record follows every good build
    assert "--onnx model_int8.onnx" in lines[register] and '-- "${CMD[@]}"' in lines[register]
    assert "--calib=calibration.cache" in script  # the TensorRT 10 implicit alternative, commented out
    plan11 = engine_plan(targets["x86-cuda"], "int8", 800)
    assert "--calib" not in build_engine_script(plan11, "x86-cuda", calib_cache=True)


def test_bench_script_times_the_registered_engine_alone(targets):
    plan = engine_plan(targets["jetson-orin-nx"], "int8", 800, target_name="jetson-orin-nx")
    script = bench_engine_script(plan, "jetson-orin-nx")
    argv = script_command(script)
    assert argv[:2] == ["$TRTEXEC", "--loadEngine=model.engine"]
    assert {"--useCudaGraph", "--noDataTransfers", "--separateProfileRun", "--dumpProfile",
            "--exportTimes=engine_times.json", "--exportProfile=engine_profile.json", "--useDLACore=0"} <= set(argv)
    lines = script.splitlines()
    check = next(i for i, ln in enumerate(lines) if "engine_record.py check" in ln)
    timing = next(i for i, ln in enumerate(lines) if "engine_record.py timing" in ln)
    assert check < next(i for i, ln in enumerate(lines) if ln.startswith('"${CMD[@]}"')) < timing
    assert "tegrastats --interval" in script and "nvpmodel -q; jetson_clocks --show" in script


@pytest.mark.parametrize(("platform_here", "trtexec", "requested", "builds"), [
    ("jetson", "/usr/src/tensorrt/bin/trtexec", "auto", True),
    ("jetson", None, "auto", False),
    (None, "/usr/bin/trtexec", "auto", False),
    ("x86-cuda", "/usr/bin/trtexec", "auto", False),  # a GPU host is not a Jetson
    (None, None, "build", True),
    ("jetson", "/usr/bin/trtexec", "script", False),
])
def test_engine_is_built_here_only_where_it_runs(targets, monkeypatch, platform_here, trtexec, requested, builds):
    monkeypatch.setattr(trt_mod, "host_platform", lambda: platform_here)
    monkeypatch.setattr(trt_mod, "find_trtexec", lambda: trtexec)
    here, why = build_decision(targets["jetson-orin-nx"], requested)
    assert here is builds and why
    x86_here, _ = build_decision(targets["x86-cuda"], "auto")
    assert x86_here is (platform_here == "x86-cuda" and trtexec is not None)


def test_trtexec_output_is_read_as_trtexec_writes_it():
    log = ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b30] # trtexec --onnx=m.onnx\n"
           "[09/25/2026-10:00:00] [I] === Device Information ===\n"
           "[09/25/2026-10:00:00] [I] Selected Device: Orin\n"
           "[09/25/2026-10:00:00] [I] Compute Capability: 8.7\n"
           "[09/25/2026-10:00:00] [I] TensorRT version: 10.3.0\n"
           "[09/25/2026-10:00:00] [I] Throughput: 812.4 qps\n"
           "&&&& PASSED TensorRT.trtexec [TensorRT v100300] [b30] # trtexec --onnx=m.onnx\n")
    facts = engine_record.parse_trtexec_log(log)
    assert facts == {"banner_version": "10.3.0.30", "tensorrt_version": "10.3.0", "gpu_name": "Orin",
                     "compute_capability": "8.7", "passed": True, "failed": False, "throughput_qps": 812.4}
    assert engine_record.parse_trtexec_log("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # x")["banner_version"] \
        == "8.6.1"
    flags = engine_record.build_flags(["trtexec", "--onnx=m.onnx", "--int8", "--fp16", "--useDLACore=1",
                                       "--allowGPUFallback", "--vc", "--minShapes=images:1x3x8x8",
                                       "--optShapes=images:4x3x8x8", "--maxShapes=images:8x3x8x8"])
    assert flags["precision_flags"] == ["--int8", "--fp16"] and flags["dla_core"] == 1 and flags["gpu_fallback"]
    assert flags["version_compatible"] and flags["hardware_compatibility"] == "none"
    assert flags["input_shapes"] == {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}


def test_registration_refuses_a_failed_build(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_record, "_bindings_check", lambda engine, flags: None)
    (tmp_path / "model.engine").write_bytes(b"plan")
    (tmp_path / "model_int8.onnx").write_bytes(b"onnx")
    (tmp_path / "build.log").write_text("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b30] # trtexec\n"
                                        "[E] Error[4]: something\n&&&& FAILED TensorRT.trtexec # trtexec\n")
    args = ["register", "--engine", "model.engine", "--onnx", "model_int8.onnx", "--log", "build.log",
            "--precision", "int8", "--", "trtexec", "--onnx=model_int8.onnx"]
    assert engine_record.main(["--bundle", str(tmp_path), *args]) == engine_record.EXIT_USER_ERROR
    assert not (tmp_path / "engine.json").exists()
    (tmp_path / "build.log").write_text("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b30] # trtexec\n"
                                        "[I] Selected Device: Orin\n[I] Compute Capability: 8.7\n"
                                        "&&&& PASSED TensorRT.trtexec # trtexec\n")
    assert engine_record.main(["--bundle", str(tmp_path), *args]) == 0
    rec = engine_record.check(tmp_path)
    assert rec["tensorrt_version"] == "10.3.0.30" and rec["tensorrt_version_source"] == "trtexec banner"
    assert rec["build_command"] == ["trtexec", "--onnx=model_int8.onnx"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # written atomically
    monkeypatch.setattr(engine_record, "_bindings_check", lambda engine, flags: {"tensorrt_version": "10.7.0.23"})
    assert engine_record.main(["--bundle", str(tmp_path), *args]) == engine_record.EXIT_USER_ERROR


def test_strongly_typed_float_layers_are_reported(tmp_path):
    def model(dtype: int) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", dtype, [1, 2, 4, 4])
        y = helper.make_tensor_value_info("y", dtype, [1, 2, 4, 4])
        weight = numpy_helper.from_array(np.ones((2, 2, 1, 1), helper.tensor_dtype_to_np_dtype(dtype)), "w")
        graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [weight])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    for dtype, name in ((TensorProto.FLOAT, "float32"), (TensorProto.FLOAT16, "float16")):
        onnx.save(model(dtype), tmp_path / f"{name}.onnx")
        assert float_types(tmp_path / f"{name}.onnx") == {name}


def test_status_explains_why_no_engine(monkeypatch):
    monkeypatch.setattr(trt_mod.importlib.util, "find_spec", lambda name: None)  # noqa: ARG005
    version, why = tensorrt_status(10)
    assert version is None and "tensorrt" in why and "not installed" in why


def test_format_table_names_what_is_missing(monkeypatch):
    real = formats.importlib.util.find_spec
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda name: None if name == "tensorrt" else real(name))
    assert formats.missing("engine") == ["tensorrt"] and formats.missing("trtexec-script") == []
    rows = {r["format"]: r for r in formats.formats_table()}
    assert rows["engine"]["available"].startswith("no") and rows["engine"]["gpu"] == "yes"
    with pytest.raises(UserError, match="unknown export format"):
        formats.get_format("tflite")


def test_device_side_commands_need_no_torch():
    """A Jetson has the torch-free runtime: the device gate and the registration tool must import without torch."""
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import importlib.abc, sys\n"
             "class Block(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'torchvision', 'onnx', 'polygraphy', 'modelopt'):\n"
             "            raise ImportError(name + ' is not on the device')\n"
             "sys.meta_path.insert(0, Block())\n"
             "import deploy.verify, runtime.engine_record, runtime.bench, runtime.data, runtime.detector, "
             "runtime.evaluate, runtime.metrics\n"
             "print('ok')\n")
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
