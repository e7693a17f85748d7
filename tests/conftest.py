"""Shared fixtures: a tiny pipelines.yaml (synthetic 64 px data, ResNet-18 detectors) for end-to-end tests.

Use the plain function from any test module (`from conftest import tiny_config`) or the `make_tiny_config` fixture:

    cfg = tiny_config(tmp_path)                                   # RetinaNet, pipeline "tiny", 1 epoch per stage
    cfg = tiny_config(tmp_path, arch="faster_rcnn", epochs=2)
    cfg = tiny_config(tmp_path, schedule={"student": {"lr": 0.02}}, distill={"method": "none"})

Keyword overrides are deep-merged into the pipeline entry; the top-level sections (datasets, models, targets,
work_dir, artifacts_dir) are merged at the top instead. `epochs=N` sets every stage's epochs, `synthetic={...}`
merges into the dataset's generator parameters. The dataset is generated on first use under tmp_path/data/tiny.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

PIPELINE = "tiny"
CLASSES = ["vehicle", "storagetank", "airplane"]
_TOP_LEVEL = ("datasets", "models", "targets", "work_dir", "artifacts_dir", "default_pipeline")


def _stage(**extra: Any) -> dict[str, Any]:
    base = {"epochs": 1, "batch_size": 4, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
            "warmup_iters": 2, "warmup_factor": 0.1, "milestones": [], "clip_grad": 10.0, "eval_every": 1,
            "amp": False, "workers": 0, "seed": 0, "augment_flip": True}
    return base | extra


def _merge(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def tiny_config(tmp_path: Path, arch: str = "retinanet", **overrides: Any) -> Path:
    """Write a tiny pipelines.yaml (pipeline 'tiny': 12 train / 4 test synthetic 64 px images) and return its path."""
    tmp_path = Path(tmp_path)
    config: dict[str, Any] = {
        "default_pipeline": PIPELINE,
        "work_dir": "runs",
        "artifacts_dir": "artifacts",
        "datasets": {"tiny_synth": {
            "format": "dior", "root": "data/tiny", "train_split": "train", "test_split": "test",
            "classes": list(CLASSES),
            "synthetic": {"seed": 0, "image_size": 64, "num_train": 12, "num_val": 0, "num_test": 4,
                          "classes": list(CLASSES), "objects_per_image": [2, 6], "dense_scene_fraction": 0.0,
                          "distractors_per_image": [0, 2], "object_scale": 0.5},
        }},
        "models": {
            "tiny_teacher": {"arch": arch, "backbone": "resnet18", "fpn_width": 32, "head_convs": 1, "norm": "bn"},
            "tiny_student": {"arch": arch, "backbone": "resnet18", "fpn_width": 16, "head_convs": 1, "norm": "bn"},
        },
        "pipelines": {PIPELINE: {
            "description": "test pipeline: tiny synthetic data, ResNet-18 teacher and narrower student",
            "dataset": "tiny_synth", "teacher": "tiny_teacher", "student": "tiny_student", "input_size": 64,
            "distill": {"method": "ds2d2", "weights": {"explicit_low": 1.0, "explicit_high": 1.0,
                                                       "implicit_full": 1.0, "implicit_high": 1.0}},
            "schedule": {"teacher": _stage(), "amplifier": _stage(), "student": _stage()},
            "test": {"score_thresh": 0.05, "nms_iou": 0.5, "max_detections": 50, "topk_candidates": 200},
            "calibration": {"images": 4, "split": "train", "method": "minmax"},
        }},
        "targets": {"cpu": {"description": "ONNX Runtime on the CPU", "runtime": "onnxruntime", "precision": "int8",
                            "quantizer": "ort-u8s8"}},
    }
    pipeline = config["pipelines"][PIPELINE]
    epochs = overrides.pop("epochs", None)
    if epochs is not None:
        for stage in pipeline["schedule"].values():
            stage["epochs"] = epochs
    synthetic = overrides.pop("synthetic", None)
    if synthetic:
        _merge(config["datasets"]["tiny_synth"]["synthetic"], synthetic)
    _merge(config, {k: v for k, v in overrides.items() if k in _TOP_LEVEL})
    _merge(pipeline, {k: v for k, v in overrides.items() if k not in _TOP_LEVEL})
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def make_tiny_config(tmp_path: Path):
    """``make_tiny_config(arch='retinanet', **overrides) -> Path`` writing into this test's tmp_path."""
    return lambda arch="retinanet", **overrides: tiny_config(tmp_path, arch, **overrides)
