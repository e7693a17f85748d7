"""`python -m distill.run`: the three stages from one command, reuse of finished stages, baselines, summary, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from distill.checkpoint import file_sha256, load_detector
from distill.models import build_detector
from distill.run import main
from runtime.config import load_config
from runtime.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One full teacher -> amplifier -> DS2D2 student run, shared by the tests below (which run in file order)."""
    tmp = tmp_path_factory.mktemp("chain")
    cfg = tiny_config(tmp)
    torch.set_num_threads(1)
    assert main(["tiny", "--config", str(cfg), "--device", "cpu"]) == 0
    return cfg, tmp / "runs" / "tiny"


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob("*/model.pt")}


def test_one_command_trains_teacher_amplifier_and_student(chain):
    _, runs = chain
    for stage in ("teacher", "amplifier", "student-ds2d2"):
        names = {p.name for p in (runs / stage).iterdir()}
        # no val split in the tiny set: model.pt is the final epoch, nothing is selected, no best.pt
        assert names == {"last.pt", "model.pt", "log.jsonl", "metrics.json"}, stage
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["pipeline"] == "tiny"
    assert [(e["stage"], e["method"]) for e in summary["entries"]] == [
        ("teacher", None), ("amplifier", None), ("student", "ds2d2")]
    for entry in summary["entries"]:
        assert 0 <= entry["AP50"] <= 1 and entry["AP_s"] is not None
        assert entry["params"] > 1e6 and entry["gflops"] > 0 and entry["wall_time_s"] > 0
        assert entry["device"] == "cpu" and entry["split"].endswith("test") and entry["scored_on"] == entry["split"]
        assert entry["selection"] == "final epoch" and entry["selected_on"] is None
    student_log = [json.loads(line) for line in (runs / "student-ds2d2" / "log.jsonl").read_text().splitlines()]
    terms = set(next(r for r in student_log if r["event"] == "train"))
    assert {"classification", "bbox_regression", "loss"} <= terms
    assert len([t for t in terms if t.startswith("kd_")]) >= 4  # explicit + implicit DS2D2 terms, each logged


def test_student_checkpoint_holds_the_student_only(chain):
    cfg, runs = chain
    ckpt = torch.load(runs / "student-ds2d2" / "model.pt", weights_only=True)
    pipe = load_config(cfg, ["distill.method=ds2d2"]).pipeline("tiny")
    assert ckpt["role"] == "student" and ckpt["method"] == "ds2d2" and ckpt["finished"]
    assert ckpt["config"] == pipe.as_dict() and ckpt["model_spec"] == pipe.student.model_dump(mode="json")
    fresh = build_detector(pipe.student, 3, 64)
    assert set(ckpt["state_dict"]) == set(fresh.state_dict())  # no teacher, amplifier or adapter weights
    assert not any(k.startswith(("teacher", "amplifier", "adapter")) for k in ckpt["state_dict"])
    assert ckpt["inputs"]["teacher"] == file_sha256(runs / "teacher" / "model.pt")
    model, meta = load_detector(runs / "student-ds2d2" / "model.pt")
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores"} and meta["classes"] == ["vehicle", "storagetank", "airplane"]


def test_rerun_skips_every_finished_stage(chain, capsys):
    cfg, runs = chain
    before = _mtimes(runs)
    assert main(["tiny", "--config", str(cfg), "--device", "cpu"]) == 0
    assert _mtimes(runs) == before
    assert capsys.readouterr().err.count("skipped") == 3


def test_method_none_reuses_the_teacher_and_needs_no_amplifier(chain, capsys):
    cfg, runs = chain
    before = _mtimes(runs)
    assert main(["tiny", "--config", str(cfg), "--device", "cpu", "--method", "none"]) == 0
    after = _mtimes(runs)
    assert {k: after[k] for k in before} == before and "student-none/model.pt" in after
    err = capsys.readouterr().err
    assert "teacher: up to date" in err and "amplifier" not in err
    summary = json.loads((runs / "summary.json").read_text())
    assert [(e["stage"], e["method"]) for e in summary["entries"]] == [
        ("teacher", None), ("amplifier", None), ("student", "ds2d2"), ("student", "none")]


