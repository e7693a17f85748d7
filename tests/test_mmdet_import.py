"""Importing MMDetection 3.x checkpoints: judged against outputs MMDetection 3.3.0 itself computed (shared fixtures).

The fixtures (seeded random-weight RetinaNet-R18 / Faster R-CNN-R18, fp16 state dicts, an MMEngine runner
checkpoint, a fixed input and MMDetection's FPN maps, head outputs, anchors, proposals, RoI outputs and detections)
live outside the repository, in ../shared/data/mmdet_fixtures (or $MMDET_FIXTURES); see the README there.
No difference remains: with the MMDetection conventions swapped in (distill/models/mmdet_variant.py) every array
matches to float32 rounding (~1e-6 relative) and detections come out identical, in the same order.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from distill.checkpoint import load_checkpoint, load_detector
from distill.import_mmdet import import_checkpoint, main
from distill.mmdet_compat import (check_against, infer_spec, load_converted, map_state_dict,
                                  read_mmdet_checkpoint)
from distill.models import build_detector
from distill.models.mmdet_variant import to_mmdet_variant
from runtime.config import ModelSpec, load_config
from runtime.data.classes import DIOR_CLASSES
from runtime.errors import UserError

FIXTURES = Path(os.environ.get("MMDET_FIXTURES", Path(__file__).resolve().parents[2] / "shared/data/mmdet_fixtures"))
RETINA, FRCNN = "retinanet_r18_fpn_dior", "faster_rcnn_r18_fpn_dior"
pytestmark = pytest.mark.skipif(not (FIXTURES / "input_256.npy").is_file(), reason=f"no fixtures at {FIXTURES}")
SPEC_FIELDS_READY = {"mmdet_compat", "roi_fc_width"} <= set(ModelSpec.model_fields)


def rel_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|."""
    ref = torch.from_numpy(np.asarray(ref))
    return float((ours.detach() - ref).abs().max() / ref.abs().max())


def build_converted(name: str, mmdet_variant: bool = True) -> torch.nn.Module:
    """The fixture's fp16 state dict converted onto a torchvision model (eval, fed pre-normalised input)."""
    source = read_mmdet_checkpoint(FIXTURES / f"{name}_state_dict_fp16.pth")
    found = infer_spec(source.state_dict)
    spec = SimpleNamespace(arch=found.arch, backbone=found.backbone, fpn_width=found.fpn_width,
                           head_convs=found.head_convs or 1, pretrained_backbone=False, norm="bn",
                           roi_fc_width=found.roi_fc_width, mmdet_compat=mmdet_variant)
    model = build_detector(spec, found.num_classes, 256)
    if mmdet_variant:
        to_mmdet_variant(model)
    load_converted(check_against(map_state_dict(source.state_dict), model), model, name)
    model.transform.image_mean, model.transform.image_std = [0.0] * 3, [1.0] * 3  # input_256 is normalised
    return model.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / "input_256.npy"))


@pytest.fixture(scope="module", params=[RETINA, FRCNN])
def converted(request, image):
    """(name, converted model, MMDetection's outputs, our FPN maps) per fixture."""
    model = build_converted(request.param)
    with torch.no_grad():
        feats = model.backbone(image)
    return request.param, model, np.load(FIXTURES / f"{request.param}_outputs.npz"), feats


def assert_same_detections(ours: dict[str, torch.Tensor], ref) -> None:
    """Same count; each MMDetection detection has its own match: same label, boxes within 0.5 px, scores to 1e-3."""
    boxes, scores, labels = (torch.from_numpy(ref[k]) for k in ("det_boxes", "det_scores", "det_labels"))
    assert len(ours["boxes"]) == len(boxes) > 0
    dist = (ours["boxes"][:, None] - boxes[None]).abs().amax(-1)
    dist[ours["labels"][:, None] != labels[None]] = float("inf")
    match = dist.argmin(0)
    assert len(set(match.tolist())) == len(boxes)
    assert dist[match, torch.arange(len(boxes))].max() < 0.5
    assert (ours["scores"][match] - scores).abs().max() < 1e-3


def test_fpn_maps_match(converted):
    _, _, ref, feats = converted
    for i, f in enumerate(feats.values()):
        assert rel_err(f, ref[f"fpn_{i}"]) < 1e-4, f"fpn_{i}"


def test_head_outputs_and_anchors_match(converted, image):
    name, model, ref, feats = converted
    levels = list(feats.values())
    with torch.no_grad():
        if name == RETINA:
            out = model.head(levels)
            for key, ours, k in (("cls", out["cls_logits"], 20), ("bbox", out["bbox_regression"], 4)):
                theirs = np.concatenate(
                    [ref[f"{key}_{i}"].transpose(0, 2, 3, 1).reshape(1, -1, k) for i in range(5)], 1)
                assert rel_err(ours, theirs) < 1e-4, key
            anchors = model.anchor_generator(ImageList(image, [(256, 256)]), levels)[0]
        else:
            objectness, deltas = model.rpn.head(levels)
            for i in range(5):
                assert rel_err(objectness[i], ref[f"rpn_cls_{i}"]) < 1e-4
                assert rel_err(deltas[i], ref[f"rpn_bbox_{i}"]) < 1e-4
            anchors = model.rpn.anchor_generator(ImageList(image, [(256, 256)]), levels)[0]
    expected = np.concatenate([ref[f"anchors_{i}"] for i in range(5)])
    torch.testing.assert_close(anchors, torch.from_numpy(expected), rtol=0, atol=1e-5)


