"""ONNX export: named I/O at a fixed size, ONNX Runtime equals PyTorch (Polygraphy), in-graph NMS tails (ONNX
NonMaxSuppression, TensorRT's EfficientNMS_TRT) and Faster R-CNN."""
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
from deploy.nms_graph import plan_nms
from distill.models import build_detector
from runtime.anchors import generate_anchors
from runtime.errors import UserError
from runtime.backends.ort import graph_until
from runtime.efficient_nms import PLUGIN_INPUTS, PLUGIN_OP, PLUGIN_OUTPUTS
from runtime.postprocess import EfficientNmsReference, PaddedDetectionsPostprocess, PostprocessSpec
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


def _post(model, score_thresh: float, topk: int = 1000) -> PostprocessSpec:
    """The deploy post-processing spec, with the same thresholds set on the torchvision model."""
    model.score_thresh, model.topk_candidates, model.detections_per_img, model.nms_thresh = score_thresh, topk, 100, 0.5
    return PostprocessSpec(kind="retinanet", num_classes=CLASSES, anchors=_anchor_spec(model, SIZE),
                           score_thresh=score_thresh, max_detections=100, topk_candidates=topk)


def _tailed(model, kind: str, tmp_path: Path, post: PostprocessSpec, batch: int | None = None) -> tuple[Path, object]:
    """The raw network exported (dynamic batch unless `batch`) with the `kind` NMS tail appended."""
    net = deploy_network(model, SIZE)
    path = SimplifyOnnx(ExportOnnx(net, tmp_path / f"{kind}.onnx", SIZE, dynamic_batch=batch is None))()
    plan = plan_nms("graph", net, model, post, SIZE, "onnxruntime" if kind == "onnx-nms" else "tensorrt", batch, 17)
    plan.attach([path])
    return path, plan


def head_outputs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Head outputs with spread scores (thousands above 0.05: the per-level top-k and NMS both have work)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(-3, 2, (batch, 774, CLASSES)).astype(np.float32),
            rng.normal(0, 0.3, (batch, 774, 4)).astype(np.float32))


def torchvision_postprocess(model, cls_logits: np.ndarray, bbox: np.ndarray) -> list[dict]:
    """torchvision's RetinaNet.postprocess_detections on the same raw outputs (per image, per level)."""
    anchors, per_level = generate_anchors(_anchor_spec(model, SIZE), (SIZE, SIZE))
    split = lambda x: list(torch.from_numpy(x).split(list(per_level), dim=1))  # noqa: E731
    anchor_list = [list(torch.from_numpy(anchors.copy()).split(list(per_level)))] * len(cls_logits)
    with torch.no_grad():
        return model.postprocess_detections({"cls_logits": split(cls_logits), "bbox_regression": split(bbox)},
                                            anchor_list, [(SIZE, SIZE)] * len(cls_logits))


