"""DS2D2 on Faster R-CNN: the model, the two-stage implicit stream, the stage-2 RoI amplifier, and all stages on CPU."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from conftest import tiny_config
from distill.checkpoint import build_from_meta, file_sha256, load_checkpoint, load_detector
from distill.ds2d2.haar import high_frequency
from distill.models import build_detector
from distill.models.faster_rcnn import rcnn_train_step
from distill.models.mmdet_variant import AlignedMultiScaleRoIAlign, UnroundedAnchorGenerator
from distill.tasks import AmplifierTask, DistillTask, build_task, make_adapter

SIZE = 64


@dataclass
class Spec:
    """Stand-in for runtime.config.ModelSpec."""

    arch: str = "faster_rcnn"
    backbone: str = "resnet18"
    fpn_width: int = 32
    head_convs: int = 1
    pretrained_backbone: bool = False
    norm: str = "frozen_bn"  # no batch statistics: a train-mode copy computes exactly what the eval-mode teacher does
    roi_fc_width: int | None = 64  # None: the 1024 default (what a ModelSpec without the field gets)
    mmdet_compat: bool = False


def batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=gen)
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 20.0, 30.0], [30.0, 30.0, 62.0, 50.0]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([0])},
    ]
    return images, targets


def detector(width=32, seed=0, norm="frozen_bn", fc=64):
    torch.manual_seed(seed)
    model = build_detector(Spec(fpn_width=width, norm=norm, roi_fc_width=fc), num_classes=2, input_size=SIZE)
    with torch.no_grad():  # spread the 0.01-std predictor init so KD terms see real differences
        for p in model.roi_heads.box_predictor.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def teacher_and_amplifier():
    teacher = detector(seed=1)
    amplifier = AmplifierTask(teacher).model
    with torch.no_grad():  # a stage-2 head that has moved away from the teacher's
        for p in amplifier.roi_heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return teacher, amplifier


# -- the model -------------------------------------------------------------------------------------------------------
def test_reference_layout_p2_to_p6_anchors_and_roi_head():
    model = build_detector(Spec(), num_classes=3, input_size=128).eval()
    feats = model.backbone(torch.rand(1, 3, 128, 128))
    assert list(feats) == ["0", "1", "2", "3", "pool"] and [f.shape[-1] for f in feats.values()] == [32, 16, 8, 4, 2]
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))  # 8 x stride 4..64
    pool = model.roi_heads.box_roi_pool
    assert pool.featmap_names == ["0", "1", "2", "3"] and pool.sampling_ratio == 0 and pool.output_size == (7, 7)
    assert model.roi_heads.box_head.fc6.out_features == 64  # Spec.roi_fc_width
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert build_detector(Spec(roi_fc_width=None), 3, 128).roi_heads.box_head.fc6.out_features == 1024


def test_mmdet_compat_swaps_conventions():
    plain, compat = build_detector(Spec(), 2, 64), build_detector(Spec(mmdet_compat=True), 2, 64)
    assert isinstance(compat.rpn.anchor_generator, UnroundedAnchorGenerator)
    assert isinstance(compat.roi_heads.box_roi_pool, AlignedMultiScaleRoIAlign)
    assert type(plain.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    assert plain.state_dict().keys() == compat.state_dict().keys()


def test_labels_are_zero_based_in_and_out():
    """Class 0 must train as a real class (not background), and detections come back as 0..C-1."""
    model = detector(seed=0)
    images, targets = batch()
    class_zero = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    images_t, targets_t = model.transform(list(images), class_zero)
    losses, feats, (proposals, sizes, names) = rcnn_train_step(model, images_t, targets_t)
    assert losses["loss_box_reg"] > 0  # positives exist: label 0 was not taken for background
    assert names == ["0", "1", "2", "3", "pool"] and len(feats) == 5
    # the sampled RoIs include the ground truth (torchvision adds it, like the reference's add_gt_as_proposals)
    assert any(torch.isclose(proposals[1], targets_t[1]["boxes"][0]).all(dim=1))
    (det,) = build_detector(Spec(), 2, SIZE, score_thresh=0.0).eval()([images[0]])
    assert len(det["labels"]) and set(det["labels"].tolist()) <= {0, 1}


# -- implicit stream -------------------------------------------------------------------------------------------------
KD_TERMS = {
    "ds2d2": {"kd_explicit_low", "kd_explicit_high", "kd_implicit_full_cls", "kd_implicit_full_box",
              "kd_implicit_high_cls", "kd_implicit_high_box"},
    "fitnet": {"kd_fitnet"},
    "pkd": {"kd_pkd"},
    "fgd": {"kd_fgd_fg", "kd_fgd_bg", "kd_fgd_attention", "kd_fgd_global"},
}


def task_for(method, student, teacher, amplifier):
    adapter = make_adapter(method, student, teacher)
    if adapter is not None:
        adapter.init_identity()
    return DistillTask(student, teacher, amplifier.roi_heads, method, adapter=adapter).train()


@pytest.mark.parametrize("method", ["ds2d2", "fitnet", "pkd", "fgd"])
def test_kd_terms_vanish_for_identical_student_and_are_positive_otherwise(method, teacher_and_amplifier):
    teacher, amplifier = teacher_and_amplifier
    images, targets = batch()
    same = task_for(method, copy.deepcopy(teacher).requires_grad_(True), teacher, amplifier)
    losses = same(images, targets)
    assert KD_TERMS[method] <= set(losses) and {"loss_classifier", "loss_box_reg", "loss_objectness"} <= set(losses)
    for name in KD_TERMS[method]:
        assert abs(losses[name].item()) < 1e-4, name  # the KL sums float32 rounding over ~1000 RoIs
    other = task_for(method, detector(seed=2), teacher, amplifier)
    for name in KD_TERMS[method]:
        assert other(images, targets)[name].item() > 1e-6, name


@pytest.mark.parametrize("student_width", [32, 16])
def test_gradients_reach_student_and_adapter_never_teacher_or_amplifier(student_width, teacher_and_amplifier):
    teacher, amplifier = teacher_and_amplifier
    student = detector(width=student_width, seed=3, norm="bn")
    task = build_task("student", model=student, teacher=teacher, amplifier=amplifier, method="ds2d2").train()
    losses = task(*batch())
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(v for k, v in losses.items() if k.startswith("kd_implicit")).backward()
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0  # through the frozen RoI heads
    task.zero_grad(set_to_none=True)
    sum(task(*batch()).values()).backward()
    assert all(p.grad is not None for p in [*task.adapter.parameters(), *student.backbone.fpn.parameters()])
    # stage 3 uses the amplifier's RoI heads only (its RPN is not part of the task and gets no gradient either)
    assert all(p.grad is None and not p.requires_grad for p in [*teacher.parameters(),
                                                                *amplifier.roi_heads.parameters()])
    assert all(p.grad is None for p in amplifier.parameters())
    assert not teacher.training and not amplifier.roi_heads.training
    assert {id(p) for p in task.trainable_parameters()} == {
        id(p) for p in [*student.parameters(), *task.adapter.parameters()]}


# -- stage 2 ---------------------------------------------------------------------------------------------------------
def test_amplifier_trains_an_rpn_and_a_roi_head_on_high_frequency_features():
    """As the reference's DS2D2_FasterRCNN_Amplifier: backbone + FPN frozen, RPN and RoI head trained on hf(F)."""
    teacher = detector(seed=4)
    task = AmplifierTask(teacher).train()
    assert not teacher.backbone.training and not task.model.backbone.frozen.training
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"rpn", "roi_heads"}
    assert any(n.startswith("rpn.head.") for n in trainable)
    losses = task(*batch())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher's own RPN and heads are untouched copies
    assert all(p.grad is not None for p in task.model.rpn.head.parameters())
    # both heads see hf(F): the stage-2 backbone's maps are the teacher's maps through high_frequency
    images = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        feats, hf_feats = teacher.backbone(images), task.model.backbone(images)
    assert list(hf_feats) == list(feats)
    for name in feats:
        torch.testing.assert_close(hf_feats[name], high_frequency(feats[name]))
    # starts as the teacher's RPN and RoI head (the reference loads teacher.pth) unless asked for fresh ones
    assert torch.equal(task.model.roi_heads.box_head.fc6.weight.detach(), teacher.roi_heads.box_head.fc6.weight)
    assert torch.equal(task.model.rpn.head.cls_logits.weight.detach(), teacher.rpn.head.cls_logits.weight)
    fresh = build_task("amplifier", teacher=detector(seed=4), init_from_teacher=False).model
    assert not torch.equal(fresh.roi_heads.box_head.fc6.weight, teacher.roi_heads.box_head.fc6.weight)
    assert not torch.equal(fresh.rpn.head.cls_logits.weight, teacher.rpn.head.cls_logits.weight)


