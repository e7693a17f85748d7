"""Detectors built from a ModelSpec: reference layout (P3-P7 from C5, anchors, head convs), sizes, offline weights;
the edge students (MobileNetV3-Large FPN, separable head) through DS2D2, export and INT8."""
import urllib.error
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetRegressionHead
from torchvision.ops.misc import FrozenBatchNorm2d

from distill.models import build_detector, count_parameters, gflops
from distill.models.backbones import STAGE_CHANNELS, c5_channels, mobilenet_stage_starts
from distill.models.heads import head_type
from distill.models.retinanet import features_and_head
from runtime.errors import UserError


@dataclass
class Spec:
    """Stand-in for runtime.config.ModelSpec (same field names)."""

    arch: str = "retinanet"
    backbone: str = "resnet18"
    fpn_width: int = 32
    head_convs: int = 2
    pretrained_backbone: bool = False
    norm: str = "bn"
    head: str = "conv"


EDGE = Spec(backbone="mobilenet_v3_large", fpn_width=16, head_convs=2, head="separable")


def test_pyramid_levels_strides_and_head_outputs():
    model = build_detector(Spec(), num_classes=2, input_size=128).eval()
    feats, out = features_and_head(model, torch.rand(2, 3, 128, 128))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2, 1]  # strides 8..128
    assert all(f.shape[:2] == (2, 32) for f in feats)
    anchors = sum(f.shape[-1] * f.shape[-2] for f in feats) * 9
    assert out["cls_logits"].shape == (2, anchors, 2) and out["bbox_regression"].shape == (2, anchors, 4)


def test_extra_levels_come_from_c5_even_when_widths_match():
    model = build_detector(Spec(fpn_width=512, head_convs=0), num_classes=1, input_size=64)
    extra = model.backbone.fpn.extra_blocks
    assert extra.p6.in_channels == 512 and not extra.use_P5


@pytest.mark.parametrize("convs", [0, 2, 4])
def test_head_has_configured_conv_relu_stack_without_norm(convs):
    head = build_detector(Spec(head_convs=convs), num_classes=3, input_size=64).head
    for subnet in (head.classification_head, head.regression_head):
        assert sum(isinstance(m, torch.nn.Conv2d) for m in subnet.conv.modules()) == convs
        assert sum(isinstance(m, torch.nn.ReLU) for m in subnet.conv.modules()) == convs
        assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in subnet.conv.modules())


def test_anchors_follow_reference_sizes():
    model = build_detector(Spec(), num_classes=2, input_size=128)
    sizes = model.anchor_generator.sizes
    assert len(sizes) == 5
    for stride, level in zip((8, 16, 32, 64, 128), sizes):
        assert level == pytest.approx([4 * stride, 4 * stride * 2 ** (1 / 3), 4 * stride * 2 ** (2 / 3)])
    assert model.anchor_generator.aspect_ratios[0] == (0.5, 1.0, 2.0)


def test_eval_returns_torchvision_detections_with_test_thresholds():
    model = build_detector(Spec(), 2, 64, score_thresh=0.0, detections_per_img=7, topk_candidates=50).eval()
    (det,) = model([torch.rand(3, 64, 64)])
    assert set(det) == {"boxes", "scores", "labels"} and len(det["boxes"]) == 7
    assert model.transform.min_size == (64,) and model.transform.max_size == 64


def test_norm_option_and_frozen_stages():
    frozen = build_detector(Spec(norm="frozen_bn"), 2, 64)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.backbone.modules())
    assert all(p.requires_grad for p in frozen.parameters())  # from scratch: everything trains


def test_sizes_grow_with_backbone_and_input():
    small, big = build_detector(Spec(), 2, 64), build_detector(Spec(backbone="resnet34"), 2, 64)
    assert count_parameters(big) > count_parameters(small) > 11_000_000
    assert 3.5 < gflops(small, 128) / gflops(small, 64) < 4.5
    assert small.training  # gflops restores the mode


def test_offline_pretrained_backbone_is_a_user_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="pretrained_backbone: false"):
        build_detector(Spec(pretrained_backbone=True), 2, 64)


def test_bad_specs_are_user_errors():
    with pytest.raises(UserError, match="backbone"):
        build_detector(Spec(backbone="vgg16"), 2, 64)
    with pytest.raises(UserError, match="arch"):
        build_detector(Spec(arch="yolo"), 2, 64)
    with pytest.raises(UserError, match="multiple of 32"):
        build_detector(Spec(), 2, 100)


# -- edge students ------------------------------------------------------------------------------------------------


