"""Anchors as a model setting: pipelines.yaml -> torchvision model -> bundle manifest -> runtime decoder, and the
anchor report of `python -m runtime.data stats`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection.image_list import ImageList

from distill.models import build_detector
from runtime.anchors import AnchorSpec, anchor_spec_for, generate_anchors, reference_sizes
from runtime.config import AnchorConfig, load_config
from runtime.data.anchor_fit import anchor_report, coverage
from runtime.errors import UserError
from runtime.records import DetectionSet, ImageRecord

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
SMALL = {"sizes": [[6, 8, 10], [12, 16, 20], [24, 32, 40], [48, 64, 80], [96, 128, 160]],
         "aspect_ratios": [0.5, 1.0, 2.0]}


def torch_anchors(model, size: int) -> np.ndarray:
    """The anchors torchvision's generator makes for an S x S input (RetinaNet or the Faster R-CNN RPN)."""
    generator = getattr(model, "anchor_generator", None) or model.rpn.anchor_generator
    image = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        feats = list(model.backbone(image).values())
    return generator(ImageList(image, [(size, size)]), feats)[0].numpy()


def spec(arch: str, anchors=None, **extra):
    return SimpleNamespace(arch=arch, backbone="resnet18", fpn_width=16, head_convs=1, pretrained_backbone=False,
                           norm="bn", anchors=anchors, assign=None, **extra)


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_configured_anchors_reach_the_model_and_the_runtime_reproduces_them(arch):
    anchors = AnchorConfig(**SMALL) if arch == "retinanet" else AnchorConfig(sizes=[[8], [16], [32], [64], [128]])
    model = build_detector(spec(arch, anchors), 3, 128).eval()
    ours, _ = generate_anchors(anchor_spec_for(arch, anchors), (128, 128))
    theirs = torch_anchors(model, 128)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert ours[:, 2:].min() < 20  # really the small anchors, not the reference's (>= 32 px)


@given(base=st.floats(0.5, 8.0), ratio=st.floats(0.25, 4.0), size=st.sampled_from([64, 96, 160, 256]))
@settings(max_examples=15, deadline=None)
def test_runtime_anchors_equal_torchvision_for_any_sizes(base, ratio, size):
    sizes = [[round(base * s * 2 ** (i / 2), 3) for i in range(2)] for s in (8, 16, 32, 64, 128)]
    config = AnchorConfig(sizes=sizes, aspect_ratios=[ratio, 1.0])
    model = _retina_cache(tuple(map(tuple, sizes)), ratio)
    ours, _ = generate_anchors(anchor_spec_for("retinanet", config), (size, size))
    np.testing.assert_allclose(ours, torch_anchors(model, size), atol=1e-3)


def _retina_cache(sizes, ratio):
    # The backbone only provides feature-map shapes here: build it once per anchor setting.
    config = AnchorConfig(sizes=[list(s) for s in sizes], aspect_ratios=[ratio, 1.0])
    return build_detector(spec("retinanet", config), 2, 64).eval()


def test_paper_pipelines_keep_the_reference_anchors():
    cfg = load_config()
    for name in ("dior_retina", "dota_retina", "dior_faster_rcnn", "dota_faster_rcnn"):
        pipe = cfg.pipeline(name)
        for model in (pipe.teacher, pipe.student):
            assert model.anchors is None and model.assign is None, name
            assert anchor_spec_for(model.arch, model.anchors).sizes == reference_sizes(model.arch)
    assert reference_sizes("retinanet")[0] == pytest.approx((32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)))
    assert reference_sizes("faster_rcnn") == ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))


def test_bad_anchor_settings_are_one_clear_error(tmp_path):
    cfg = tiny_config(tmp_path, models={"tiny_teacher": {"anchors": {"sizes": [[8, 16]] * 4}}})
    with pytest.raises(UserError, match="anchors.sizes has 4 levels, retinanet has 5") as info:
        load_config(cfg)
    assert "tiny_teacher" in str(info.value)
    cfg = tiny_config(tmp_path, models={"tiny_teacher": {"anchors": {"sizes": [[8, 16]] * 4 + [[8]]}}})
    with pytest.raises(UserError, match="same"):
        load_config(cfg)
    cfg = tiny_config(tmp_path, models={"tiny_teacher": {"assign": {"fg_iou": 0.3, "bg_iou": 0.4}}})
    with pytest.raises(UserError, match="bg_iou"):
        load_config(cfg)