def test_faster_rcnn_proposals_and_roi_head_match(image):
    model, ref = build_converted(FRCNN), np.load(FIXTURES / f"{FRCNN}_outputs.npz")
    with torch.no_grad():
        feats = model.backbone(image)
        (proposals,), _ = model.rpn(ImageList(image, [(256, 256)]), feats)
        torch.testing.assert_close(proposals, torch.from_numpy(ref["proposals"]), rtol=0, atol=1e-3)
        theirs = torch.from_numpy(ref["proposals"])  # from here on: MMDetection's RoIs, to isolate the RoI head
        pool = model.roi_heads.box_roi_pool
        levels = pool.levels(torch.cat([torch.zeros(len(theirs), 1), theirs], 1))
        assert levels.tolist() == ref["roi_levels"].tolist()
        pooled = pool(feats, [theirs], [(256, 256)])
        assert rel_err(pooled[:64], ref["roi_feats_first64"]) < 1e-4
        cls, box = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
    assert rel_err(torch.cat([cls[:, 1:], cls[:, :1]], 1), ref["roi_cls"]) < 1e-4  # background back to last
    assert rel_err(box[:, 4:], ref["roi_bbox"]) < 1e-4
    assert box[:, :4].abs().max() == 0  # the background rows torchvision's layout needs are zero


def test_final_detections_match(converted, image):
    _, model, ref, _ = converted
    with torch.no_grad():
        (det,) = model([image[0]])
    assert_same_detections(det, ref)


@pytest.mark.parametrize("name", [RETINA, FRCNN])
def test_torchvision_conventions_alone_do_not_reproduce_mmdetection(name, image):
    """Why the MMDetection variant exists: rounded anchors (and P7 ReLU / RoIAlign aligned=False) change outputs."""
    plain, ref = build_converted(name, mmdet_variant=False), np.load(FIXTURES / f"{name}_outputs.npz")
    with torch.no_grad():
        levels = list(plain.backbone(image).values())
        generator = plain.anchor_generator if name == RETINA else plain.rpn.anchor_generator
        anchors = generator(ImageList(image, [(256, 256)]), levels)[0]
    expected = torch.from_numpy(np.concatenate([ref[f"anchors_{i}"] for i in range(5)]))
    assert (anchors - expected).abs().max() > 0.1
    if name == RETINA:
        assert rel_err(levels[4], ref["fpn_4"]) > 1e-2  # ReLU before P7


def test_runner_checkpoint_loads_safely_and_equals_the_plain_state_dict():
    runner_file = FIXTURES / f"{RETINA}_runner_style_fp16.pth"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(runner_file, weights_only=True)  # numpy / mmengine globals: torch's safe loader refuses
    runner = read_mmdet_checkpoint(runner_file)
    plain = read_mmdet_checkpoint(FIXTURES / f"{RETINA}_state_dict_fp16.pth")
    assert (runner.kind, plain.kind) == ("runner", "state_dict") and runner.half_precision and plain.half_precision
    assert runner.state_dict.keys() == plain.state_dict.keys() and len(plain.state_dict) == 148
    for key, value in plain.state_dict.items():
        assert value.dtype == (torch.int64 if key.endswith("num_batches_tracked") else torch.float32), key
        assert torch.equal(runner.state_dict[key], value), key
    assert [c.casefold() for c in runner.classes] == [c.casefold() for c in DIOR_CLASSES]
    assert runner.meta["mmengine_version"] == "0.10.7" and plain.classes is None


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("attack", ["os.system", "eval", "getattr"])
def test_checkpoint_that_would_run_code_is_refused_and_nothing_runs(attack, tmp_path):
    marker = tmp_path / "pwned"
    payload = {"os.system": _Payload(os.system, f"touch {marker}"),
               "eval": _Payload(eval, f"open({str(marker)!r}, 'w')"),
               "getattr": _Payload(getattr, collections.OrderedDict, "fromkeys")}[attack]
    path = tmp_path / "evil.pth"
    buffer = io.BytesIO()
    torch.save({"meta": {}, "state_dict": {"backbone.conv1.weight": torch.zeros(1)}, "x": payload}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="not allowed to run"):
        read_mmdet_checkpoint(path)
    assert not marker.exists()