def test_amplifier_checkpoint_rebuilds_from_metadata():
    amplifier = AmplifierTask(detector(seed=5, fc=None)).model
    spec = {k: v for k, v in Spec().__dict__.items() if k not in ("roi_fc_width", "mmdet_compat")}
    rebuilt = build_from_meta({"role": "amplifier", "model_spec": spec, "num_classes": 2, "input_size": SIZE})
    result = rebuilt.load_state_dict(amplifier.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    images = list(batch()[0])
    amplifier.eval(), rebuilt.eval()
    with torch.no_grad():
        ours, theirs = amplifier(images), rebuilt(images)
    torch.testing.assert_close(ours[0]["scores"], theirs[0]["scores"])


# -- all stages on CPU -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rcnn_chain(tmp_path_factory):
    """The demo_faster_rcnn path on the tiny config: teacher -> amplifier -> DS2D2 student, from one command."""
    from distill.run import main

    tmp_path = tmp_path_factory.mktemp("rcnn_chain")
    config = tiny_config(tmp_path, arch="faster_rcnn")
    assert main(["tiny", "--config", str(config), "--device", "cpu"]) == 0
    return config, tmp_path / "runs" / "tiny"


@pytest.mark.slow
def test_all_stages_run_on_cpu(rcnn_chain):
    _, runs = rcnn_chain
    summary = json.loads((runs / "summary.json").read_text())
    stages = [(e["stage"], e.get("method")) for e in summary["entries"]]
    assert stages[:3] == [("teacher", None), ("amplifier", None), ("student", "ds2d2")]
    student, meta = load_detector(runs / "student-ds2d2" / "model.pt")
    fresh = build_detector(Spec(fpn_width=16, norm="bn", roi_fc_width=None), 3, 64)
    assert student.state_dict().keys() == fresh.state_dict().keys()  # no teacher / amplifier / adapter weights
    amplifier = load_checkpoint(runs / "amplifier" / "model.pt")
    assert meta["method"] == "ds2d2" and amplifier["role"] == "amplifier"
    assert any(k.startswith("rpn.head.") for k in amplifier["state_dict"])  # stage 2 trained its own RPN
    with torch.no_grad():
        assert len(student(list(torch.rand(2, 3, 64, 64)))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "fitnet", "pkd", "fgd"])
def test_every_baseline_trains_against_the_same_teacher(rcnn_chain, method):
    from distill.run import main

    config, runs = rcnn_chain
    assert main(["tiny", "--config", str(config), "--device", "cpu", "--stage", "student", "--method", method]) == 0
    summary = json.loads((runs / "summary.json").read_text())
    assert ("student", method) in {(e["stage"], e.get("method")) for e in summary["entries"]}
    ckpt = load_checkpoint(runs / f"student-{method}" / "model.pt")
    assert ckpt["inputs"] == ({} if method == "none" else {"teacher": file_sha256(runs / "teacher" / "model.pt")})