def test_onnx_nms_tail_equals_torchvision_for_a_batch(retina, tmp_path):
    """--nms onnx-nms: one ONNX NonMaxSuppression, fixed [B, 100] outputs + count, = torchvision for B = 3."""
    post = _post(retina, 0.05, topk=200)  # 200 per level: P3 (1728 scores) needs its top-k
    path, plan = _tailed(retina, "onnx-nms", tmp_path, post)
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("NonMaxSuppression") == 1
    assert [o.name for o in graph.output] == list(PLUGIN_OUTPUTS)
    # The tail alone (the network's outputs are its inputs) against torchvision on the same raw outputs.
    cls_logits, bbox = head_outputs(3)
    tail_only = ort_session(plan.tail).run(None, {"cls_logits": cls_logits, "bbox_regression": bbox})
    count, boxes, scores, classes = tail_only
    assert count.shape == (3, 1) and count.dtype == np.int32 and boxes.shape == (3, 100, 4)
    assert classes.dtype == np.int32
    for b, ref in enumerate(torchvision_postprocess(retina, cls_logits, bbox)):
        n = int(count[b, 0])
        assert n == len(ref["scores"]) > 50
        np.testing.assert_allclose(boxes[b, :n], ref["boxes"].numpy(), rtol=0, atol=1e-3)
        np.testing.assert_allclose(scores[b, :n], ref["scores"].numpy(), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(classes[b, :n], ref["labels"].numpy())
        assert not boxes[b, n:].any() and not scores[b, n:].any()  # padding
    # The whole graph runs a batch; the runtime reads its padded outputs.
    images = np.concatenate([f["images"] for f in real_feeds(2)])
    outputs = dict(zip(PLUGIN_OUTPUTS, ort_session(path).run(None, {"images": images})))
    assert outputs["detection_boxes"].shape == (2, 100, 4)
    dets = PaddedDetectionsPostprocess(plan.postprocess).from_outputs(outputs, (SIZE, SIZE))
    assert len(dets) == 2 and len(dets[1]) == outputs["num_detections"][1, 0]


def test_efficient_nms_tail_is_the_tensorrt_plugin(tmp_path):
    """--nms efficient-nms-trt: decoding in the graph + one EfficientNMS_TRT node with the plugin's attributes;
    ONNX Runtime cannot load it, but runs the graph up to the plugin, and the reference finishes."""
    model = tiny()
    post = _post(model, 0.3)
    path, plan = _tailed(model, "efficient-nms-trt", tmp_path, post, batch=1)
    graph = onnx.load(str(path)).graph
    (node,) = [n for n in graph.node if n.op_type == PLUGIN_OP]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"score_threshold": pytest.approx(0.3), "iou_threshold": pytest.approx(0.5),
                     "max_output_boxes": 100, "background_class": -1, "score_activation": 1, "box_coding": 0,
                     "plugin_version": b"1"}
    assert list(node.input) == list(PLUGIN_INPUTS) and list(node.output) == list(PLUGIN_OUTPUTS)
    assert [(o.name, o.type.tensor_type.elem_type) for o in graph.output] == [
        ("num_detections", onnx.TensorProto.INT32), ("detection_boxes", onnx.TensorProto.FLOAT),
        ("detection_scores", onnx.TensorProto.FLOAT), ("detection_classes", onnx.TensorProto.INT32)]
    with pytest.raises(Exception, match="EfficientNMS_TRT"):
        ort_session(path)
    boxes, logits = ort_session(graph_until(path, PLUGIN_INPUTS)).run(None, real_feeds(1)[0])
    assert boxes.shape == (1, 774, 4) and logits.shape == (1, 774, CLASSES)
    # The graph up to the plugin decodes like torchvision; the reference on those inputs, with few candidates
    # (score > 0.3, far under 4096, under 1000 per level), gives torchvision's detections.
    cls_logits, bbox = head_outputs(1, seed=1)
    boxes, logits = ort_session(graph_until(plan.tail, PLUGIN_INPUTS)).run(
        None, {"cls_logits": cls_logits, "bbox_regression": bbox})
    ours = EfficientNmsReference(plan.postprocess).from_outputs(
        {"decoded_boxes": boxes, "cls_logits": logits}, (SIZE, SIZE))[0]
    ref = torchvision_postprocess(model, cls_logits, bbox)[0]
    assert 50 < len(ours) == len(ref["scores"])
    np.testing.assert_allclose(ours.boxes, ref["boxes"].numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours.scores, ref["scores"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours.labels, ref["labels"].numpy())


def test_nms_choice_follows_the_target_runtime(retina):
    net = deploy_network(retina, SIZE)
    post = PostprocessSpec(kind="retinanet", num_classes=CLASSES, anchors=_anchor_spec(retina, SIZE))
    assert plan_nms("host", net, retina, post, SIZE, "tensorrt", 1, 17).tail is None
    with pytest.raises(UserError, match="TensorRT plugin"):
        plan_nms("efficient-nms-trt", net, retina, post, SIZE, "onnxruntime", 1, 17)
    frcnn = tiny("faster_rcnn")
    with pytest.raises(UserError, match="Faster R-CNN"):
        plan_nms("efficient-nms-trt", deploy_network(frcnn, SIZE), frcnn, post, SIZE, "tensorrt", 1, 17)


def test_faster_rcnn_exports_whole_graph(tmp_path):
    model = tiny("faster_rcnn")
    model.roi_heads.score_thresh = 0.0  # random init: keep detections so boxes are compared, not empty arrays
    net = deploy_network(model, SIZE)
    assert net.label_offset == 1 and net.output_names == ("boxes", "scores", "labels")
    path = SimplifyOnnx(ExportOnnx(net, tmp_path / "frcnn.onnx", SIZE))()
    assert {"RoiAlign", "NonMaxSuppression"} <= all_ops(onnx.load(str(path)).graph)
    report = check_fidelity(net.module, net.output_names, path, real_feeds(1), atol=1e-3, rtol=1e-3)
    assert report.passed, report.worst()
