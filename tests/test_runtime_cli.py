"""The runtime CLIs as a user runs them: infer writes COCO results and PNGs, bench and evaluate write their JSON
reports, and a tampered bundle or an engine without TensorRT ends with one clear line and a non-zero exit."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import tiny_config
from test_detector_equivalence import DOTA, make_tiny_bundle, tiny_retinanet, torch_detections

from runtime import bench, evaluate, infer
from runtime.data import load_dataset, to_coco_dict
from runtime.data.synthetic import SyntheticParams, generate
from runtime.draw import draw_detections
from runtime.errors import UserError
from runtime.metrics import evaluate_detections
from runtime.postprocess import Detections
from runtime.preprocess import read_image

REPO = Path(__file__).resolve().parents[1]
SIZE = 128


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "bundle"
    make_tiny_bundle(path, size=SIZE)  # pipeline 'tiny', as conftest's tiny_config
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "set"
    generate(SyntheticParams(num_train=0, num_val=0, num_test=5, image_size=SIZE), root)
    return root


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_infer_writes_coco_results_and_pictures(bundle, tmp_path):
    out = tmp_path / "out"
    assert infer.main([str(bundle), str(DOTA / "P1888.png"), str(DOTA / "P0706.png"), "--out", str(out),
                       "--threads", "1", "--tile", "--score-thresh", "0.6"]) == 0
    results = json.loads((out / "detections.json").read_text())
    meta = json.loads((out / "images.json").read_text())
    assert [m["file_name"] for m in meta["images"]] == [str(DOTA / "P1888.png"), str(DOTA / "P0706.png")]
    assert (meta["images"][1]["width"], meta["images"][1]["height"]) == (1111, 1182)
    assert results and {r["image_id"] for r in results} == {1, 2}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"} and 1 <= r["category_id"] <= 5
        assert r["score"] > 0.6 and r["bbox"][2] > 0 and r["bbox"][3] > 0
        x, y, w, h = r["bbox"]
        size = meta["images"][r["image_id"] - 1]
        assert x + w <= size["width"] + 1e-3 and y + h <= size["height"] + 1e-3
    picture = cv2.imread(str(out / "P0706.png"))
    assert picture.shape == (1182, 1111, 3)
    assert (picture != cv2.imread(str(DOTA / "P0706.png"))).any()  # boxes were drawn


def test_drawn_boxes_are_where_the_detections_are():
    image = np.full((100, 120, 3), 40, np.uint8)
    dets = Detections(np.array([[20, 30, 80, 90]], np.float32), np.array([0.9], np.float32), np.array([1]))
    drawn = draw_detections(image, dets, ("a", "b"))
    changed = (drawn != image).any(axis=2)
    assert changed[60, 20] and changed[60, 80] and changed[90, 50]  # the box edges
    assert not changed[60, 50] and not changed[5, 110]  # inside and far outside the box
    assert (draw_detections(image, dets, ("a", "b"), score_thresh=0.95) == image).all()


def test_bench_json_has_the_promised_fields(bundle, tmp_path):
    path = tmp_path / "bench.json"
    assert bench.main([str(bundle), "--threads", "1", "--warmup", "1", "--iters", "3", "--batch", "2",
                       "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    res = report["results"]
    for stage in ("end_to_end", "preprocess", "infer", "postprocess"):
        assert set(res["latency_ms"][stage]) >= {"mean", "p50", "p90", "p99"}
        assert res["latency_ms"][stage]["mean"] > 0
    lat = res["latency_ms"]
    parts = lat["preprocess"]["mean"] + lat["infer"]["mean"] + lat["postprocess"]["mean"]
    assert parts <= lat["end_to_end"]["mean"] * 1.001
    assert res["throughput_images_per_s"] > 0 and res["end_to_end_over_infer"] >= 1
    assert res["memory"]["rss_peak_mib"] > 10 and "gpu_mib" in res["memory"] and "power" in res
    facts = report["machine"]
    assert facts["cpu_model"] and facts["cpu_cores_logical"] >= 1 and facts["onnxruntime_providers"]
    assert set(facts["versions"]) >= {"numpy", "onnxruntime", "tensorrt", "python"}
    assert set(facts["jetson"]) == {"device_model", "l4t", "jetpack", "nvpmodel", "jetson_clocks", "gpu_mhz",
                                    "emc_mhz", "temperature_c"}
    assert report["engine_only"] is None  # ONNX Runtime ran: no engine-only figures beside it
    assert report["detector"]["backend"] == "ort-cpu" and report["batch"] == 2 and report["iters"] == 3


def test_evaluate_gives_the_pytorch_models_metrics(bundle, synth, tmp_path):
    """Same split, same metric code: the bundle's AP50 equals the PyTorch model's (here to 1e-3)."""
    path = tmp_path / "eval.json"
    assert evaluate.main([str(bundle), "--dataset", str(synth), "--split", "test", "--threads", "1",
                          "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["dataset"]["images"] == 5 and report["dataset"]["split"] == "test"
    assert set(report["summary"]) == {"AP", "AP50", "AP75", "voc_mAP50"}
    assert set(report["ms_per_image"]) == {"preprocess", "infer", "postprocess", "total"}
    dataset = load_dataset(None, synth, "test", classes=report["dataset"]["classes"])
    model = tiny_retinanet(SIZE)
    theirs = []
    for image_id, rec in enumerate(dataset.records, start=1):
        theirs.extend(torch_detections(model, read_image(rec.path), SIZE).to_coco_results(image_id))
    reference = evaluate_detections(to_coco_dict(dataset), theirs)
    assert report["detections"] == len(theirs)
    assert report["summary"]["AP50"] == pytest.approx(reference.coco.AP50, abs=1e-3)
    assert report["metrics"]["voc"]["per_class_AP50"] == pytest.approx(reference.voc.per_class_AP50, abs=1e-3)


def test_evaluate_defaults_to_the_pipelines_dataset(bundle, tmp_path):
    """No --dataset: the bundle's pipeline ('tiny') in pipelines.yaml names it (a synthetic set is generated first)."""
    config = tiny_config(tmp_path)
    entry = yaml.safe_load(config.read_text())["datasets"]["tiny_synth"]
    path = tmp_path / "eval.json"
    assert evaluate.main([str(bundle), "--config", str(config), "--limit", "2", "--threads", "1",
                          "--json", str(path), "--tile"]) == 0
    report = json.loads(path.read_text())
    assert Path(report["dataset"]["root"]) == tmp_path / entry["root"] and report["dataset"]["images"] == 2
    assert report["dataset"]["split"] == entry["test_split"] and report["tiled"] is True