def test_training_leftovers_are_dropped_and_reported(tmp_path):
    state = torch.load(FIXTURES / f"{FRCNN}_state_dict_fp16.pth", weights_only=True)
    leftovers = {"teacher.backbone.conv1.weight": torch.zeros(64, 3, 7, 7, dtype=torch.float16),
                 "high_amplifier.bbox_head.fc_cls.weight": torch.zeros(21, 128), "distloss.conv.weight": torch.zeros(1)}
    torch.save(collections.OrderedDict({**state, **leftovers}), tmp_path / "ds2d2_student.pth")
    pipe = load_config(overrides=["teacher.fpn_width=64", "teacher.backbone=resnet18", "teacher.roi_fc_width=128"],
                       pipeline="dior_faster_rcnn").pipeline("dior_faster_rcnn")
    payload, report = import_checkpoint(tmp_path / "ds2d2_student.pth", pipe, role="teacher")
    assert sorted(report.dropped) == sorted(leftovers) and not report.unmapped and not report.missing
    assert not any(k.startswith(("teacher", "high_amplifier", "distloss")) for k in payload["state_dict"])
    assert payload["state_dict"]["roi_heads.box_predictor.cls_score.weight"].dtype == torch.float32


def test_unmapped_missing_and_misshapen_keys_are_listed(tmp_path):
    state = dict(torch.load(FIXTURES / f"{RETINA}_state_dict_fp16.pth", weights_only=True))
    state["neck.fpn_convs.9.conv.weight"] = torch.zeros(1)
    del state["bbox_head.retina_reg.bias"]
    state["bbox_head.cls_convs.0.conv.bias"] = torch.zeros(3, dtype=torch.float16)
    torch.save(state, tmp_path / "odd.pth")
    pipe = load_config(overrides=["student.fpn_width=64", "student.head_convs=2"],
                       pipeline="dior_retina").pipeline("dior_retina")
    with pytest.raises(UserError) as err:
        import_checkpoint(tmp_path / "odd.pth", pipe)
    message = str(err.value)
    assert "neck.fpn_convs.9.conv.weight" in message and "head.regression_head.bbox_reg.bias" in message
    assert "head.classification_head.conv.0.0.bias: checkpoint (3,) vs model (64,)" in message


def test_config_settings_the_conversion_cannot_reproduce_are_refused(tmp_path):
    state = torch.load(FIXTURES / f"{RETINA}_state_dict_fp16.pth", weights_only=True)
    torch.save({"meta": {"cfg": "model = dict(backbone=dict(style='caffe', type='ResNet'))"}, "state_dict": state},
               tmp_path / "caffe.pth")
    pipe = load_config(overrides=["student.fpn_width=64", "student.head_convs=2"],
                       pipeline="dior_retina").pipeline("dior_retina")
    with pytest.raises(UserError, match="caffe-style ResNet"):
        import_checkpoint(tmp_path / "caffe.pth", pipe)


def test_pipeline_model_must_match_the_checkpoint():
    pipe = load_config(pipeline="dior_retina").pipeline("dior_retina")
    with pytest.raises(UserError, match="--set student.fpn_width=64 --set student.head_convs=2"):
        import_checkpoint(FIXTURES / f"{RETINA}_state_dict_fp16.pth", pipe)
    demo = load_config(overrides=["teacher.fpn_width=64", "teacher.backbone=resnet18", "teacher.roi_fc_width=128"],
                       pipeline="demo_faster_rcnn").pipeline("demo_faster_rcnn")
    with pytest.raises(UserError, match="predicts 20 classes, the pipeline's dataset has 5"):
        import_checkpoint(FIXTURES / f"{FRCNN}_state_dict_fp16.pth", demo, role="teacher")


def test_cli_writes_a_safe_loadable_checkpoint_and_report(tmp_path):
    out = tmp_path / "teacher.pt"
    main([str(FIXTURES / f"{FRCNN}_state_dict_fp16.pth"), "--pipeline", "dior_faster_rcnn", "--role", "teacher",
          "--out", str(out), "--set", "teacher.fpn_width=64", "--set", "teacher.backbone=resnet18", "--set", "teacher.roi_fc_width=128"])
    payload = load_checkpoint(out)  # weights_only=True
    assert payload["role"] == "teacher" and payload["finished"] and payload["num_classes"] == 20
    assert payload["classes"] == list(DIOR_CLASSES)  # the pipeline's spellings, so --teacher accepts it
    assert {"mmdet_compat": True, "roi_fc_width": 128, "fpn_width": 64}.items() <= payload["model_spec"].items()
    assert (tmp_path / "teacher.import.json").is_file()


@pytest.mark.xfail(not SPEC_FIELDS_READY, strict=True,
                   reason="runtime.config.ModelSpec needs `mmdet_compat` and `roi_fc_width` (lead's hook)")
def test_imported_checkpoint_rebuilds_and_reproduces_mmdetection(tmp_path, image):
    out = tmp_path / "student.pt"
    main([str(FIXTURES / f"{RETINA}_runner_style_fp16.pth"), "--pipeline", "dior_retina", "--out", str(out),
          "--set", "student.fpn_width=64", "--set", "student.head_convs=2", "--set", "input_size=256"])
    model, _ = load_detector(out)
    model.transform.image_mean, model.transform.image_std = [0.0] * 3, [1.0] * 3
    with torch.no_grad():
        (det,) = model([image[0]])
    assert_same_detections(det, np.load(FIXTURES / f"{RETINA}_outputs.npz"))
