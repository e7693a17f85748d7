"""Smoke runs of the post-processing and calibration-cost benchmarks at toy sizes: they run, compare what they say
they compare, and write their JSON (the figures themselves come from full runs, never from tests)."""
from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from benchmarks import calibration_cost, postprocess_cost


def test_postprocess_benchmark_compares_equal_outputs():
    result = postprocess_cost.run(256, 5, 30, iters=20, warmup=1)
    assert result["equal_to_torchvision"] and result["detections"] > 0
    assert result["candidates_above_0.05"] > 100
    assert all(t["iters"] == 20 and t["p50_ms"] > 0 for t in result["timings"].values())


def test_postprocess_benchmark_refuses_too_few_calls():
    from runtime.errors import UserError

    with pytest.raises(UserError, match=">= 20"):
        postprocess_cost.main(["--iters", "5"])


@pytest.mark.slow
def test_calibration_cost_measures_each_count_in_a_subprocess(tmp_path):
    config = tiny_config(tmp_path)
    out = tmp_path / "cost.json"
    code = calibration_cost.main(["--config", str(config), "--model", "tiny_student", "--size", "64",
                                  "--classes", "3", "--counts", "1", "2", "--configs", "ort-u8s8:minmax",
                                  "ort-symmetric:percentile", "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["config"], r["images"]) for r in rows] == [
        (c, n) for n in (1, 2) for c in ("ort-u8s8:minmax", "ort-symmetric:percentile")]
    assert all(r["peak_rss_mib"] > 50 and r["wall_s"] > 0 and r["cpu_s"] > 0
               and r["calibration"]["images"] == r["images"] for r in rows)
    assert {s["config"] for s in result["summary"]} == {"ort-u8s8:minmax", "ort-symmetric:percentile"}
    assert result["machine"]["cpu_cores_logical"]


def test_linear_fit_and_estimate():
    fixed, per_image = calibration_cost.linear_fit([(1, 12.0), (3, 16.0)])
    assert (fixed, per_image) == pytest.approx((10.0, 2.0))
    rows = [{"config": "a", "images": 1, "process_s": 12.0, "cpu_s": 6.0},
            {"config": "a", "images": 3, "process_s": 16.0, "cpu_s": 8.0}]
    assert calibration_cost.estimate_s(rows, ["a"], [1, 3, 10]) == pytest.approx(30.0)
    assert calibration_cost.estimate_s(rows, ["a"], [1, 3, 10], "cpu_s") == pytest.approx(15.0)