def test_evaluate_without_a_known_pipeline_asks_for_a_dataset(bundle, tmp_path):
    config = tiny_config(tmp_path)
    text = config.read_text().replace("tiny:", "other:").replace("default_pipeline: tiny", "default_pipeline: other")
    config.write_text(text)
    with pytest.raises(UserError, match="pipeline 'tiny' is not in .*pass --dataset"):
        evaluate.main([str(bundle), "--config", str(config), "--json", str(tmp_path / "x.json")])


@pytest.mark.parametrize("module", ["runtime.infer", "runtime.bench", "runtime.evaluate"])
def test_tampered_bundle_is_refused_in_one_line(bundle, tmp_path, module):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in bundle.iterdir():
        if f.is_file():
            (tampered / f.name).write_bytes(f.read_bytes())
    data = bytearray((tampered / "model_fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit deep inside the weights
    (tampered / "model_fp32.onnx").write_bytes(bytes(data))
    extra = [str(DOTA / "P1888.png")] if module == "runtime.infer" else []
    done = run_cli(module, str(tampered), *extra)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "model_fp32.onnx" in lines[0] and "sha256" in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_engine_bundle_without_tensorrt_says_what_to_do(tmp_path):
    make_tiny_bundle(tmp_path / "engine_bundle", size=64, engine=True)
    done = run_cli("runtime.bench", str(tmp_path / "engine_bundle"), "--backend", "trt", "--iters", "1")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and "--backend ort-cpu" in lines[0]
