"""Every DS2D2 loss term equals a hand computation from shared/DS2D2.md, and every weight reaches its term.

The expected values are computed here with numpy from the formulas (Haar by its 2x2 block definition, BCE, GIoU,
KL written out), never by calling the functions under test. The networks (teacher head, amplifier head) only supply
inputs: their outputs are read in the test and pushed through the hand formulas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList

from distill.ds2d2.explicit import ExplicitStream
from distill.ds2d2.haar import high_frequency
from distill.ds2d2.implicit_rcnn import ImplicitStream as RcnnImplicit
from distill.ds2d2.implicit_rcnn import rcnn_kd_terms
from distill.ds2d2.implicit_retina import ImplicitStream as RetinaImplicit
from distill.ds2d2.implicit_retina import retina_kd_terms
from distill.models import build_detector
from distill.tasks import AmplifierTask, build_task
from runtime.config import DistillConfig, DistillWeights
from test_disw import spec_disw


def hand_haar(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One orthonormal Haar level by its 2x2-block definition: LL and the three detail bands (signs do not matter
    for squared differences, nor does the order of the bands)."""
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    low = (a + b + c + d) / 2
    high = np.stack([(a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2], axis=2)
    return low, high


def weights(**kw) -> DistillWeights:
    return DistillWeights(**({"explicit_low": 1.0, "explicit_high": 1.0, "implicit_full": 1.0,
                              "implicit_high": 1.0} | kw))


# -- explicit stream --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["raw", "teacher_energy"])
def test_explicit_low_and_high_equal_the_hand_computation(norm):
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)]
    teacher = [torch.randn(2, 3, 8, 8, generator=gen) * 2, torch.randn(2, 3, 4, 4, generator=gen)]
    boxes = [torch.tensor([[3.0, 5.0, 20.0, 14.0], [40.0, 40.0, 44.0, 47.0]]), torch.tensor([[0.0, 0.0, 64.0, 30.0]])]
    terms = ExplicitStream(0.3, 0.7, norm)(student, teacher, boxes, (64, 64))
    low = high = 0.0
    for s, t in zip(student, teacher):
        ll_s, h_s = hand_haar(s.numpy().astype(np.float64))
        ll_t, h_t = hand_haar(t.numpy().astype(np.float64))
        w = spec_disw(boxes, ll_s.shape[-2:], (64, 64)).numpy().astype(np.float64)  # (B,1,h,w)
        level_low = np.mean(w * (ll_s - ll_t) ** 2)
        level_high = np.mean(w[:, :, None] * (h_s - h_t) ** 2)
        if norm == "teacher_energy":
            level_low, level_high = level_low / np.mean(ll_t**2), level_high / np.mean(h_t**2)
        low, high = low + level_low, high + level_high
    assert terms["kd_explicit_low"].item() == pytest.approx(0.3 * low, rel=1e-5)
    assert terms["kd_explicit_high"].item() == pytest.approx(0.7 * high, rel=1e-5)


def test_teacher_energy_normalisation_removes_the_feature_scale():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 24.0]])]
    raw, norm = ExplicitStream(1.0, 1.0, "raw"), ExplicitStream(1.0, 1.0, "teacher_energy")
    for name in ("kd_explicit_low", "kd_explicit_high"):
        small = raw([s], [t], boxes, (32, 32))[name]
        assert raw([100 * s], [100 * t], boxes, (32, 32))[name] == pytest.approx(1e4 * small)
        assert norm([100 * s], [100 * t], boxes, (32, 32))[name] == pytest.approx(norm([s], [t], boxes, (32, 32))[name])


# -- RetinaNet implicit stream -----------------------------------------------------------------------------------------
def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def hand_decode(deltas: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """RetinaNet's (1,1,1,1) delta coder: centre shift in anchor sizes, log-scale size change."""
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + w / 2, anchors[:, 1] + h / 2
    pcx, pcy = cx + deltas[:, 0] * w, cy + deltas[:, 1] * h
    pw, ph = w * np.exp(deltas[:, 2]), h * np.exp(deltas[:, 3])
    return np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], axis=1)


