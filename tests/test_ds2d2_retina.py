"""DS2D2 on RetinaNet through the trainer's task interface: KD terms, gradient routing, widths, stage-2 detector."""
import copy
from dataclasses import dataclass

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from distill.ds2d2.implicit_retina import ImplicitStream
from distill.models import build_detector
from distill.models.retinanet import features_and_head
from distill.tasks import AmplifierTask, DistillTask, build_task, default_distill, make_adapter

SIZE = 64


@dataclass
class Spec:
    """Stand-in for runtime.config.ModelSpec."""

    arch: str = "retinanet"
    backbone: str = "resnet18"
    fpn_width: int = 32
    head_convs: int = 1
    pretrained_backbone: bool = False
    norm: str = "frozen_bn"  # no batch statistics: a train-mode copy computes exactly what the eval-mode teacher does


def batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=gen)
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 20.0, 30.0], [30.0, 30.0, 62.0, 50.0]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def detector(width=32, seed=0, norm="frozen_bn"):
    torch.manual_seed(seed)
    model = build_detector(Spec(fpn_width=width, norm=norm), num_classes=2, input_size=SIZE)
    # Heads start with std 0.01 weights (near-constant outputs); spread them so KD terms see real differences.
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def teacher_and_amplifier():
    teacher = detector(seed=1)
    amplifier = AmplifierTask(teacher).model
    with torch.no_grad():  # a stage-2 head that has moved away from the teacher's
        for p in amplifier.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return teacher, amplifier


KD_TERMS = {
    "ds2d2": {"kd_explicit_low", "kd_explicit_high", "kd_implicit_full_cls", "kd_implicit_full_box",
              "kd_implicit_high_cls", "kd_implicit_high_box"},
    "fitnet": {"kd_fitnet"},
    "pkd": {"kd_pkd"},
    "fgd": {"kd_fgd_fg", "kd_fgd_bg", "kd_fgd_attention", "kd_fgd_global"},
}


def task_for(method, student, teacher, amplifier, identity=False):
    adapter = make_adapter(method, student, teacher)
    if identity and adapter is not None:
        adapter.init_identity()
    return DistillTask(student, teacher, amplifier.head, method, adapter=adapter).train()


@pytest.mark.parametrize("method", ["ds2d2", "fitnet", "pkd", "fgd"])
def test_kd_terms_vanish_for_identical_student_and_are_positive_otherwise(method, teacher_and_amplifier):
    teacher, amplifier = teacher_and_amplifier
    images, targets = batch()
    same = task_for(method, copy.deepcopy(teacher).requires_grad_(True), teacher, amplifier, identity=True)
    losses = same(images, targets)
    assert KD_TERMS[method] <= set(losses) and {"classification", "bbox_regression"} <= set(losses)
    for name in KD_TERMS[method]:
        assert abs(losses[name].item()) < 1e-6, name
    other = task_for(method, detector(seed=2), teacher, amplifier, identity=True)
    for name, value in other(images, targets).items():
        assert value.item() > 0, name


@pytest.mark.parametrize("student_width", [32, 16])
def test_gradients_reach_student_and_adapter_never_teacher_or_amplifier(student_width, teacher_and_amplifier):
    teacher, amplifier = teacher_and_amplifier
    student = detector(width=student_width, seed=3, norm="bn")
    task = build_task("student", model=student, teacher=teacher, amplifier=amplifier, method="ds2d2")
    task.train()
    losses = task(*batch())
    kd = sum(v for k, v in losses.items() if k.startswith("kd_implicit"))
    kd.backward()  # the implicit stream alone must reach the student's features through the frozen heads
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    task.zero_grad(set_to_none=True)
    sum(task(*batch()).values()).backward()
    assert all(p.grad is not None for p in task.trainable_parameters())
    assert all(p.grad is not None for p in task.adapter.parameters())
    assert all(p.grad is None and not p.requires_grad for p in [*teacher.parameters(), *amplifier.parameters()])
    assert not teacher.training and not amplifier.head.training  # train() left the frozen parts in eval mode
    assert {id(p) for p in task.trainable_parameters()} == {
        id(p) for p in [*student.parameters(), *task.adapter.parameters()]}


