"""`python -m deploy.build` and `python -m deploy.verify` end to end on a tiny pipeline, and every bad input."""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import onnx
import pytest
import torch
from conftest import tiny_config

from deploy import build, verify
from distill.checkpoint import model_payload, save_checkpoint
from distill.models import build_detector
from runtime.cli import run_cli
from runtime.config import load_config
from runtime.data import load_dataset
from runtime.manifest import load_bundle

TARGETS = {
    "cpu": {"runtime": "onnxruntime", "precision": "int8", "quantizer": "ort-u8s8"},
    "jetson": {"runtime": "tensorrt", "precision": "int8", "workspace_mb": 2048, "trt_major": 10,
               "quantizer": "modelopt"},
}


def cli(main, *argv: str) -> tuple[int, str, str]:
    """Run a CLI in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            run_cli(main, list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny pipeline with a (randomly initialised) student checkpoint where distill.run would write it."""
    root = tmp_path_factory.mktemp("deploy")
    config = tiny_config(root, targets=TARGETS)
    pipe = load_config(config).pipeline()
    torch.manual_seed(0)
    model = build_detector(pipe.student, 3, pipe.input_size)
    meta = {"role": "student", "method": "ds2d2", "model_spec": pipe.student.model_dump(mode="json"),
            "num_classes": 3, "classes": ["vehicle", "storagetank", "airplane"], "input_size": pipe.input_size,
            "config": pipe.as_dict(), "config_hash": "test"}
    save_checkpoint(pipe.work_dir / "student-ds2d2" / "model.pt", model_payload(meta, model, {}, True))
    return config, pipe


@pytest.fixture(scope="module")
def cpu_bundle(project):
    config, pipe = project
    code, _, err = cli(build.main, "--config", str(config), "--target", "cpu")
    assert code == 0, err
    return pipe.project.path("artifacts") / "tiny" / "cpu", err


def test_cpu_bundle(project, cpu_bundle):
    _, pipe = project
    bundle_dir, log = cpu_bundle
    bundle = load_bundle(bundle_dir, verify=True)
    m = bundle.manifest
    assert (m.pipeline, m.model_role, m.target) == ("tiny", "student", "cpu")
    assert {"onnx-fp32", "onnx-int8", "calib-manifest", "readme", "fidelity", "accuracy-gate"} <= {
        e.role for e in m.files.values()}
    assert not (bundle_dir / "build_engine.sh").exists()  # ONNX Runtime target: no TensorRT involved
    int8 = onnx.load(str(bundle.path_for_role("onnx-int8")))
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) > 0
    # calibration images come from the training split, never from the test split
    calib = json.loads((bundle_dir / "calibration.json").read_text())
    train = {str(r.path) for r in load_dataset("dior", pipe.dataset_root, "train").records}
    test = {str(r.path) for r in load_dataset("dior", pipe.dataset_root, "test").records}
    used = {img["path"] for img in calib["images"]}
    assert len(used) == 4 and used <= train and not used & test
    gate = json.loads((bundle_dir / "accuracy_gate.json").read_text())
    assert gate["passed"] and gate["fp32"]["images"] == 4
    assert "bundle written" in log


def test_rebuild_with_nothing_changed_reuses(project, cpu_bundle):
    config, _ = project
    bundle_dir, _ = cpu_bundle
    before = (bundle_dir / "manifest.json").stat().st_mtime_ns
    code, _, err = cli(build.main, "--config", str(config), "--target", "cpu")
    assert code == 0 and "up to date" in err
    assert (bundle_dir / "manifest.json").stat().st_mtime_ns == before


def test_jetson_bundle_carries_trtexec_script(project, tmp_path):
    config, _ = project
    out = tmp_path / "jetson"
    code, _, err = cli(build.main, "--config", str(config), "--target", "jetson", "--out", str(out))
    assert code == 0, err
    assert "no TensorRT engine was built on this machine: " in " ".join(err.split())
    script = (out / "build_engine.sh").read_text()
    for flag in ("--onnx=model_int8.onnx", "--int8", "--fp16", "--memPoolSize=workspace:2048M",
                 "--timingCacheFile=timing.cache", "--saveEngine=model.engine"):
        assert flag in script
    m = load_bundle(out).manifest
    assert m.tensorrt.major_expected == 10 and load_bundle(out).engine is None
    assert m.files["build_engine.sh"].role == "build-script" and (out / "build_engine.sh").stat().st_mode & 0o111


def test_verify_checks_hashes_and_compares(cpu_bundle, tmp_path):
    bundle_dir, _ = cpu_bundle
    code, out, err = cli(verify.main, str(bundle_dir), "--images", "2")
    assert code == 0, err
    assert "match their sha256" in out and "FP32 vs INT8" in out and "cls_logits" in out
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    data = bytearray((copy / "model_int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model_int8.onnx").write_bytes(bytes(data))
    code, _, err = cli(verify.main, str(copy))
    assert code == 2 and "model_int8.onnx" in err and "sha256" in err


def one_line_failure(code: int, err: str, out: Path) -> str:
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    return lines[0]


def test_missing_checkpoint_names_the_command(project, tmp_path):
    config, _ = project
    out = tmp_path / "b"
    code, _, err = cli(build.main, "--config", str(config), "--target", "cpu", "--model", "teacher", "--out", str(out))
    assert "python -m distill.run tiny --stage teacher" in one_line_failure(code, err, out)


def test_unknown_target_lists_them(project, tmp_path):
    config, _ = project
    out = tmp_path / "b"
    code, _, err = cli(build.main, "--config", str(config), "--target", "tpu", "--out", str(out))
    line = one_line_failure(code, err, out)
    assert "unknown target 'tpu'" in line and "cpu, jetson" in line


def test_too_few_calibration_images(project, tmp_path):
    config, _ = project
    out = tmp_path / "b"
    code, _, err = cli(build.main, "--config", str(config), "--target", "cpu", "--calib-images", "500",
                       "--out", str(out))
    assert "found 12, 500 requested" in one_line_failure(code, err, out)


def test_corrupt_checkpoint(project, tmp_path):
    config, _ = project
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    out = tmp_path / "b"
    code, _, err = cli(build.main, "--config", str(config), "--target", "cpu", "--checkpoint", str(bad),
                       "--out", str(out))
    assert "corrupt" in one_line_failure(code, err, out)


def test_export_mismatch_fails_and_keeps_artifacts(project, tmp_path):
    config, _ = project
    out = tmp_path / "b"
    code, _, err = cli(build.main, "--config", str(config), "--target", "cpu", "--out", str(out),
                       "--set", "deploy.fidelity_atol=1e-12", "--set", "deploy.fidelity_rtol=0")
    assert "export mismatch" in one_line_failure(code, err, out)
    failed = tmp_path / "failed" / "b"
    assert (failed / "model_fp32.onnx").is_file() and not json.loads((failed / "fidelity.json").read_text())["passed"]


def test_checkpoint_locations_and_both_roles(project, tmp_path):
    config, pipe = project
    assert build.checkpoint_path(pipe, "teacher", None) == pipe.work_dir / "teacher" / "model.pt"
    assert build.checkpoint_path(pipe, "student", tmp_path) == tmp_path / "tiny" / "student-ds2d2" / "model.pt"
    out = tmp_path / "b"
    code, _, err = cli(build.main, "--config", str(config), "--target", "cpu", "--model", "both",
                       "--checkpoint", str(tmp_path / "x.pt"), "--out", str(out))
    assert "--model both needs two" in one_line_failure(code, err, out)