def test_mobilenet_fpn_takes_the_deepest_map_of_each_stride():
    model = build_detector(EDGE, num_classes=2, input_size=128).eval()
    body = model.backbone.body
    x = torch.rand(1, 3, 128, 128)
    taken = {}
    for index, block in body.named_children():
        x = block(x)
        taken[int(index)] = x.shape
    returned = sorted(int(i) for i in model.backbone.body.return_layers)
    assert [taken[i][-1] for i in returned] == [16, 8, 4]  # C3, C4, C5 at strides 8, 16, 32
    for i in returned[:-1]:  # the next block halves the map: nothing deeper exists at that stride
        assert taken[i + 1][-1] == taken[i][-1] // 2
    assert returned[-1] == len(list(body.children())) - 1  # C5 is MobileNetV3's final 960-channel conv
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == [40, 112, 960]
    assert model.backbone.fpn.extra_blocks.p6.in_channels == c5_channels("mobilenet_v3_large") == 960
    feats, out = features_and_head(model, torch.rand(2, 3, 128, 128))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2, 1] and all(f.shape[1] == 16 for f in feats)
    assert out["cls_logits"].shape == (2, sum(f.shape[-1] ** 2 for f in feats) * 9, 2)


def test_stage_channels_match_the_torchvision_networks():
    for name, channels in STAGE_CHANNELS.items():
        if name.startswith("mobilenet"):
            features = models.mobilenet_v3_large().features
            starts = mobilenet_stage_starts(features)
            assert starts == [0, 2, 4, 7, 13]
            ends = [s - 1 for s in starts[2:]] + [len(features) - 1]
            assert tuple(features[i].out_channels for i in ends) == channels


def _random_imagenet_state(monkeypatch):
    # Stand-in for the download: a state dict of the right architecture, so nothing leaves the machine.
    state = models.mobilenet_v3_large().state_dict()
    monkeypatch.setattr(models.MobileNet_V3_Large_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        lambda self, *a, **k: state)
    return state


def test_pretrained_mobilenet_loads_imagenet_weights_freezes_stem_and_c2(monkeypatch):
    state = _random_imagenet_state(monkeypatch)
    model = build_detector(replace(EDGE, pretrained_backbone=True, norm="frozen_bn"), 2, 64)
    body = model.backbone.body
    assert torch.equal(body["4"].block[0][0].weight, state["features.4.block.0.0.weight"])
    trainable = {int(i) for i, block in body.named_children() if any(p.requires_grad for p in block.parameters())}
    assert trainable == set(range(4, 17))  # stem + the stride-4 stage frozen, like frozen_stages=1 for ResNets
    norms = [m for m in body.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(m.eps == 1e-3 for m in norms)  # the eps the ImageNet weights were trained with


def test_offline_pretrained_mobilenet_is_a_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="pretrained_backbone: false") as err:
        build_detector(replace(EDGE, pretrained_backbone=True), 2, 64)
    assert "mobilenet_v3_large" in str(err.value) and ".pth" in str(err.value)


@pytest.mark.parametrize("head", ["conv", "separable"])
def test_head_outputs_keep_torchvision_layout(head):
    model = build_detector(replace(EDGE, head=head), num_classes=3, input_size=64).eval()
    feats = [torch.rand(2, 16, s, s) for s in (8, 4, 2, 1, 1)]
    cls, reg = model.head.classification_head, model.head.regression_head
    with torch.no_grad():  # torchvision's own 5-D permute, on the very same modules
        assert torch.equal(cls(feats), RetinaNetClassificationHead.forward(cls, feats))
        assert torch.equal(reg(feats), RetinaNetRegressionHead.forward(reg, feats))


