"""ONNX export: named I/O at a fixed size, ONNX Runtime equals PyTorch (Polygraphy), in-graph NMS and Faster R-CNN."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from deploy.build import _anchor_spec
from deploy.export import ExportOnnx, SimplifyOnnx, deploy_network, onnx_io
from deploy.fidelity import check_fidelity, ort_session
from distill.models import build_detector
from runtime.anchors import generate_anchors
from runtime.errors import UserError
from runtime.postprocess import PostprocessSpec, RetinaNetPostprocess
from runtime.preprocess import PreprocessSpec, preprocess_batch, read_image

from data_fixtures import DOTA_SAMPLES

SIZE = 64
CLASSES = 3
DOTA = DOTA_SAMPLES / "images"


def tiny(arch: str = "retinanet", **thresholds):
    torch.manual_seed(0)
    spec = SimpleNamespace(arch=arch, backbone="resnet18", fpn_width=16, head_convs=1, pretrained_backbone=False,
                           norm="bn")
    return build_detector(spec, CLASSES, SIZE, **thresholds).eval()


def all_ops(graph: onnx.GraphProto) -> set[str]:
    """Op types of a graph and of its subgraphs (NMS sits inside an If: empty inputs skip it)."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                ops |= all_ops(sub)
    return ops


def real_feeds(count: int = 2) -> list[dict[str, np.ndarray]]:
    """Real remote-sensing images when the shared DOTA samples exist, preprocessed by runtime.preprocess."""
    paths = sorted(DOTA.glob("*.png"))[:count]
    rng = np.random.default_rng(0)
    images = [read_image(p) for p in paths] or [rng.integers(0, 256, (90, 120, 3), np.uint8) for _ in range(count)]
    spec = PreprocessSpec(input_size=(SIZE, SIZE))
    return [{"images": preprocess_batch([img], spec)[0]} for img in images]


@pytest.fixture(scope="module")
def retina():
    return tiny()


@pytest.fixture(scope="module")
def exported(retina, tmp_path_factory):
    net = deploy_network(retina, SIZE)
    path = SimplifyOnnx(ExportOnnx(net, tmp_path_factory.mktemp("export") / "model_fp32.onnx", SIZE))()
    return net, path


def test_retinanet_network_io_and_fidelity(exported):
    net, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    anchors = 9 * (8 * 8 + 4 * 4 + 2 * 2 + 1 + 1)  # P3..P7 at 64 px, 3 scales x 3 ratios
    inputs, outputs = onnx_io(path)
    assert inputs == [("images", [1, 3, SIZE, SIZE])]
    assert outputs == [("cls_logits", [1, anchors, CLASSES]), ("bbox_regression", [1, anchors, 4])]
    report = check_fidelity(net.module, net.output_names, path, real_feeds(), atol=1e-4, rtol=1e-3)
    assert report.passed, report.worst()
    assert [o.name for o in report.outputs] == ["cls_logits", "bbox_regression"]


def test_fidelity_catches_a_changed_weight(exported, tmp_path):
    net, path = exported
    model = onnx.load(str(path))
    bias = next(i for i in model.graph.initializer if "cls_logits" in i.name and "bias" in i.name)
    values = onnx.numpy_helper.to_array(bias) + 0.05
    bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    report = check_fidelity(net.module, net.output_names, broken, real_feeds(1), atol=1e-3, rtol=1e-3)
    assert not report.passed
    assert report.worst().startswith("cls_logits")


def test_dynamic_batch(retina, tmp_path):
    net = deploy_network(retina, SIZE)
    path = ExportOnnx(net, tmp_path / "dyn.onnx", SIZE, dynamic_batch=True)()
    assert onnx_io(path)[0] == [("images", ["batch", 3, SIZE, SIZE])]
    batch = np.concatenate([f["images"] for f in real_feeds(2)])
    cls_onnx, _ = ort_session(path).run(None, {"images": batch})
    with torch.no_grad():
        cls_torch, _ = net.module(torch.from_numpy(batch))
    np.testing.assert_allclose(cls_onnx, cls_torch.numpy(), atol=1e-4)


def test_runtime_anchors_match_the_model(retina):
    spec = _anchor_spec(retina, SIZE)
    anchors, per_level = generate_anchors(spec, (SIZE, SIZE))
    assert per_level == (576, 144, 36, 9, 9) and anchors.shape == (774, 4)


def test_graph_nms_equals_torchvision_and_host_postprocess(tmp_path):
    model = tiny(score_thresh=0.005)  # random init scores ~0.01: a threshold below gives detections to compare
    net = deploy_network(model, SIZE, nms="graph")
    path = SimplifyOnnx(ExportOnnx(net, tmp_path / "nms.onnx", SIZE))()
    assert "NonMaxSuppression" in all_ops(onnx.load(str(path)).graph)
    feed = real_feeds(1)[0]
    boxes, scores, labels = ort_session(path).run(None, feed)
    assert len(scores) > 0
    # torchvision's own eval forward on the un-normalised image
    x = torch.from_numpy(feed["images"])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    unnormalised = x * std[:, None, None] + mean[:, None, None]
    with torch.no_grad():
        ref = model(list(unnormalised))[0]
    np.testing.assert_allclose(boxes, ref["boxes"].numpy(), atol=1e-3)
    np.testing.assert_array_equal(labels, ref["labels"].numpy())
    # the host path: raw outputs + runtime.postprocess give the same detections
    raw = deploy_network(model, SIZE)
    with torch.no_grad():
        cls_logits, bbox = raw.module(x)
    spec = PostprocessSpec(kind="retinanet", num_classes=CLASSES, anchors=_anchor_spec(model, SIZE),
                           score_thresh=0.005, topk_candidates=1000)
    host = RetinaNetPostprocess(spec)(cls_logits[0].numpy(), bbox[0].numpy(), (SIZE, SIZE))
    np.testing.assert_allclose(host.boxes, boxes, atol=1e-3)
    np.testing.assert_allclose(host.scores, scores, atol=1e-5)


def test_graph_nms_is_batch_one(retina, tmp_path):
    net = deploy_network(retina, SIZE, nms="graph")
    with pytest.raises(UserError, match="batch 1"):
        ExportOnnx(net, tmp_path / "x.onnx", SIZE, dynamic_batch=True)()


def test_faster_rcnn_exports_whole_graph(tmp_path):
    model = tiny("faster_rcnn")
    model.roi_heads.score_thresh = 0.0  # random init: keep detections so boxes are compared, not empty arrays
    net = deploy_network(model, SIZE)
    assert net.label_offset == 1 and net.output_names == ("boxes", "scores", "labels")
    path = SimplifyOnnx(ExportOnnx(net, tmp_path / "frcnn.onnx", SIZE))()
    assert {"RoiAlign", "NonMaxSuppression"} <= all_ops(onnx.load(str(path)).graph)
    report = check_fidelity(net.module, net.output_names, path, real_feeds(1), atol=1e-3, rtol=1e-3)
    assert report.passed, report.worst()
