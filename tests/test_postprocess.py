"""Anchors, box decoding, NMS and the whole RetinaNet post-processing against torchvision (torch is fine in tests)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from runtime.anchors import AnchorSpec, feature_sizes, generate_anchors, retinanet_default_sizes
from runtime.errors import UserError
from runtime.nms import KERNELS as nms_kernels
from runtime.nms import batched_nms, default_kernel, nms
from runtime.postprocess import (BBOX_XFORM_CLIP, Detections, DetectionsPostprocess, PostprocessSpec,
                                 RetinaNetPostprocess, build_postprocess, decode_boxes)
from runtime.preprocess import PreprocessSpec, normalize, resize_image, to_training_array

NUM_CLASSES = 5


def tiny_retinanet(size: int, seed: int = 0) -> RetinaNet:
    """resnet18-FPN RetinaNet, random init, with head weights spread out so scores are not all ~0.01."""
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    model = RetinaNet(backbone, num_classes=NUM_CLASSES, min_size=size, max_size=size)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.2)
        torch.nn.init.constant_(model.head.classification_head.cls_logits.bias, -2.0)
        torch.nn.init.normal_(model.head.regression_head.bbox_reg.weight, std=0.05)
    return model.eval()


def torchvision_anchors(size: tuple[int, int], grids: list[tuple[int, int]]) -> np.ndarray:
    generator = _default_anchorgen()
    images = ImageList(torch.zeros(1, 3, *size), [size])
    feats = [torch.zeros(1, 1, h, w) for h, w in grids]
    return generator(images, feats)[0].numpy()


def test_default_sizes_are_torchvisions():
    assert retinanet_default_sizes() == tuple(tuple(s) for s in _default_anchorgen().sizes)
    assert AnchorSpec().num_anchors_per_location == _default_anchorgen().num_anchors_per_location()[0]


@pytest.fixture(scope="module")
def backbone():
    return tiny_retinanet(128).backbone


@pytest.mark.parametrize("size", [(96, 160), (100, 140)])
def test_feature_sizes_match_resnet_fpn(backbone, size):
    """ceil(S / stride) is what the real backbone produces, also for sizes that are not multiples of 128."""
    with torch.no_grad():
        feats = list(backbone(torch.zeros(1, 3, *size)).values())
    assert [tuple(f.shape[-2:]) for f in feats] == feature_sizes(size, AnchorSpec().strides)


@pytest.mark.parametrize("size", [(128, 128), (800, 800), (1024, 1024), (96, 160)])
def test_anchors_equal_torchvision(size):
    """Exact equality, including 800 px where torchvision's P6/P7 shift (800 // 13 = 61) is not the stride 64."""
    spec = AnchorSpec()
    ours, per_level = generate_anchors(spec, size)
    theirs = torchvision_anchors(size, feature_sizes(size, spec.strides))
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    assert sum(per_level) == len(ours)


@pytest.mark.parametrize("size", [128, 800])
def test_decode_matches_boxcoder_with_clamp(size):
    """Decoding equals torchvision's BoxCoder to 1e-3 px (a half-pixel convention slip would be 0.5 px off)."""
    rng = np.random.default_rng(0)
    anchors, _ = generate_anchors(AnchorSpec(), (size, size))
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=BBOX_XFORM_CLIP)
    codes = rng.normal(0, 1, (len(anchors), 4)).astype(np.float32)  # trained heads: deltas of order 1
    theirs = coder.decode_single(torch.from_numpy(codes), torch.from_numpy(anchors.copy())).numpy()
    np.testing.assert_allclose(decode_boxes(codes, anchors, (1.0, 1.0, 1.0, 1.0)), theirs, rtol=0, atol=1e-3)
    codes[:10, 2:] = 50.0  # far beyond log(1000/16): must be clamped, not overflow (boxes ~60x the anchor)
    theirs = coder.decode_single(torch.from_numpy(codes), torch.from_numpy(anchors.copy())).numpy()
    ours = decode_boxes(codes, anchors, (1.0, 1.0, 1.0, 1.0))
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs, rtol=2e-7, atol=1e-3)  # float32: 1 ulp at 16k px is 2e-3 px


