"""The trtexec command written into every TensorRT bundle: right flags per target, precision and TensorRT major."""
from __future__ import annotations

import shlex

import pytest

from deploy import formats
from deploy import tensorrt as trt_mod
from deploy.tensorrt import build_engine_script, engine_plan, tensorrt_status, trtexec_command
from runtime.config import load_config
from runtime.errors import UserError

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


def test_dynamic_batch_gets_shape_ranges(targets):
    cmd = trtexec_command(engine_plan(targets["jetson"], "int8", 512, dynamic_batch=True))
    assert {"--minShapes=images:1x3x512x512", "--optShapes=images:1x3x512x512",
            "--maxShapes=images:8x3x512x512"} <= set(cmd)


def test_impossible_combinations_are_user_errors(targets):
    with pytest.raises(UserError, match="TensorRT 11 builds no DLA"):
        engine_plan(targets["jetson-agx-orin"].model_copy(update={"trt_major": 11}), "int8", 800,
                    target_name="jetson-agx-orin")
    with pytest.raises(UserError, match="DLA runs INT8 or FP16"):
        engine_plan(targets["jetson-orin-nx"], "fp32", 800)


def test_script_runs_exactly_that_command(targets):
    plan = engine_plan(targets["jetson-orin-nx"], "int8", 800, target_name="jetson-orin-nx")
    script = build_engine_script(plan, "jetson-orin-nx", calib_cache=True)
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    assert 'cd "$(dirname "$0")"' in script
    line = next(ln for ln in script.splitlines() if ln.startswith('"$TRTEXEC"'))
    argv = shlex.split(line.split(" 2>&1 |")[0])
    assert argv[1:] == trtexec_command(plan)[1:]
    assert "--calib=calibration.cache" in script  # the TensorRT 10 implicit alternative, commented out
    plan11 = engine_plan(targets["x86-cuda"], "int8", 800)
    assert "--calib" not in build_engine_script(plan11, "x86-cuda", calib_cache=True)


def test_status_explains_why_no_engine(monkeypatch):
    monkeypatch.setattr(trt_mod.importlib.util, "find_spec", lambda name: None)
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
