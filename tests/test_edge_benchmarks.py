"""Edge benchmarks on a tiny configuration: latency-only reports time the sibling pipelines' students, the scene
benchmark tiles like runtime.infer, micro-timings are medians of >= 20 calls, the post-processing and
calibration-cost benchmarks run and compare what they say they compare. Structure only: benchmarks print and save
numbers, tests never judge timings."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PIPELINE, tiny_config

from benchmarks import calibration_cost, distill_cost, postprocess_cost, report, scene_bench
from benchmarks.latency_only import latency_models, random_checkpoint, sibling_pipelines
from benchmarks.timing import MIN_CALLS, measure, measure_interleaved
from distill.checkpoint import load_checkpoint
from runtime import infer
from runtime.config import load_config
from runtime.errors import UserError

EDGE = "tiny_edge"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config plus a sibling pipeline 'tiny_edge': same teacher and data, a MobileNetV3 separable student."""
    path = tiny_config(tmp_path_factory.mktemp("edge"))
    config = yaml.safe_load(path.read_text())
    config["models"]["tiny_mbv3"] = {"arch": "retinanet", "backbone": "mobilenet_v3_large", "fpn_width": 16,
                                     "head_convs": 1, "head": "separable", "norm": "bn"}
    config["pipelines"][EDGE] = copy.deepcopy(config["pipelines"][PIPELINE]) | {"student": "tiny_mbv3"}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_sibling_pipelines_share_teacher_data_and_size():
    cfg = load_config()
    assert [p.name for p in sibling_pipelines(cfg.pipeline("dior_retina"))] == ["dior_retina_edge", "dior_retina_slim"]
    assert [p.name for p in sibling_pipelines(cfg.pipeline("dior_retina_edge"))] == ["dior_retina", "dior_retina_slim"]
    assert [p.name for p in sibling_pipelines(cfg.pipeline("demo_retina"))] == ["demo_retina_edge"]
    assert sibling_pipelines(cfg.pipeline("dota_retina")) == []  # same models, other data: not a sibling
    # --set items apply to the siblings too (the comparison stays like for like), but `student.*` only to the named
    # pipeline's own student
    sets = ["input_size=256", "student.fpn_width=64"]
    small = load_config(None, sets, "dior_retina").pipeline("dior_retina")
    assert sibling_pipelines(small) == []  # resolved without the overrides: other input size, nothing comparable
    siblings = sibling_pipelines(small, None, sets)
    assert [(p.name, p.input_size, p.student.fpn_width) for p in siblings] == [("dior_retina_edge", 256, 128),
                                                                               ("dior_retina_slim", 256, 128)]


def test_latency_only_times_the_siblings_students_unless_asked_not_to():
    pipe = load_config().pipeline("dior_retina")
    models = latency_models(pipe)
    assert [(m.role, m.name, m.folder) for m in models] == [
        ("teacher", "teacher", "teacher"), ("student", "student", "student"),
        ("student", "student dior_retina_edge", "student-dior_retina_edge"),
        ("student", "student dior_retina_slim", "student-dior_retina_slim")]
    assert models[2].pipe.student.backbone == "mobilenet_v3_large"
    assert [m.name for m in latency_models(pipe, own_student_only=True)] == ["teacher", "student"]


def test_scene_is_painted_once_with_the_pipelines_classes(project: Path, tmp_path: Path):
    pipe = load_config(project).pipeline(PIPELINE)
    settings = scene_bench.SceneSettings(scene_size=128, objects=6)
    image, objects = scene_bench.synthetic_scene(pipe, settings, tmp_path / "scene.png")
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8 and 0 < objects <= 6
    before = (tmp_path / "scene.png").stat().st_mtime_ns
    again, count = scene_bench.synthetic_scene(pipe, settings, tmp_path / "scene.png")
    assert (tmp_path / "scene.png").stat().st_mtime_ns == before and count == objects
    assert np.array_equal(again, image)  # PNG: lossless
    other, _ = scene_bench.synthetic_scene(pipe, scene_bench.SceneSettings(scene_size=128, objects=6, seed=1),
                                           tmp_path / "scene.png")
    assert not np.array_equal(other, image)  # other parameters repaint it


def test_random_checkpoint_is_rewritten_when_the_architecture_changes(project: Path, tmp_path: Path):
    path = tmp_path / "model.pt"
    pipe = load_config(project).pipeline(EDGE)
    random_checkpoint(pipe, "student", path)
    assert load_checkpoint(path)["model_spec"]["backbone"] == "mobilenet_v3_large"
    changed = load_config(project, ["student.fpn_width=24"], EDGE).pipeline(EDGE)
    random_checkpoint(changed, "student", path)
    assert load_checkpoint(path)["model_spec"]["fpn_width"] == 24


