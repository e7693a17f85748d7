"""The baselines equal their published formulas on tiny cases, each weight reaches its term, FGD's parts train and
resume but are never exported. Expected values are computed here with numpy from the papers' formulas."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from distill.kd import FGDLoss, fitnet_loss, pkd_loss
from distill.models import build_detector
from distill.tasks import build_task
from runtime.config import DistillConfig, DistillWeights, FGDConfig, FitNetConfig, PKDConfig


def test_pkd_is_one_minus_the_pearson_correlation_per_channel():
    """PKD's loss, MSE of the standardised maps / 2, is (n-1)/n * mean over channels of (1 - r) for n values."""
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)]
    teacher = [3 * s + torch.randn(s.shape, generator=gen) + 7 for s in student]  # correlated, other scale/offset
    expected = 0.0
    for s, t in zip(student, teacher):
        s_np = s.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1)
        t_np = t.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1)
        n = s_np.shape[1]
        r = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(s_np, t_np)])
        expected += (n - 1) / n * np.mean(1 - r)
    assert pkd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-4)
    # scale and offset of either map do not matter; a perfectly correlated student costs nothing
    assert pkd_loss([5 * s - 2 for s in student], teacher).item() == pytest.approx(expected, rel=1e-4)
    assert pkd_loss([2 * t + 1 for t in teacher], teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_fitnet_is_the_plain_mse_or_the_mse_over_the_teacher_energy():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, generator=gen) * 3
    mse = np.mean((s.numpy().astype(np.float64) - t.numpy()) ** 2)
    assert fitnet_loss([s, s[..., :3, :3]], [t, t[..., :3, :3]]).item() == pytest.approx(
        mse + np.mean((s[..., :3, :3].numpy() - t[..., :3, :3].numpy()) ** 2), rel=1e-5)
    assert fitnet_loss([s], [t], normalize=True).item() == pytest.approx(mse / np.mean(t.numpy() ** 2), rel=1e-5)


# -- FGD by hand -------------------------------------------------------------------------------------------------------
def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def hand_attention(f, temp):
    """Spatial H W softmax(mean_c |F| / T) and channel C softmax(mean_hw |F| / T) of one image's map (C,H,W)."""
    c, h, w = f.shape
    spatial = h * w * np_softmax(np.abs(f).mean(axis=0).ravel() / temp).reshape(h, w)
    channel = c * np_softmax(np.abs(f).mean(axis=(1, 2)) / temp)
    return spatial, channel


def hand_masks(boxes, h, w, padded):
    """FGD's scale mask (the largest 1/area of the boxes covering a cell, inclusive floor/ceil ranges) and the
    background mask (1 off the boxes, divided by the number of such cells)."""
    fg = np.zeros((h, w))
    for x1, y1, x2, y2 in boxes:
        c0, c1 = math.floor(x1 / padded * w), math.ceil(x2 / padded * w)
        r0, r1 = math.floor(y1 / padded * h), math.ceil(y2 / padded * h)
        area = 1.0 / ((r1 + 1 - r0) * (c1 + 1 - c0))
        for r in range(max(r0, 0), min(r1, h - 1) + 1):
            for c in range(max(c0, 0), min(c1, w - 1) + 1):
                fg[r, c] = max(fg[r, c], area)
    bg = (fg == 0).astype(float)
    return fg, bg / bg.sum() if bg.sum() else bg


def hand_context(f, block):
    """GcBlock: the softmax-pooled context of the map (mask conv) through conv-LayerNorm-ReLU-conv, added back."""
    p = {k: v.detach().double().numpy() for k, v in block.state_dict().items()}
    c, h, w = f.shape
    logits = np.einsum("c,cp->p", p["mask.weight"].reshape(-1), f.reshape(c, -1)) + p["mask.bias"][0]
    context = f.reshape(c, -1) @ np_softmax(logits)  # (C,)
    hidden = p["transform.0.weight"].reshape(-1, c) @ context + p["transform.0.bias"]
    hidden = (hidden - hidden.mean()) / np.sqrt(hidden.var() + 1e-5)  # LayerNorm over the C/2 values
    hidden = np.maximum(hidden * p["transform.1.weight"].reshape(-1) + p["transform.1.bias"].reshape(-1), 0)
    out = p["transform.3.weight"].reshape(c, -1) @ hidden + p["transform.3.bias"]
    return f + out[:, None, None]


