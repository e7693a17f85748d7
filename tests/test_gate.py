"""The INT8 accuracy gate on a detector that detects, so that it can fail, and what the build does when it fails.

The tiny student is trained for a few seconds (tests/trained_tiny.py) so its FP32 AP50 is clearly above 0: the gate's
drop is then a real measurement. Its failure path is driven honestly with a limit no INT8 model meets
(``--set deploy.ap50_drop_limit=-1``: INT8 would have to beat FP32 by a point): the build keeps the INT8 attempt
under failed/ with its sensitivity table and writes an FP16 bundle instead of stopping.
"""
from __future__ import annotations

import json

import pytest
from trained_tiny import built_bundle, trained_project

from runtime.manifest import load_bundle

# Training the tiny detector takes ~1 min alone, several on a loaded machine: more than the default 600 s timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_trained_student_passes_the_gate(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    _, trained = trained_project(base)
    assert trained["AP50"] > 0.05  # a detector, not noise
    bundle, code, err = built_bundle(base, "orin-nx", "--target", "jetson-orin-nx")
    assert code == 0, err
    gate = json.loads((bundle / "accuracy_gate.json").read_text())
    assert gate["fp32"]["AP50"] > 0 and gate["int8"]["AP50"] > 0
    assert gate["passed"] and gate["drop_ap50"] == pytest.approx(100 * (gate["fp32"]["AP50"] - gate["int8"]["AP50"]))
    assert gate["drop_ap50"] <= gate["limit"] == 1.0 and gate["shipped"] == "int8"
    assert "onnx-int8" in {e.role for e in load_bundle(bundle).manifest.files.values()}
    assert "--int8" in (bundle / "build_engine.sh").read_text()


def test_failed_gate_ships_fp16_and_keeps_the_int8_attempt(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    bundle, code, err = built_bundle(base, "orin-nx-strict", "--target", "jetson-orin-nx",
                                     "--set", "deploy.ap50_drop_limit=-1")
    assert code == 0, err
    said = " ".join(err.split())
    assert "stays above the limit -1" in said and "writing an FP16 bundle instead" in said
    gate = json.loads((bundle / "accuracy_gate.json").read_text())
    assert gate["passed"] is False and gate["shipped"] == "fp16" and gate["fp32"]["AP50"] > 0
    assert gate["sensitivity"] and gate["kept_float_groups"]  # the sensitivity pass ran before giving up
    loaded = load_bundle(bundle)
    roles = {e.role for e in loaded.manifest.files.values()}
    assert "onnx-int8" not in roles and {"onnx-fp32", "sensitivity", "accuracy-gate"} <= roles
    assert loaded.manifest.tensorrt.precision == "fp16" and loaded.manifest.tensorrt.onnx_file == "model_fp32.onnx"
    script = (bundle / "build_engine.sh").read_text()
    assert "--fp16" in script and "--int8" not in script and "--useDLACore=0" in script  # DLA runs FP16 too
    assert "INT8 failed the gate: this bundle ships FP16" in (bundle / "README.md").read_text()
    failed = bundle.parent / "failed" / bundle.name
    assert (failed / "model_int8.onnx").is_file() and (failed / "sensitivity.json").is_file()
    assert json.loads((failed / "accuracy_gate.json").read_text())["passed"] is False
