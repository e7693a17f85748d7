"""RetinaNet built from a ModelSpec: reference layout (P3-P7 from C5, anchors, head convs), sizes, offline weights."""
import urllib.error
from dataclasses import dataclass

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from distill.models import build_detector, count_parameters, gflops
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