def _random_boxes(seed: int, n: int, classes: int = 3, extent: float = 100.0, ties: bool = False,
                  degenerate: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(1, 0.4 * extent, (n, 2))
    wh[rng.random(n) < degenerate, rng.integers(0, 2)] = 0.0  # zero-width or zero-height boxes
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    if ties:  # a handful of distinct values: ties must resolve in index order, as torchvision's stable sort
        scores = np.round(scores * 4) / 4
    return boxes, scores, rng.integers(0, classes, n)


KERNELS = sorted(nms_kernels)


def test_default_kernel_is_onnxruntime_where_installed():
    assert default_kernel() == "onnxruntime"  # the test environment has onnxruntime and onnx


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 700), st.sampled_from([0.3, 0.5, 0.7]), st.sampled_from([1, 3, 20]),
       st.sampled_from([100.0, 1024.0]), st.booleans(), st.sampled_from([0.0, 0.1]))
def test_nms_equals_torchvision(kernel, seed, n, iou, classes, extent, ties, degenerate):
    """Each kernel = torchvision's NMS: strict IoU > threshold, no +1, ties in index order, empty boxes kept."""
    boxes, scores, labels = _random_boxes(seed, n, classes, extent, ties, degenerate)
    tb, ts, tl = torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)
    np.testing.assert_array_equal(nms(boxes, scores, iou, kernel=kernel), torchvision.ops.nms(tb, ts, iou).numpy())
    expected = torchvision.ops.batched_nms(tb, ts, tl, iou).numpy()
    np.testing.assert_array_equal(batched_nms(boxes, scores, labels, iou, kernel=kernel), expected)
    # Stopping early at max_keep survivors gives exactly the first max_keep of the full result.
    for max_keep in (7, 100):
        np.testing.assert_array_equal(batched_nms(boxes, scores, labels, iou, max_keep=max_keep, kernel=kernel),
                                      expected[:max_keep])
    # Labels are any integers (negative, sparse): only equality matters.
    np.testing.assert_array_equal(batched_nms(boxes, scores, labels * 1000 - 7, iou, max_keep=100, kernel=kernel),
                                  expected[:100])


@pytest.mark.parametrize("kernel", KERNELS)
def test_nms_max_keep_grows_the_prefix_when_suppression_is_heavy(kernel):
    """Hundreds of near-copies of one box: the first prefixes keep too few, the search must go on to the end."""
    rng = np.random.default_rng(0)
    boxes = np.tile(np.array([[10, 10, 50, 50]], np.float32), (1500, 1)) + rng.uniform(0, 1, (1500, 4)).astype(
        np.float32)
    boxes[-20:] += 200  # the only other survivors sit at the end of the score order
    scores = np.linspace(1, 0.01, 1500, dtype=np.float32)
    labels = np.zeros(1500, np.int64)
    expected = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                           torch.from_numpy(labels), 0.5).numpy()
    assert len(expected) > 1
    np.testing.assert_array_equal(batched_nms(boxes, scores, labels, 0.5, max_keep=100, kernel=kernel), expected[:100])


@pytest.mark.parametrize("kernel", KERNELS)
def test_nms_iou_convention_is_torchvisions(kernel):
    """IoU exactly at the threshold keeps the box (strict >); fractional coordinates count (no int truncation,
    no +1): the same pair crosses 0.5 only through its sub-pixel parts."""
    half = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], np.float32)  # IoU 0.5 exactly
    assert nms(half, np.array([0.9, 0.8], np.float32), 0.5, kernel=kernel).tolist() == [0, 1]
    assert nms(half, np.array([0.9, 0.8], np.float32), 0.49, kernel=kernel).tolist() == [0]
    frac = np.array([[0, 0, 1.4, 1], [0.5, 0, 1.9, 1]], np.float32)  # IoU 0.47 (identical boxes if truncated)
    assert nms(frac, np.array([0.9, 0.8], np.float32), 0.5, kernel=kernel).tolist() == [0, 1]
    empty = np.array([[5, 5, 5, 9], [5, 5, 5, 9], [0, 0, 4, 4]], np.float32)
    assert batched_nms(empty, np.array([0.9, 0.8, 0.7], np.float32), np.zeros(3), 0.5,
                       kernel=kernel).tolist() == [0, 1, 2]


@pytest.mark.parametrize("kernel", KERNELS)
def test_nms_only_within_a_class(kernel):
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    keep = batched_nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), np.array([0, 1, 0]), 0.5, kernel=kernel)
    assert keep.tolist() == [0, 1]


def _spec(**kw) -> PostprocessSpec:
    return PostprocessSpec(kind="retinanet", num_classes=NUM_CLASSES, anchors=AnchorSpec(), **kw)