def test_assignment_thresholds_reach_the_matchers():
    assign = SimpleNamespace(fg_iou=0.4, bg_iou=0.3)
    retina = build_detector(_with(spec("retinanet"), assign), 2, 64)
    assert (retina.proposal_matcher.high_threshold, retina.proposal_matcher.low_threshold) == (0.4, 0.3)
    rcnn = build_detector(_with(spec("faster_rcnn"), assign), 2, 64)
    matcher = rcnn.rpn.proposal_matcher
    assert (matcher.high_threshold, matcher.low_threshold) == (0.4, 0.3)


def _with(namespace: SimpleNamespace, assign) -> SimpleNamespace:
    namespace.assign = assign
    return namespace


def test_box_loss_setting_switches_torchvisions_regression_loss():
    model = build_detector(spec("retinanet", box_loss="giou"), 2, 64)
    assert model.head.regression_head._loss_type == "giou"
    assert build_detector(spec("retinanet"), 2, 64).head.regression_head._loss_type == "l1"


def _one_image(boxes: list[list[float]], size: int = 128) -> DetectionSet:
    record = ImageRecord(Path("a.png"), size, size, np.asarray(boxes, np.float32).reshape(-1, 4),
                         np.zeros(len(boxes), np.int64), np.zeros(len(boxes), bool))
    return DetectionSet("test", ("vehicle",), [record])


def test_coverage_counts_what_the_assigner_sees():
    spec_ = AnchorSpec(sizes=((16,),) * 5, aspect_ratios=(1.0,))
    # Anchors of level P3 sit at (0, 0), (8, 8)... with half-size 8: a box equal to one anchor has IoU 1.
    exact = coverage([(np.array([[8.0, 8.0, 24.0, 24.0]]), np.zeros(1, np.int64))], spec_, (128, 128), 0.5)
    assert exact.objects == 1 and exact.with_positive == 1.0 and exact.mean_best_iou == pytest.approx(1.0)
    assert exact.best_level == {"P3": 1.0, "P4": 0.0, "P5": 0.0, "P6": 0.0, "P7": 0.0}
    # A 6 px box between grid points overlaps every 16 px anchor below 0.5: only a low-quality match.
    tiny = coverage([(np.array([[2.0, 2.0, 8.0, 8.0]]), np.zeros(1, np.int64))], spec_, (128, 128), 0.5)
    assert tiny.with_positive == 0.0 and tiny.low_quality_only == 1.0 and tiny.mean_best_iou < 0.5


def test_suggestion_covers_small_objects_better_than_the_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 240, (60, 2))
    wh = rng.uniform(7, 14, (60, 2))
    data = _one_image(np.concatenate([xy, xy + wh], axis=1).tolist(), 256)
    report = anchor_report(data, 256, anchor_spec_for("retinanet"), 0.5)
    assert report.current.with_positive < 0.1  # 32 px anchors and 7-14 px objects
    assert report.suggested.with_positive > report.current.with_positive + 0.3
    assert report.suggested.sizes[0][0] < 16
    sizes = report.classes["vehicle"].size_quantiles
    assert 7 <= sizes["p5"] <= sizes["p50"] <= sizes["p95"] <= 14