def test_separable_head_is_depthwise_and_cheaper():
    sep = build_detector(replace(EDGE, fpn_width=64), 20, 256)
    full = build_detector(replace(EDGE, fpn_width=64, head="conv"), 20, 256)
    convs = [m for m in sep.head.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise = [m for m in convs if m.groups == m.in_channels == m.out_channels and m.kernel_size == (3, 3)]
    assert len(depthwise) == len(convs) // 2 == 2 * (2 + 1)  # two subnets x (2 tower convs + output), each dw + pw
    assert all(m.kernel_size == (1, 1) for m in convs if m not in depthwise)
    assert head_type(sep.head) == "separable" and head_type(full.head) == "conv"
    feats = [torch.rand(1, 64, s, s) for s in (32, 16, 8, 4, 2)]

    def head_flops(model):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.head(feats)
        return counter.get_total_flops()

    assert head_flops(sep) < 0.2 * head_flops(full) and gflops(sep, 256) < gflops(full, 256)
    # RetinaNet's prior on the classification output, so training starts at the focal loss's usual operating point
    assert torch.allclose(sep.head.classification_head.cls_logits[1].bias, torch.tensor(-4.59512), atol=1e-4)


def test_separable_head_is_a_retinanet_option():
    with pytest.raises(UserError, match="RetinaNet option"):
        build_detector(replace(EDGE, arch="faster_rcnn"), 2, 64)


def test_edge_student_distils_from_a_wider_teacher_through_the_adapter():
    from distill.tasks import build_amplifier, build_task

    torch.manual_seed(0)
    teacher = build_detector(Spec(fpn_width=32), 3, 64)
    student = build_detector(EDGE, 3, 64)
    amplifier = build_amplifier(teacher)
    task = build_task("student", model=student, teacher=teacher, amplifier=amplifier, method="ds2d2").train()
    assert task.adapter.convs[0].in_channels == 16 and task.adapter.convs[0].out_channels == 32
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    losses = task(images, targets)
    assert {"kd_implicit_full_cls", "kd_implicit_high_box"} <= set(losses)
    assert any(k.startswith("kd_explicit") for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert student.backbone.body["1"].block[0][0].weight.grad.abs().sum() > 0  # reaches the MobileNet stem
    assert task.adapter.convs[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_fresh_amplifier_of_a_separable_teacher_is_separable():
    from distill.ds2d2.implicit_retina import amplifier_model

    amp = amplifier_model(build_detector(EDGE, 3, 64), init_from_teacher=False)
    assert head_type(amp.head) == "separable" and len(amp.head.classification_head.conv) == 2


def test_edge_student_exports_matches_pytorch_and_quantizes(tmp_path: Path):
    from deploy.calibration import CalibrationSet, preprocess_spec
    from deploy.export import ExportOnnx, SimplifyOnnx, deploy_network
    from deploy.fidelity import check_fidelity, ort_session
    from deploy.gate import layer_groups
    from deploy.quantize import QuantizeOnnx, int8_weight_nodes
    from runtime.records import ImageRecord

    torch.manual_seed(0)
    model = build_detector(EDGE, 3, 64).eval()
    network = deploy_network(model, 64)
    fp32 = SimplifyOnnx(ExportOnnx(network, tmp_path / "edge.onnx", 64))()
    rng = np.random.default_rng(0)
    feeds = [{"images": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)} for _ in range(2)]
    assert check_fidelity(network.module, network.output_names, fp32, feeds, atol=1e-4, rtol=1e-3).passed
    records = []
    for i in range(3):
        path = tmp_path / f"calib{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (64, 64, 3), np.uint8))
        records.append(ImageRecord(path, 64, 64))
    calib = CalibrationSet(records, preprocess_spec(64), "train", str(tmp_path), "minmax", 0)
    result = QuantizeOnnx(fp32, tmp_path / "edge.int8.onnx", calib, "ort-u8s8")()
    import onnx

    q = onnx.load(str(result.path))
    int8 = int8_weight_nodes(q)
    assert any("/backbone/body/" in n for n in int8) and any("/head/" in n for n in int8)
    assert not any("cls_logits" in n or "bbox_reg" in n for n in int8)  # both halves of the outputs stay float
    groups = dict(layer_groups(q, 20))  # the accuracy gate's sensitivity pass sees MobileNet stages, not one blob
    assert {"stem", "layer1", "layer2", "layer3", "layer4", "fpn", "cls_tower"} <= set(groups) and "other" not in groups
    out = ort_session(result.path).run(None, feeds[0])
    assert out[0].shape == (1, sum(s * s for s in (8, 4, 2, 1, 1)) * 9, 3) and np.isfinite(out[0]).all()


def test_pipelines_yaml_edge_students_share_the_teacher_and_the_demo_recipe():
    from runtime.config import load_config

    cfg = load_config()
    paper, edge, slim = (cfg.pipeline(n) for n in ("dior_retina", "dior_retina_edge", "dior_retina_slim"))
    assert edge.teacher == slim.teacher == paper.teacher and edge.input_size == paper.input_size == 800
    assert edge.student.backbone == "mobilenet_v3_large" and edge.student.head == "separable"
    assert slim.student.backbone == "resnet18" and slim.student.fpn_width < paper.student.fpn_width
    assert edge.student.pretrained_backbone and edge.schedule == paper.schedule
    demo, demo_edge = cfg.pipeline("demo_retina"), cfg.pipeline("demo_retina_edge")
    assert demo_edge.teacher == demo.teacher and demo_edge.dataset == demo.dataset
    assert demo_edge.input_size == demo.input_size
    # Same teacher and amplifier schedules (one teacher serves both); the MobileNetV3 student only trains longer.
    assert demo_edge.schedule.teacher == demo.schedule.teacher and demo_edge.schedule.amplifier == demo.schedule.amplifier
    assert demo_edge.schedule.student.epochs > demo.schedule.student.epochs
    assert demo_edge.schedule.student.model_copy(update={"epochs": demo.schedule.student.epochs,
                                                         "milestones": demo.schedule.student.milestones}) \
        == demo.schedule.student
    assert demo_edge.student.backbone == "mobilenet_v3_large" and not demo_edge.student.pretrained_backbone
    assert demo_edge.student.norm == demo.student.norm  # inherited from the demo student (YAML merge key)