def test_fgd_terms_equal_the_papers_formulas():
    torch.manual_seed(0)
    loss = FGDLoss(channels=4, num_levels=2, temperature=0.5, alpha=2e-3, beta=3e-4, gamma=5e-4, lambda_=7e-6)
    with torch.no_grad():  # move the zero-initialised last layers so the global term is not a plain MSE
        for block in [*loss.student_context, *loss.teacher_context]:
            block.transform[3].weight.normal_(0, 0.3)
            block.transform[3].bias.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(1)
    student = [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)]
    teacher = [torch.randn(2, 4, 8, 8, generator=gen) * 1.5, torch.randn(2, 4, 4, 4, generator=gen)]
    boxes = [torch.tensor([[3.0, 5.0, 20.0, 14.0], [10.0, 8.0, 13.0, 12.0]]), torch.tensor([[0.0, 30.0, 31.0, 63.0]])]
    terms = loss(student, teacher, boxes, (64, 64))
    fg_sum = bg_sum = att_sum = global_sum = 0.0
    for level, (s, t) in enumerate(zip(student, teacher)):
        for i in range(2):
            s_np, t_np = s[i].double().numpy(), t[i].double().numpy()
            sp_s, ch_s = hand_attention(s_np, 0.5)
            sp_t, ch_t = hand_attention(t_np, 0.5)
            fg, bg = hand_masks(boxes[i].tolist(), s_np.shape[1], s_np.shape[2], 64)
            diff = (s_np - t_np) ** 2 * sp_t[None] * ch_t[:, None, None]
            fg_sum += (diff * fg[None]).sum() / 2
            bg_sum += (diff * bg[None]).sum() / 2
            att_sum += (np.abs(ch_s - ch_t).sum() + np.abs(sp_s - sp_t).sum()) / 2
            gs = hand_context(s_np, loss.student_context[level])
            gt = hand_context(t_np, loss.teacher_context[level])
            global_sum += ((gs - gt) ** 2).sum() / 2
    assert terms["kd_fgd_fg"].item() == pytest.approx(2e-3 * fg_sum, rel=1e-4)
    assert terms["kd_fgd_bg"].item() == pytest.approx(3e-4 * bg_sum, rel=1e-4)
    assert terms["kd_fgd_attention"].item() == pytest.approx(5e-4 * att_sum, rel=1e-4)
    assert terms["kd_fgd_global"].item() == pytest.approx(7e-6 * global_sum, rel=1e-4)


def test_fgd_defaults_are_mmrazors_retinanet_setting():
    cfg = FGDConfig()
    assert (cfg.temperature, cfg.alpha, cfg.beta, cfg.gamma, cfg.lambda_) == (0.5, 1e-3, 5e-4, 5e-4, 5e-6)
    assert cfg.levels is None  # every FPN level, as mmrazor's fpn_convs.0-4
    assert FGDConfig(**{"lambda": 1e-4}).lambda_ == 1e-4  # the paper's name in pipelines.yaml


# -- in the student task ----------------------------------------------------------------------------------------------
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


@pytest.fixture(scope="module", params=["retinanet", "faster_rcnn"])
def models(request):
    torch.manual_seed(0)
    teacher = build_detector(Spec(request.param, fpn_width=32), num_classes=2, input_size=64)
    student = build_detector(Spec(request.param, fpn_width=16), num_classes=2, input_size=64)
    return teacher, student


def terms_for(models, method: str, **sections) -> dict[str, float]:
    teacher, student = models
    distill = DistillConfig(weights=DistillWeights(explicit_low=1, explicit_high=1, implicit_full=1,
                                                   implicit_high=1), **sections)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=gen)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    torch.manual_seed(7)  # the adapter, FGD's blocks and the RoI sampler: the same for every setting
    task = build_task("student", model=student, teacher=teacher, method=method, distill=distill).train()
    with torch.no_grad():
        return {k: v.item() for k, v in task(images, targets).items() if k.startswith("kd_")}


@pytest.mark.parametrize("method, section, field, terms", [
    ("fitnet", "fitnet", "weight", ["kd_fitnet"]),
    ("pkd", "pkd", "weight", ["kd_pkd"]),
    ("fgd", "fgd", "alpha", ["kd_fgd_fg"]),
    ("fgd", "fgd", "beta", ["kd_fgd_bg"]),
    ("fgd", "fgd", "gamma", ["kd_fgd_attention"]),
    ("fgd", "fgd", "lambda_", ["kd_fgd_global"]),
])
def test_each_baseline_weight_reaches_its_term(models, method, section, field, terms):
    base = {"fitnet": FitNetConfig(weight=0.3), "pkd": PKDConfig(weight=4.0), "fgd": FGDConfig()}[section]
    value = getattr(base, field)
    reference = terms_for(models, method, **{section: base})
    zero = terms_for(models, method, **{section: base.model_copy(update={field: 0.0})})
    double = terms_for(models, method, **{section: base.model_copy(update={field: 2 * value})})
    for term, ref in reference.items():
        if term in terms:
            assert ref > 0 and zero[term] == 0 and double[term] == pytest.approx(2 * ref, rel=1e-5), term
        else:
            assert zero[term] == pytest.approx(ref, rel=1e-5) and double[term] == pytest.approx(ref, rel=1e-5), term


def test_pkd_default_weight_is_mmrazors_for_the_detector(models):
    teacher, student = models
    task = build_task("student", model=student, teacher=teacher, method="pkd")
    assert task.pkd_weight == (10.0 if type(student).__name__ == "RetinaNet" else 6.0)
    assert task.levels == [0, 1, 2, 3]


def test_fgd_blocks_train_resume_and_are_never_exported(models):
    teacher, student = models
    task = build_task("student", model=student, teacher=teacher, method="fgd").train()
    assert set(task.checkpoint_modules()) == {"model", "adapter", "fgd"}
    assert len(task.fgd.student_context) == 5  # one pair of GcBlocks per FPN level
    fgd_params = {id(p) for p in task.fgd.parameters()}
    assert fgd_params <= {id(p) for p in task.trainable_parameters()}
    assert not any(k.startswith(("fgd", "teacher", "adapter")) for k in task.model.state_dict())
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    sum(task(images, targets).values()).backward()
    assert all(p.grad is not None for p in task.fgd.parameters())  # both blocks learn, as in FGD
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_levels_are_one_clear_error(models):
    from runtime.errors import UserError

    teacher, student = models
    with pytest.raises(UserError, match="levels"):
        build_task("student", model=student, teacher=teacher, method="pkd",
                   distill=DistillConfig(weights=DistillWeights(explicit_low=1, explicit_high=1, implicit_full=1,
                                                                implicit_high=1), pkd=PKDConfig(levels=[0, 7])))