def test_stats_cli_reports_anchor_coverage_as_json(tmp_path):
    cfg = tiny_config(tmp_path, models={"tiny_teacher": {"anchors": SMALL}})
    pipe = load_config(cfg).pipeline("tiny")
    from distill.data import ensure_dataset

    ensure_dataset(pipe.dataset_root, pipe.dataset.synthetic)
    proc = subprocess.run([sys.executable, "-m", "runtime.data", "stats", str(pipe.dataset_root), "--split", "train",
                           "--pipeline", "tiny", "--config", str(cfg), "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    anchors = data["anchors"]
    assert anchors["input_size"] == 64 and anchors["current"]["sizes"][0] == [6.0, 8.0, 10.0]
    assert set(anchors["classes"]) == set(pipe.dataset.classes)
    assert 0 <= anchors["current"]["with_positive"] <= 1 and anchors["suggested"]["objects"] > 0
    table = subprocess.run([sys.executable, "-m", "runtime.data", "stats", str(pipe.dataset_root), "--split", "train",
                            "--pipeline", "tiny", "--config", str(cfg)], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert table.returncode == 0 and "anchor coverage" in table.stdout and "suggested" in table.stdout


@pytest.mark.slow
def test_bundle_carries_the_anchors_and_the_runtime_decodes_like_torchvision(tmp_path):
    from deploy.build import main as deploy_main
    from distill.checkpoint import load_detector
    from distill.run import main as run_main
    from runtime.detector import Detector
    from runtime.manifest import load_bundle

    from test_detector_equivalence import assert_same_detections, scene_crops, torch_detections

    cfg = tiny_config(tmp_path, models={"tiny_teacher": {"anchors": SMALL}}, distill={"method": "none"})
    assert run_main(["tiny", "--config", str(cfg), "--stage", "teacher"]) == 0
    ckpt = tmp_path / "runs" / "tiny" / "teacher" / "model.pt"
    out = tmp_path / "bundle"
    assert deploy_main(["--target", "cpu", "--pipeline", "tiny", "--config", str(cfg), "--model", "teacher",
                        "--checkpoint", str(ckpt), "--precision", "fp32", "--out", str(out)]) == 0
    manifest = load_bundle(out).manifest
    assert [list(level) for level in manifest.postprocess.anchors.sizes] == SMALL["sizes"]
    model, _ = load_detector(ckpt)
    model.eval()
    with Detector(out, backend="ort-cpu", precision="fp32") as detector:
        for crop in scene_crops():
            assert_same_detections(detector.detect([crop])[0], torch_detections(model, crop, 64), box_tol=1e-2)


@pytest.mark.parametrize("levels", [(2, 6), (2, 7), (3, 6)])
def test_fpn_levels_setting_builds_the_pyramid_and_the_runtime_follows(levels):
    from deploy.build import _anchor_spec

    low, high = levels
    sizes = [[2.0 ** level * 1.5] for level in range(low, high + 1)]
    model = build_detector(spec("retinanet", AnchorConfig(sizes=sizes), fpn_levels=levels), 2, 128).eval()
    with torch.no_grad():
        feats = list(model.backbone(torch.zeros(1, 3, 128, 128)).values())
    assert [f.shape[-1] for f in feats] == [-(-128 // 2**level) for level in range(low, high + 1)]
    manifest_spec = _anchor_spec(model, 128)  # raises unless runtime.anchors reproduces the model's anchors
    assert manifest_spec.strides == tuple(2**level for level in range(low, high + 1))
    ours, _ = generate_anchors(anchor_spec_for("retinanet", AnchorConfig(sizes=sizes), levels), (128, 128))
    np.testing.assert_allclose(ours, torch_anchors(model, 128), atol=1e-4)


def test_fpn_levels_are_checked_against_the_anchor_levels(tmp_path):
    cfg = tiny_config(tmp_path, models={"tiny_teacher": {"fpn_levels": [2, 6]}})
    assert load_config(cfg).pipeline("tiny").teacher.fpn_levels == (2, 6)
    cfg = tiny_config(tmp_path, models={"tiny_teacher": {"fpn_levels": [2, 6], "anchors": SMALL | {"sizes": SMALL["sizes"][:4]}}})
    with pytest.raises(UserError, match="anchors.sizes has 4 levels, retinanet has 5"):
        load_config(cfg)
    cfg = tiny_config(tmp_path, models={"tiny_teacher": {"fpn_levels": [1, 6]}})
    with pytest.raises(UserError, match="fpn_levels"):
        load_config(cfg)


def test_head_norm_setting_puts_groupnorm_in_both_subnets():
    model = build_detector(spec("retinanet", head_norm="gn"), 2, 64)
    for subnet in (model.head.classification_head, model.head.regression_head):
        norms = [m for m in subnet.conv.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert len(norms) == 1 and norms[0].num_groups == 16  # width 16: as many groups as divide it, up to 32
    plain = build_detector(spec("retinanet"), 2, 64)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.head.modules())