@pytest.mark.parametrize("seed,score_thresh", [(0, 0.05), (1, 0.3)])
def test_retinanet_postprocess_equals_torchvision(seed, score_thresh):
    """The deployed post-processing gives torchvision's detections for the same head outputs."""
    size = 128
    model = tiny_retinanet(size, seed)
    model.score_thresh, model.detections_per_img = score_thresh, 100  # the project's TestConfig, not torchvision's 300
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    resized, _ = resize_image(image, PreprocessSpec(input_size=(size, size)))
    x = torch.from_numpy(to_training_array(resized))
    with torch.no_grad():
        expected = model([x])[0]
        images, _ = model.transform([x])
        # The deploy network's input is our normalize(): identical to torchvision's transform.
        deploy_input = normalize(resized, PreprocessSpec(input_size=(size, size)))
        np.testing.assert_array_equal(images.tensors[0].numpy(), deploy_input)
        head = model.head(list(model.backbone(images.tensors).values()))
    ours = RetinaNetPostprocess(_spec(score_thresh=score_thresh))(
        head["cls_logits"][0].numpy(), head["bbox_regression"][0].numpy(), (size, size))
    assert len(expected["scores"]) > 20, "test needs detections to compare"
    assert len(ours) == len(expected["scores"])
    np.testing.assert_array_equal(ours.labels, expected["labels"].numpy())
    np.testing.assert_allclose(ours.boxes, expected["boxes"].numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours.scores, expected["scores"].numpy(), atol=1e-4)
    # The batched entry point over named outputs agrees with the single-image call.
    batch = build_postprocess(_spec(score_thresh=score_thresh)).from_outputs(
        {k: v.numpy() for k, v in head.items()}, (size, size))
    np.testing.assert_array_equal(batch[0].boxes, ours.boxes)


def test_retinanet_postprocess_limits():
    """Top-k per level, score threshold and max detections hold; nothing passes an impossible threshold."""
    anchors, _ = generate_anchors(AnchorSpec(), (128, 128))
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (len(anchors), NUM_CLASSES)).astype(np.float32)
    codes = rng.normal(0, 0.5, (len(anchors), 4)).astype(np.float32)
    dets = RetinaNetPostprocess(_spec(max_detections=7, topk_candidates=10))(logits, codes, (128, 128))
    assert len(dets) == 7 and (dets.scores > 0.05).all() and (np.diff(dets.scores) <= 0).all()
    assert dets.boxes.min() >= 0 and dets.boxes.max() <= 128
    empty = RetinaNetPostprocess(_spec(score_thresh=0.999))(np.full_like(logits, -5), codes, (128, 128))
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)


def test_retinanet_output_mismatch_is_user_error():
    post = RetinaNetPostprocess(_spec())
    with pytest.raises(UserError, match="anchors"):
        post(np.zeros((100, NUM_CLASSES), np.float32), np.zeros((100, 4), np.float32), (128, 128))
    with pytest.raises(UserError, match="bbox_regression"):
        post.from_outputs({"cls_logits": np.zeros((1, 100, NUM_CLASSES))}, (128, 128))


def test_detections_postprocess_offsets_and_filters():
    spec = PostprocessSpec(kind="detections", num_classes=2, label_offset=1, max_detections=2, score_thresh=0.1)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 200, 20], [1, 1, 2, 2], [3, 3, 4, 4]], np.float32)
    out = DetectionsPostprocess(spec)(boxes, np.array([0.5, 0.9, 0.05, 0.7]), np.array([1, 2, 1, 3]), (64, 64))
    # score 0.05 is below the threshold, label 3 - 1 = 2 is not a class; best two remain, clipped to the image.
    assert out.labels.tolist() == [1, 0] and out.scores.tolist() == pytest.approx([0.9, 0.5])
    assert out.boxes[0].tolist() == [5, 5, 64, 20]
    results = out.to_coco_results(image_id=4)
    assert results[0] == {"image_id": 4, "category_id": 2, "bbox": [5.0, 5.0, 59.0, 15.0], "score": pytest.approx(0.9)}


def test_spec_validation():
    with pytest.raises(ValueError, match="anchors"):
        PostprocessSpec(kind="retinanet", num_classes=3)
    with pytest.raises(ValueError):
        PostprocessSpec(kind="detections", num_classes=3, unknown=1)
    assert len(Detections()) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, -1e30, np.inf, -np.inf, np.nan]) |
                st.floats(width=32), max_size=300))
def test_nms_score_order_is_a_stable_descending_sort(values):
    """The NMS visiting order (int64 keys) equals numpy's stable sort of -scores: ties, signed zeros, infinities, NaN."""
    from runtime.nms import _order

    scores = np.array(values, np.float32)
    np.testing.assert_array_equal(_order(scores), np.argsort(-scores, kind="stable"))