@pytest.mark.slow
def test_latency_only_report_and_scene_bench_time_the_edge_students(project: Path, tmp_path: Path):
    out = project.parent / "latency"
    argv = [PIPELINE, "--config", str(project), "--latency-only", "--out", str(out), "--iters", "2", "--warmup", "0",
            "--calib-images", "2"]
    assert report.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["teacher FP32", "teacher INT8", "student FP32", "student INT8", f"student {EDGE} FP32",
                     f"student {EDGE} INT8"]
    edge = data["rows"][-1]
    assert edge["params"] < data["rows"][0]["params"] and edge["infer_mean_ms"] > 0 and edge["mean_ms"] > 0
    assert edge["speedup_vs_teacher"] is not None and edge["infer_speedup_vs_teacher"] is not None
    assert any("mobilenet_v3_large FPN 16, 1 separable head convs" in n for n in data["context"]["notes"])

    # The scene benchmark reuses those bundles: teacher FP32 against each student's INT8, tiled like runtime.infer.
    js = tmp_path / "scene.json"
    scene_argv = [PIPELINE, "--config", str(project), "--latency-only", "--out", str(out), "--scene-size", "256",
                  "--tile", "128", "--overlap", "32", "--objects", "20", "--iters", "1", "--warmup", "0",
                  "--calib-images", "2", "--json", str(js)]
    assert scene_bench.main(scene_argv) == 0
    result = json.loads(js.read_text())
    assert [r["name"] for r in result["rows"]] == ["teacher FP32", "student INT8", f"student {EDGE} INT8"]
    assert result["tiling"] | {"as": None} == {"tile": 128, "overlap": 32, "tiles": 9, "tiles_per_detect_call": 4,
                                               "images_per_network_call": 1, "as": None}  # 3 x 3 tiles of 128 px
    assert result["scene"]["size"] == [256, 256] and result["machine"]["cpu_model"]
    for row in result["rows"]:
        s, st = row["seconds_per_scene"], row["stages_s_median"]
        assert s["median"] > 0 and st["infer"] > 0 and st["preprocess"] + st["infer"] + st["postprocess"] <= s["max"]
    assert result["rows"][0]["speedup_vs_teacher"] == pytest.approx(1.0)

    # Same bundle, same scene file, same settings through the runtime.infer CLI: the same detections.
    scene = Path(result["scene"]["file"])
    cli_out = tmp_path / "cli"
    bundle = out / "bundles" / f"student-{EDGE}"
    assert infer.main([str(bundle), str(scene), "--tile", "--tile-size", "128", "--overlap", "32", "--no-png",
                       "--precision", "int8", "--backend", "ort-cpu", "--out", str(cli_out)]) == 0
    assert len(json.loads((cli_out / "detections.json").read_text())) == result["rows"][2]["detections"]


@pytest.mark.parametrize("bad, match", [(["--overlap", "128"], "--overlap"), (["--scene-size", "8192"], "--scene-size"),
                                        (["--batch", "0"], "--batch")])
def test_scene_bench_rejects_impossible_settings_before_any_work(project: Path, tmp_path: Path, bad, match):
    with pytest.raises(UserError) as err:
        scene_bench.main([PIPELINE, "--config", str(project), "--latency-only", "--out", str(tmp_path / "o"),
                          "--tile", "128", "--overlap", "32", *bad])
    assert err.value.where == match
    assert not (tmp_path / "o").exists()


def test_micro_timings_are_medians_of_interleaved_rounds():
    calls: list[str] = []
    slow_first = iter([50.0] + [0.0] * 100)

    def a() -> None:
        calls.append("a")
        # one very slow call (a busy moment on a shared machine) must not move the median
        import time

        time.sleep(next(slow_first) / 1e3)

    t = measure_interleaved({"a": a, "b": lambda: calls.append("b")}, iters=MIN_CALLS, warmup=0)
    assert calls[:4] == ["a", "b", "a", "b"]  # rounds, not blocks
    assert t["a"].iters == MIN_CALLS and t["a"].median_ms < 10 < t["a"].mean_ms * MIN_CALLS
    assert t["a"].summary == f"median of {MIN_CALLS} calls after 0 warm-up calls"
    assert t["a"].as_dict()["statistic"] == "median"
    assert measure(lambda: None).summary == f"median of {MIN_CALLS} calls after 3 warm-up calls"
    assert np.isfinite(t["b"].p99_ms)


def test_distill_cost_refuses_fewer_than_twenty_calls(tmp_path: Path):
    with pytest.raises(UserError, match=f"--iters >= {MIN_CALLS}"):
        distill_cost.main(["--tiny", "--iters", "5", "--json", str(tmp_path / "c.json")])
    assert not (tmp_path / "c.json").exists()


def test_postprocess_benchmark_compares_equal_outputs():
    result = postprocess_cost.run(256, 5, 30, iters=20, warmup=1)
    assert result["equal_to_torchvision"] and result["detections"] > 0
    assert result["candidates_above_0.05"] > 100
    assert all(t["iters"] == 20 and t["median_ms"] > 0 and t["statistic"] == "median" for t in result["timings"].values())


def test_postprocess_benchmark_refuses_too_few_calls():
    with pytest.raises(UserError, match=">= 20"):
        postprocess_cost.main(["--iters", "5"])


@pytest.mark.slow
def test_calibration_cost_measures_each_count_in_a_subprocess(tmp_path: Path):
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
