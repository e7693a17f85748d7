"""The numpy reference of TensorRT's EfficientNMS_TRT: its documented semantics, case by case, and where they part
from torchvision's post-processing (which is why the accuracy gate scores in-graph NMS with it)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from runtime.efficient_nms import SELECTED_BOXES, EfficientNmsAttributes, efficient_nms
from runtime.postprocess import PaddedDetectionsPostprocess, PostprocessSpec


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def attrs(**kw) -> EfficientNmsAttributes:
    return EfficientNmsAttributes(**({"score_threshold": 0.05, "iou_threshold": 0.5, "max_output_boxes": 10} | kw))


def run(boxes, scores, **kw) -> dict[str, np.ndarray]:
    return efficient_nms(np.asarray(boxes, np.float32)[None], np.asarray(scores, np.float32)[None], attrs(**kw))


def test_outputs_are_the_plugins():
    out = run([[0, 0, 10, 10], [20, 20, 30, 30]], [[logit(0.9), -9], [-9, logit(0.6)]], max_output_boxes=5)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "num_detections": ((1, 1), np.int32), "detection_boxes": ((1, 5, 4), np.float32),
        "detection_scores": ((1, 5), np.float32), "detection_classes": ((1, 5), np.int32)}
    assert out["num_detections"][0, 0] == 2
    np.testing.assert_allclose(out["detection_scores"][0], [0.9, 0.6, 0, 0, 0], atol=1e-6)  # sigmoid, zero padding
    assert out["detection_classes"][0].tolist() == [0, 1, 0, 0, 0]
    assert not out["detection_boxes"][0, 2:].any()


def test_iou_at_the_threshold_suppresses_unlike_torchvision():
    """EfficientNMS drops a box at IoU >= threshold; torchvision only above it."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], np.float32)  # IoU exactly 0.5
    out = run(boxes, [[logit(0.9)], [logit(0.8)]])
    assert out["num_detections"][0, 0] == 1
    keep = torchvision.ops.nms(torch.from_numpy(boxes), torch.tensor([0.9, 0.8]), 0.5)
    assert len(keep) == 2


def test_classes_are_separate_and_reversed_corners_are_reordered():
    boxes = [[10, 10, 0, 0], [0, 0, 10, 10]]  # the same box, corners given in reverse for the first one
    same_class = run(boxes, [[logit(0.9), -9], [logit(0.8), -9]])
    assert same_class["num_detections"][0, 0] == 1
    np.testing.assert_array_equal(same_class["detection_boxes"][0, 0], [10, 10, 0, 0])  # output as given
    other_class = run(boxes, [[logit(0.9), -9], [-9, logit(0.8)]])
    assert other_class["num_detections"][0, 0] == 2


def test_score_threshold_is_inclusive_in_logit_space_and_caps_hold():
    t = 0.3
    at = np.float32(math.log(t / (1 - t)))
    below = np.nextafter(at, np.float32(-np.inf))
    boxes = np.array([[i * 20, 0, i * 20 + 10, 10] for i in range(4)], np.float32)
    out = run(boxes, [[at], [below], [logit(0.9)], [logit(0.5)]], score_threshold=t, max_output_boxes=2)
    assert out["num_detections"][0, 0] == 2  # three pass (the one at the threshold too), max_output_boxes keeps 2
    np.testing.assert_allclose(out["detection_scores"][0], [0.9, 0.5], atol=1e-6)
    everything = run(boxes, [[at], [below], [logit(0.9)], [logit(0.5)]], score_threshold=t)
    assert everything["num_detections"][0, 0] == 3


def test_only_the_best_4096_reach_nms():
    """A global top-4096 before NMS (torchvision: 1000 per FPN level, NMS over all of them): when the best 4096
    candidates are copies of one box, a lower-scoring separate box never reaches NMS."""
    n = SELECTED_BOXES + 1
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (n, 1))
    boxes[-1] = [50, 50, 60, 60]
    scores = np.linspace(3, 1, n, dtype=np.float32)[:, None]
    out = run(boxes, scores)
    assert out["num_detections"][0, 0] == 1
    keep = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores[:, 0]), 0.5)
    assert len(keep) == 2  # NMS over every candidate keeps the separate box


def test_dense_kernel_below_0007_keeps_below_threshold_elements_with_score_zero():
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]], np.float32)
    scores = [[logit(0.5)], [logit(0.003)], [-20.0]]
    dense = run(boxes, scores, score_threshold=0.005)
    assert dense["num_detections"][0, 0] == 3  # the plugin's dense kernel lets the rest through at -32768
    np.testing.assert_allclose(dense["detection_scores"][0, :3], [0.5, 0, 0], atol=1e-6)
    # ... and the runtime drops those fillers
    spec = PostprocessSpec(kind="padded", num_classes=1, score_thresh=0.005)
    assert len(PaddedDetectionsPostprocess(spec).from_outputs(dense, (200, 200))[0]) == 1
    filtered = run(boxes, scores, score_threshold=0.01)
    assert filtered["num_detections"][0, 0] == 1


def test_batch_images_are_independent():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 50, (2, 30, 4)).astype(np.float32)
    boxes[..., 2:] += boxes[..., :2] + 5
    scores = rng.normal(-2, 2, (2, 30, 3)).astype(np.float32)
    together = efficient_nms(boxes, scores, attrs())
    for b in range(2):
        alone = efficient_nms(boxes[b:b + 1], scores[b:b + 1], attrs())
        for key in together:
            np.testing.assert_array_equal(together[key][b], alone[key][0])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="boxes"):
        efficient_nms(np.zeros((1, 5, 4)), np.zeros((1, 4, 2)), attrs())
    with pytest.raises(ValueError, match="box_coding"):
        efficient_nms(np.zeros((1, 5, 4)), np.zeros((1, 5, 2)), attrs(box_coding=1))