@pytest.mark.parametrize("method", ["ds2d2", "fitnet", "pkd", "fgd"])
@pytest.mark.parametrize("mode", ["shared", "per_level"])
def test_mismatched_widths_train(method, mode, teacher_and_amplifier):
    teacher, amplifier = teacher_and_amplifier
    wide_teacher = detector(width=64, seed=4)
    wide_amplifier = AmplifierTask(wide_teacher).model
    student = detector(width=32, seed=5, norm="bn")
    task = build_task("student", model=student, teacher=wide_teacher, amplifier=wide_amplifier, method=method,
                      adapter=mode)
    assert task.adapter.convs[0].weight.shape[:2] == (64, 32)
    assert len(task.adapter.convs) == (1 if mode == "shared" else len(task.levels))  # PKD: levels 0-3 only
    losses = task.train()(*batch())
    assert KD_TERMS[method] <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert student.head.classification_head.cls_logits.weight.grad is not None
    assert all(p.grad is None for p in wide_teacher.parameters())
    assert all(p.grad is not None for p in task.adapter.parameters())  # no unused adapter conv (DDP would hang)


def test_student_checkpoint_holds_the_student_only(teacher_and_amplifier):
    teacher, amplifier = teacher_and_amplifier
    student = detector(seed=6)
    task = build_task("student", model=student, teacher=teacher, amplifier=amplifier, method="ds2d2")
    assert task.model is student
    assert task.model.state_dict().keys() == detector(seed=6).state_dict().keys()
    assert set(task.checkpoint_modules()) == {"model", "adapter"}
    assert type(build_task("student", model=student, method="none")).__name__ == "DetectorTask"


def test_amplifier_stage_trains_only_a_head_copy_on_high_frequencies():
    teacher = detector(seed=7, norm="bn")
    task = build_task("amplifier", teacher=teacher).train()
    head_params = {id(p) for p in task.model.head.parameters()}
    assert {id(p) for p in task.trainable_parameters()} == head_params
    assert not (head_params & {id(p) for p in teacher.head.parameters()})  # a copy, initialised from the teacher
    torch.testing.assert_close(task.model.head.state_dict(), teacher.head.state_dict())
    assert not any(m.training for m in teacher.backbone.modules())  # BN statistics of the teacher never move
    losses = task(*batch())
    assert set(losses) == {"classification", "bbox_regression"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.backbone.parameters())
    assert all(p.grad is not None for p in task.model.head.parameters())
    # the head sees hf(F): the stage-2 model's raw outputs differ from the teacher's on the same image
    (det,) = task.model.eval()([batch()[0][0]])
    assert set(det) == {"boxes", "scores", "labels"}
    with torch.no_grad():
        image = batch()[0][:1]
        hf_feats, _ = features_and_head(task.model, image)
        feats, _ = features_and_head(teacher.eval(), image)
    assert all(not torch.allclose(a, b) for a, b in zip(hf_feats, feats))
    # round trip: a fresh teacher-shaped amplifier loads the stage-2 checkpoint
    fresh = AmplifierTask(detector(seed=8, norm="bn")).model
    fresh.load_state_dict(task.model.state_dict())
    torch.testing.assert_close(fresh.head.state_dict(), task.model.head.state_dict())


def test_ds2d2_step_under_autocast(teacher_and_amplifier):
    teacher, amplifier = teacher_and_amplifier
    student = detector(seed=9, norm="bn")
    task = build_task("student", model=student, teacher=teacher, amplifier=amplifier, method="ds2d2").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = task(*batch())
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert student.backbone.body.conv1.weight.grad is not None


def test_amplifier_head_can_start_fresh_instead_of_from_the_teacher():
    teacher = detector(seed=10)
    fresh = build_task("amplifier", teacher=teacher, init_from_teacher=False).model
    assert fresh.head.state_dict().keys() == teacher.head.state_dict().keys()
    assert not torch.equal(fresh.head.classification_head.cls_logits.weight,
                           teacher.head.classification_head.cls_logits.weight)


def test_ignored_anchors_carry_no_cls_kd_and_box_kd_does_not_need_labels(teacher_and_amplifier):
    teacher, amplifier = teacher_and_amplifier
    stream = ImplicitStream(teacher, amplifier.head, default_distill())
    torch.manual_seed(0)
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # P3..P7 of a 64 px image
    student = [torch.randn(1, 32, h, w) for h, w in shapes]
    teacher_feats = [torch.randn(1, 32, h, w) for h, w in shapes]
    anchors = teacher.anchor_generator(ImageList(torch.zeros(1, 3, SIZE, SIZE), [(SIZE, SIZE)]), student)
    ignored = stream(student, teacher_feats, (anchors, [torch.full((len(anchors[0]),), -2)]))
    negatives = stream(student, teacher_feats, (anchors, [torch.full((len(anchors[0]),), -1)]))
    assert ignored["kd_implicit_full_cls"] == 0 and ignored["kd_implicit_high_cls"] == 0
    assert negatives["kd_implicit_full_cls"] > 0 and negatives["kd_implicit_high_cls"] > 0
    assert ignored["kd_implicit_full_box"] > 0
    torch.testing.assert_close(ignored["kd_implicit_full_box"], negatives["kd_implicit_full_box"])
