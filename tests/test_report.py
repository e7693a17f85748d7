"""The benchmark report on a tiny configuration (random checkpoints, 64 px) and the tiny modes of distill_cost and
gpu_check. Structure only: benchmarks print and save numbers, tests never judge timings."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import PIPELINE, tiny_config

from benchmarks import distill_cost, gpu_check, report
from benchmarks.html import Document, Image, Para, Table, render_html, render_markdown
from benchmarks.latency_only import random_checkpoint
from benchmarks.plots import pareto_front
from runtime.config import load_config
from runtime.errors import UserError

FIGURES = ("pareto.png", "latency.png", "per_class_ap50.png", "scene.png")
ROW_FIELDS = ("name", "role", "method", "precision", "backend", "params", "gflops", "file_mb", "mean_ms", "p50_ms",
              "p99_ms", "throughput_ips", "AP", "AP50", "AP_s", "ap50_delta_vs_teacher", "speedup_vs_teacher")
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny config with random teacher, DS2D2 student and no-KD student checkpoints where distill.run puts them."""
    root = tmp_path_factory.mktemp("report")
    config = tiny_config(root)
    pipe = load_config(config).pipeline(PIPELINE)
    for role, stage, method in (("teacher", "teacher", None), ("student", "student-ds2d2", "ds2d2"),
                                ("student", "student-none", "none")):
        random_checkpoint(pipe, role, pipe.work_dir / stage / "model.pt", method)
    return config


def _assert_self_contained(html: str, figures: int) -> None:
    assert not EXTERNAL.search(html), "the report must not load anything from elsewhere"
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert html.count('src="data:image/png;base64,') == figures


def test_report_writes_every_file_with_the_promised_fields(project: Path, capsys: pytest.CaptureFixture) -> None:
    out = project.parent / "out"
    assert report.main([PIPELINE, "--config", str(project), "--out", str(out), "--iters", "2", "--warmup", "1"]) == 0
    assert "report.html" in capsys.readouterr().out
    for name in ("report.md", "report.html", "results.json", *FIGURES):
        assert (out / name).stat().st_size > 0, name
    _assert_self_contained((out / "report.html").read_text(), len(FIGURES))
    data = json.loads((out / "results.json").read_text())
    ctx = data["context"]
    assert ctx["machine"]["cpu_model"] and ctx["backend"].startswith("ort-cpu") and ctx["input_size"] == 64
    assert ctx["date"] and ctx["eval_images"] == 4 and not ctx["latency_only"]
    names = [r["name"] for r in data["rows"]]
    assert names[:2] == ["teacher FP32", "teacher INT8"]
    assert {"student DS2D2 FP32", "student DS2D2 INT8", "student no-KD FP32", "student no-KD INT8"} <= set(names)
    for row in data["rows"]:
        assert set(ROW_FIELDS) <= set(row)
        assert row["mean_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0 and row["AP50"] is not None
        assert row["params"] > 0 and row["file_mb"] > 0 and row["trained"]
    teacher, student = data["rows"][0], data["rows"][2]
    assert teacher["speedup_vs_teacher"] == pytest.approx(1.0) and teacher["ap50_delta_vs_teacher"] == 0
    assert student["params"] < teacher["params"]
    assert set(data["comparisons"]["ds2d2_vs_none"]) == {"fp32", "int8"}
    assert set(data["figures"].values()) == set(FIGURES)
    md = (out / "report.md").read_text()
    assert all(f"]({name})" in md for name in FIGURES)
    assert ctx["machine"]["cpu_model"] in md and "DS2D2 vs no distillation" in md


def test_latency_only_times_untrained_networks_calibrated_on_synthetic_images(project: Path) -> None:
    # The dataset is absent (as DIOR is here): calibration falls back to synthetic images and the report says so.
    out = project.parent / "latency"
    argv = [PIPELINE, "--config", str(project), "--latency-only", "--out", str(out), "--iters", "2", "--warmup", "0",
            "--calib-images", "2", "--set", "dataset.synthetic=null", "--set", "dataset.root=data/absent"]
    assert report.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["context"]["latency_only"]
    assert [r["name"] for r in data["rows"]] == ["teacher FP32", "teacher INT8", "student FP32", "student INT8"]
    assert all(not r["trained"] and r["AP50"] is None and r["mean_ms"] > 0 for r in data["rows"])
    assert all("latency only — untrained weights" in r["label"] for r in data["rows"])
    assert any("synthetic images" in note for note in data["context"]["notes"])
    html = (out / "report.html").read_text()
    _assert_self_contained(html, len(data["figures"]))
    assert "latency only — untrained weights" in html and data["figures"] == {"latency": "latency.png"}


def test_missing_checkpoint_names_the_training_command(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    with pytest.raises(UserError, match="distill.run tiny --stage teacher"):
        report.main([PIPELINE, "--config", str(config), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_html_escapes_text_and_embeds_images(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG fake")
    doc = Document("t <b>").add(Para("<script>alert(1)</script>"), Table(["a|b"], [["1"]], "cap"),
                               Image(png, "alt", "caption"))
    html = render_html(doc)
    assert "<script>" not in html and "&lt;script&gt;" in html and "data:image/png;base64," in html
    md = render_markdown(doc, tmp_path)
    assert "](a.png)" in md and "a\\|b" in md


def test_pareto_front_keeps_only_undominated_points() -> None:
    # (latency, AP50): the second point is slower and worse than the first, the third is faster but worse.
    assert pareto_front([(10, 50), (12, 40), (5, 30), (20, 60)]) == [2, 0, 3]


def test_distill_cost_tiny(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    assert distill_cost.main(["--tiny", "--iters", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    steps = data["steps"]
    assert {"plain student step (no KD)", "DS2D2 student step", "DS2D2 all terms, fwd+bwd"} <= set(steps)
    assert all(s["mean_ms"] > 0 and s["iters"] == 1 for s in steps.values())
    assert [d["boxes_per_image"] for d in data["disw"]] == [10, 100, 1000]
    # the vectorised DISW equals the per-box loop up to float32 summation (1000 boxes on the 4x4 grid: weights ~100)
    assert all(d["max_abs_diff"] < 1e-3 for d in data["disw"])
    assert data["machine"]["cpu_model"] and data["tiny"]


def test_gpu_check_tiny_on_cpu_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for section, keys in (("inference", ("teacher_fp32", "teacher_fp16", "student_fp32", "student_fp16")),
                          ("training", ("plain_fp32", "plain_amp", "ds2d2_fp32", "ds2d2_amp")),
                          ("onnxruntime", ("teacher_fp32", "student_fp32"))):
        assert "error" not in data[section], data[section].get("error")
        assert all(data[section][k]["mean_ms"] > 0 for k in keys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_check_without_gpu_exits_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--tiny", "--json", str(out)]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert json.loads(out.read_text())["cuda_available"] is False
