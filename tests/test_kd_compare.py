"""`python -m benchmarks.kd_compare`: the statistics, the table, and an end-to-end run on the tiny pipeline (whose
teacher and amplifier then serve `python -m benchmarks.kd_scales`)."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from benchmarks import kd_scales
from benchmarks.kd_compare import main, markdown, summarise, versus
from conftest import tiny_config


def run(seed, ap50, ap=None, ap_s=0.1, wall=10.0):
    return {"seed": seed, "AP": ap if ap is not None else ap50 / 2, "AP50": ap50, "AP_s": ap_s, "wall_time_s": wall}


def test_mean_std_gain_and_gap_closed():
    teacher = {"AP": 0.30, "AP50": 0.60, "AP_s": 0.2}
    runs = {"none": [run(0, 0.40), run(1, 0.42), run(2, 0.44)],
            "ds2d2": [run(0, 0.50, wall=20), run(1, 0.52, wall=22), run(2, 0.54, wall=24)],
            "pkd": [run(0, 0.41), run(1, 0.45), run(2, 0.49)]}
    results = {r.method: r for r in summarise(teacher, runs)}
    ds2d2, none, pkd = results["ds2d2"], results["none"], results["pkd"]
    assert ds2d2.metrics["AP50"].mean == pytest.approx(0.52)
    assert ds2d2.metrics["AP50"].std == pytest.approx(statistics.stdev([0.50, 0.52, 0.54]))  # sample std
    assert ds2d2.gain_over_none["AP50"] == pytest.approx(0.10)
    assert ds2d2.gap_closed["AP50"] == pytest.approx(0.10 / (0.60 - 0.42))
    assert ds2d2.wall_time_s.mean == pytest.approx(22.0)
    assert ds2d2.gain_beyond_spread["AP50"] and not none.gain_beyond_spread["AP50"]
    assert pkd.gain_over_none["AP50"] == pytest.approx(0.03) and not pkd.gain_beyond_spread["AP50"]  # std 0.04
    vs = versus(list(results.values()))
    assert vs["none"]["beyond_one_std"] and vs["pkd"]["beyond_one_std"]  # 0.07 > the larger std, 0.04
    assert vs["pkd"]["difference"] == pytest.approx(0.07) and vs["pkd"]["larger_std"] == pytest.approx(0.04)
    close = versus(summarise(teacher, {"ds2d2": runs["ds2d2"], "pkd": [run(0, 0.40), run(1, 0.50), run(2, 0.60)]}))
    assert not close["pkd"]["beyond_one_std"]  # 0.02 apart with a std of 0.1: not a result


def test_a_teacher_below_the_students_leaves_no_gap_and_one_seed_has_no_std():
    results = {r.method: r for r in summarise({"AP": 0.1, "AP50": 0.2, "AP_s": 0.0},
                                              {"none": [run(0, 0.3)], "fitnet": [run(0, 0.35)]})}
    assert results["fitnet"].gap_closed["AP50"] is None
    assert results["fitnet"].metrics["AP50"].std is None
    assert results["fitnet"].gain_beyond_spread["AP50"]  # with no spread known, any gain is above it


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """kd_compare of ds2d2 and none over two seeds on the tiny pipeline: (tmp dir, config, output dir, CLI args)."""
    tmp_path = tmp_path_factory.mktemp("kd_compare")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    out = tmp_path / "report"
    args = ["tiny", "--config", str(cfg), "--methods", "ds2d2", "none", "--seeds", "2", "--device", "cpu",
            "--out", str(out)]
    assert main(args) == 0
    yield tmp_path, cfg, out, args
    torch.set_num_threads(before)


@pytest.mark.slow
def test_end_to_end_two_seeds_share_one_teacher_and_amplifier(compared):
    tmp_path, cfg, out, args = compared
    report = json.loads((out / "kd_compare.json").read_text())
    runs_dir = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) == [
        "amplifier", "student-ds2d2-seed0", "student-ds2d2-seed1", "student-none-seed0", "student-none-seed1",
        "teacher"]
    assert report["seeds"] == [0, 1] and set(report["runs"]) == {"ds2d2", "none"}
    for method, method_runs in report["runs"].items():
        assert [r["seed"] for r in method_runs] == [0, 1]
        assert method_runs[0]["checkpoint_sha256"] != method_runs[1]["checkpoint_sha256"]  # the seed changed them
        assert all(r["scored_on"].endswith("test") and r["selection"] == "final epoch" for r in method_runs)
    for seed in (0, 1):
        ckpt = torch.load(runs_dir / f"student-ds2d2-seed{seed}" / "model.pt", weights_only=True, mmap=True)
        assert ckpt["inputs"]["teacher"] == report["teacher"]["checkpoint_sha256"]
        assert ckpt["config"]["schedule"]["student"]["seed"] == seed
    results = {r["method"]: r for r in report["results"]}
    assert set(results["ds2d2"]["metrics"]) == {"AP", "AP50", "AP_s"}
    assert results["ds2d2"]["metrics"]["AP50"]["values"] == [r["AP50"] for r in report["runs"]["ds2d2"]]
    assert "ds2d2" in report["ds2d2_versus"] or "none" in report["ds2d2_versus"]
    assert report["amplifier_wall_time_s"] > 0 and report["context"]["device"] == "cpu"
    text = (out / "kd_compare.md").read_text()
    assert "| DS2D2 |" in text and "| no KD |" in text and "| teacher |" in text and "±" in text
    assert "input 64x64" in text and "fp32" in text

    # a second run trains nothing: every stage is reused
    stamps = {p: p.stat().st_mtime_ns for p in runs_dir.glob("*/model.pt")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in runs_dir.glob("*/model.pt")} == stamps


def test_markdown_names_the_context():
    results = summarise({"AP": 0.3, "AP50": 0.6, "AP_s": 0.2}, {"none": [run(0, 0.4), run(1, 0.5)],
                                                               "ds2d2": [run(0, 0.5), run(1, 0.6)]})
    report = {"pipeline": "p", "seeds": [0, 1], "teacher": {"AP": 0.3, "AP50": 0.6, "AP_s": 0.2, "wall_time_s": 5},
              "amplifier_wall_time_s": 3.0, "ds2d2_versus": versus(results),
              "context": {"date": "2026-01-01", "machine": "cpu x", "torch": "2", "device": "cpu", "precision": "fp32",
                          "input_size": 256, "student_epochs": 8, "scored_on": "demo/test",
                          "selection": "best AP50 on demo/val"}}
    text = markdown(report, results)
    assert "55.0 ± 7.1" in text and "+10.0" in text and "67%" in text  # gap closed: 0.1 / (0.6 - 0.45)
    assert "input 256x256" in text and "best AP50 on demo/val" in text and "`demo/test`" in text


@pytest.mark.slow
def test_kd_scales_measures_every_term_at_the_start_of_training(compared):
    tmp_path, cfg, _, _ = compared
    out = tmp_path / "scales.json"
    assert kd_scales.main(["tiny", "--config", str(cfg), "--steps", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["method"], r["term"]): r for r in result["rows"]}
    expected = {("ds2d2", "kd_explicit_low"), ("ds2d2", "kd_implicit_high_box"), ("ds2d2 (teacher_energy)",
                "kd_explicit_high"), ("fitnet", "kd_fitnet"), ("fitnet (teacher_energy)", "kd_fitnet"),
                ("pkd", "kd_pkd"), ("fgd", "kd_fgd_global")}
    assert expected <= set(rows)
    assert all(r["raw"] > 0 and r["detection_loss"] > 0 for r in rows.values())
    # the tiny pipeline trains the raw form with unit weights: raw == weighted there, the other form is not in use
    assert rows[("ds2d2", "kd_explicit_low")]["weighted"] == pytest.approx(rows[("ds2d2", "kd_explicit_low")]["raw"])
    assert rows[("ds2d2 (teacher_energy)", "kd_explicit_low")]["weight"] is None
    raw = result["fitnet_weight_by_rule"]["raw"]
    explicit = rows[("ds2d2", "kd_explicit_low")]["raw"] + rows[("ds2d2", "kd_explicit_high")]["raw"]
    assert raw == pytest.approx(explicit / rows[("fitnet", "kd_fitnet")]["raw"])