def test_a_changed_student_setting_retrains_only_the_student(chain):
    cfg, runs = chain
    before = _mtimes(runs)
    old_hash = torch.load(runs / "student-ds2d2" / "model.pt", weights_only=True, mmap=True)["config_hash"]
    assert main(["tiny", "--config", str(cfg), "--device", "cpu", "--set", "schedule.student.lr=0.02"]) == 0
    after = _mtimes(runs)
    assert after["teacher/model.pt"] == before["teacher/model.pt"]
    assert after["amplifier/model.pt"] == before["amplifier/model.pt"]
    assert after["student-ds2d2/model.pt"] != before["student-ds2d2/model.pt"]
    assert torch.load(runs / "student-ds2d2" / "model.pt", weights_only=True, mmap=True)["config_hash"] != old_hash


@pytest.mark.parametrize("method", ["pkd", "fgd"])
def test_every_baseline_trains_from_the_cli_against_the_same_teacher(chain, method):
    cfg, runs = chain
    assert main(["tiny", "--config", str(cfg), "--device", "cpu", "--stage", "student", "--method", method]) == 0
    ckpt = torch.load(runs / f"student-{method}" / "model.pt", weights_only=True)
    assert ckpt["inputs"] == {"teacher": file_sha256(runs / "teacher" / "model.pt")}
    fresh = build_detector(load_config(cfg).pipeline("tiny").student, 3, 64)
    assert set(ckpt["state_dict"]) == set(fresh.state_dict())  # FGD's GcBlocks and the adapter stay out
    last = torch.load(runs / f"student-{method}" / "last.pt", weights_only=True)
    assert set(last["resume"]["modules"]) == ({"adapter", "fgd"} if method == "fgd" else {"adapter"})
    log = [json.loads(line) for line in (runs / f"student-{method}" / "log.jsonl").read_text().splitlines()]
    terms = set(next(r for r in log if r["event"] == "train"))
    assert ({"kd_fgd_fg", "kd_fgd_bg", "kd_fgd_attention", "kd_fgd_global"} if method == "fgd" else {"kd_pkd"}) <= terms


def test_teacher_flag_trains_a_baseline_student_from_a_given_teacher(chain, tmp_path):
    cfg, runs = chain
    work = tmp_path / "elsewhere"
    teacher = runs / "teacher" / "model.pt"
    assert main(["tiny", "--config", str(cfg), "--device", "cpu", "--work-dir", str(work), "--teacher", str(teacher),
                 "--method", "fitnet"]) == 0
    assert sorted(p.name for p in (work / "tiny").iterdir()) == ["student-fitnet", "summary.json"]
    ckpt = torch.load(work / "tiny" / "student-fitnet" / "model.pt", weights_only=True, mmap=True)
    assert ckpt["inputs"] == {"teacher": file_sha256(teacher)}


def test_missing_upstream_stage_names_the_command_that_makes_it(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(UserError, match=r"python -m distill.run tiny --stage teacher"):
        main(["tiny", "--config", str(cfg), "--device", "cpu", "--stage", "amplifier"])
    with pytest.raises(UserError, match="replaces the teacher stage"):
        main(["tiny", "--config", str(cfg), "--stage", "teacher", "--teacher", str(cfg)])


def test_help_lists_pipelines_and_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "demo_retina" in capsys.readouterr().out
    cfg = tiny_config(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "distill.run", "nope", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown pipeline 'nope'" in proc.stderr


def test_faster_rcnn_trains_through_the_same_stages(tmp_path):
    cfg = tiny_config(tmp_path, arch="faster_rcnn")
    assert main(["tiny", "--config", str(cfg), "--device", "cpu", "--method", "none"]) == 0
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert [(e["stage"], e["method"]) for e in summary["entries"]] == [("teacher", None), ("student", "none")]
    model, meta = load_detector(tmp_path / "runs" / "tiny" / "student-none" / "model.pt")
    assert meta["model_spec"]["arch"] == "faster_rcnn" and type(model).__name__.endswith("FasterRCNN")