def hand_giou_loss(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - GIoU of box pairs: IoU minus the share of the enclosing box that neither covers."""
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = area(a) + area(b) - inter
    hull = (np.maximum(a[:, 2], b[:, 2]) - np.minimum(a[:, 0], b[:, 0])) * \
        (np.maximum(a[:, 3], b[:, 3]) - np.minimum(a[:, 1], b[:, 1]))
    return 1 - (inter / union - (hull - union) / hull)


def hand_retina_terms(s_logit, t_logit, s_delta, t_delta, anchors, label_weight):
    """cls: sum of BCE(s, sigmoid t) |sigmoid s - sigmoid t| over classes x label weight; box: GIoU loss of the decoded
    boxes x sigmoid(max_c t). Both summed over anchors (the stream divides by the positives)."""
    p = sigmoid(t_logit)
    q = sigmoid(s_logit)
    bce = -(p * np.log(q) + (1 - p) * np.log(1 - q))
    cls = np.sum(np.sum(bce * np.abs(q - p), axis=1) * label_weight)
    box = np.sum(hand_giou_loss(hand_decode(s_delta, anchors), hand_decode(t_delta, anchors))
                 * sigmoid(t_logit.max(axis=1)))
    return cls, box


def test_retina_terms_equal_the_hand_computation():
    s_logit = np.array([[0.5, -1.0], [2.0, 0.1], [-0.3, -2.0]])
    t_logit = np.array([[1.5, -0.5], [-1.0, 0.3], [0.2, -3.0]])
    s_delta = np.array([[0.1, -0.2, 0.05, 0.3], [0.0, 0.0, 0.0, 0.0], [-0.4, 0.2, -0.1, 0.1]])
    t_delta = np.array([[0.0, 0.1, -0.2, 0.1], [0.3, -0.1, 0.2, 0.0], [-0.4, 0.2, -0.1, 0.1]])
    anchors = np.array([[0.0, 0.0, 16.0, 16.0], [8.0, 4.0, 40.0, 20.0], [30.0, 30.0, 50.0, 70.0]])
    label_weight = np.array([1.0, 0.0, 1.0])  # the second anchor is ignored by the assigner
    t = lambda a: torch.tensor(a, dtype=torch.float32)[None]  # noqa: E731  (B = 1)
    cls, box = retina_kd_terms({"cls_logits": t(s_logit), "bbox_regression": t(s_delta)},
                               {"cls_logits": t(t_logit), "bbox_regression": t(t_delta)},
                               t(anchors)[0], t(label_weight)[0], BoxCoder((1.0, 1.0, 1.0, 1.0)))
    exp_cls, exp_box = hand_retina_terms(s_logit, t_logit, s_delta, t_delta, anchors, label_weight)
    assert cls.item() == pytest.approx(exp_cls, rel=1e-5)
    assert box.item() == pytest.approx(exp_box, rel=1e-5)


@dataclass
class Spec:
    arch: str
    backbone: str = "resnet18"
    fpn_width: int = 16
    head_convs: int = 1
    pretrained_backbone: bool = False
    norm: str = "frozen_bn"
    roi_fc_width: int = 32
    mmdet_compat: bool = False


def spread(module: torch.nn.Module, std: float, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


def test_retina_stream_divides_by_the_positives_and_weights_each_term():
    torch.manual_seed(0)
    teacher = build_detector(Spec("retinanet"), num_classes=2, input_size=64).eval()
    spread(teacher.head, 0.05, 1)
    amplifier = spread(AmplifierTask(teacher).model.head, 0.05, 2)
    cfg = DistillConfig(weights=weights(implicit_full=0.5, implicit_high=2.0, implicit_high_box=3.0))
    stream = RetinaImplicit(teacher, amplifier, cfg)
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    gen = torch.Generator().manual_seed(3)
    student = [torch.randn(1, 16, h, w, generator=gen) for h, w in shapes]
    teacher_feats = [torch.randn(1, 16, h, w, generator=gen) for h, w in shapes]
    anchors = teacher.anchor_generator(ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), student)
    matched = torch.full((len(anchors[0]),), -1)
    matched[:3], matched[3:10] = 0, -2  # 3 positives, 7 ignored
    terms = stream(student, teacher_feats, (anchors, [matched]))
    label_weight = (matched != -2).double().numpy()
    for name, head, prep, (w_cls, w_box) in (("full", teacher.head, lambda f: f, (0.5, 0.5)),
                                               ("high", amplifier, high_frequency, (2.0, 3.0))):
        with torch.no_grad():
            s_out, t_out = head([prep(f) for f in student]), head([prep(f) for f in teacher_feats])
        np_ = lambda out, key: out[key][0].double().numpy()  # noqa: E731
        cls, box = hand_retina_terms(np_(s_out, "cls_logits"), np_(t_out, "cls_logits"),
                                     np_(s_out, "bbox_regression"), np_(t_out, "bbox_regression"),
                                     anchors[0].double().numpy(), label_weight)
        assert terms[f"kd_implicit_{name}_cls"].item() == pytest.approx(w_cls * cls / 3, rel=1e-4)
        assert terms[f"kd_implicit_{name}_box"].item() == pytest.approx(w_box * box / 3, rel=1e-4)


# -- Faster R-CNN implicit stream --------------------------------------------------------------------------------------
def hand_rcnn_terms(s_cls, s_box, t_cls, t_box, temperature=3.0):
    """cls: 0.5 T^2 KL(softmax(t/T) || softmax(s/T)) summed over classes and RoIs; box: L1 of the deltas of the
    foreground class the teacher rates highest, weighted by its probability, over 4 x the sum of the weights."""
    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    p, q = softmax(t_cls / temperature), softmax(s_cls / temperature)
    cls = 0.5 * temperature**2 * np.sum(p * (np.log(p) - np.log(q)))
    probs = softmax(t_cls)
    total = norm = 0.0
    for k in range(len(t_cls)):
        c = 1 + int(np.argmax(probs[k, 1:]))  # index 0 is the background
        w = probs[k, c]
        total += w * np.abs(s_box[k, 4 * c:4 * c + 4] - t_box[k, 4 * c:4 * c + 4]).sum()
        norm += w
    return cls, total / (4 * norm)


def test_rcnn_terms_sum_the_kl_over_rois_and_normalise_the_box_by_4x_the_weights():
    s_cls = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [0.3, 0.2, 0.1]])
    t_cls = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.5], [-1.0, 1.0, 1.5]])
    gen = np.random.default_rng(0)
    s_box, t_box = gen.normal(size=(3, 12)), gen.normal(size=(3, 12))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    cls, box = rcnn_kd_terms(t(s_cls), t(s_box), t(t_cls), t(t_box), temperature=3.0)
    exp_cls, exp_box = hand_rcnn_terms(s_cls, s_box, t_cls, t_box)
    assert cls.item() == pytest.approx(exp_cls, rel=1e-5)
    assert box.item() == pytest.approx(exp_box, rel=1e-5)
    # summed, not averaged: the same RoIs twice give twice the cls term and the same box term
    cls2, box2 = rcnn_kd_terms(t(np.vstack([s_cls] * 2)), t(np.vstack([s_box] * 2)), t(np.vstack([t_cls] * 2)),
                               t(np.vstack([t_box] * 2)))
    assert cls2.item() == pytest.approx(2 * exp_cls, rel=1e-5) and box2.item() == pytest.approx(exp_box, rel=1e-5)


def test_rcnn_stream_runs_both_amplifiers_on_the_given_rois_with_their_weights():
    torch.manual_seed(0)
    teacher = build_detector(Spec("faster_rcnn"), num_classes=2, input_size=64).eval()
    spread(teacher.roi_heads.box_predictor, 0.1, 1)
    amplifier = spread(AmplifierTask(teacher).model.roi_heads, 0.05, 2).eval()
    cfg = DistillConfig(weights=weights(implicit_full=1e-3, implicit_full_box=2.0, implicit_high=0.5), temperature=2.0)
    stream = RcnnImplicit(teacher, amplifier, cfg)
    gen = torch.Generator().manual_seed(4)
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    names = ["0", "1", "2", "3", "pool"]
    student = [torch.randn(2, 16, h, w, generator=gen) for h, w in shapes]
    teacher_feats = [torch.randn(2, 16, h, w, generator=gen) for h, w in shapes]
    rois = [torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 60.0, 50.0]]), torch.tensor([[0.0, 0.0, 63.0, 63.0]])]
    sizes = [(64, 64), (64, 64)]
    terms = stream(student, teacher_feats, (rois, sizes, names))
    for name, heads, prep, (w_cls, w_box) in (("full", teacher.roi_heads, lambda f: f, (1e-3, 2.0)),
                                                ("high", amplifier, high_frequency, (0.5, 0.5))):
        outs = []
        for feats in (student, teacher_feats):
            fmap = dict(zip(names, [prep(f) for f in feats]))
            with torch.no_grad():
                logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(fmap, rois, sizes)))
            outs.append((logits.double().numpy(), deltas.double().numpy()))
        (s_cls, s_box), (t_cls, t_box) = outs
        cls, box = hand_rcnn_terms(s_cls, s_box, t_cls, t_box, temperature=2.0)
        assert terms[f"kd_implicit_{name}_cls"].item() == pytest.approx(w_cls * cls, rel=1e-4)
        assert terms[f"kd_implicit_{name}_box"].item() == pytest.approx(w_box * box, rel=1e-4)


# -- every weight reaches its term -------------------------------------------------------------------------------------
WEIGHT_TERMS = {
    "explicit_low": ["kd_explicit_low"], "explicit_high": ["kd_explicit_high"],
    "implicit_full": ["kd_implicit_full_cls", "kd_implicit_full_box"],
    "implicit_high": ["kd_implicit_high_cls", "kd_implicit_high_box"],
    "implicit_full_box": ["kd_implicit_full_box"], "implicit_high_box": ["kd_implicit_high_box"],
}


@pytest.fixture(scope="module", params=["retinanet", "faster_rcnn"])
def ds2d2_models(request):
    torch.manual_seed(0)
    teacher = build_detector(Spec(request.param, fpn_width=32), num_classes=2, input_size=64)
    amplifier = AmplifierTask(teacher).model
    student = build_detector(Spec(request.param, fpn_width=16), num_classes=2, input_size=64)
    return teacher, amplifier, student


def ds2d2_terms(models, w: DistillWeights) -> dict[str, float]:
    teacher, amplifier, student = models
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=gen)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    torch.manual_seed(5)  # adapter init and the RoI sampler: the same for every weight setting
    task = build_task("student", model=student, teacher=teacher, amplifier=amplifier, method="ds2d2",
                      distill=DistillConfig(weights=w)).train()
    with torch.no_grad():
        return {k: v.item() for k, v in task(images, targets).items()}


@pytest.mark.parametrize("field", list(WEIGHT_TERMS))
def test_each_ds2d2_weight_reaches_its_terms(ds2d2_models, field):
    base = weights(implicit_full=0.7, implicit_high=0.3)
    value = getattr(base, field) if getattr(base, field) is not None else base.implicit(field.split("_")[1])[1]
    reference = ds2d2_terms(ds2d2_models, base)
    zero = ds2d2_terms(ds2d2_models, base.model_copy(update={field: 0.0}))
    double = ds2d2_terms(ds2d2_models, base.model_copy(update={field: 2 * value}))
    for term, ref in reference.items():
        if term in WEIGHT_TERMS[field]:
            assert ref > 0 and zero[term] == 0, term
            assert double[term] == pytest.approx(2 * ref, rel=1e-5), term
        else:
            assert zero[term] == pytest.approx(ref, rel=1e-5, abs=1e-7), term
            assert double[term] == pytest.approx(ref, rel=1e-5, abs=1e-7), term
    assert all(math.isfinite(v) for v in reference.values())
