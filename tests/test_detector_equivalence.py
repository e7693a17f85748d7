"""The deployed detector (ONNX Runtime + numpy pre/post-processing) gives the PyTorch model's detections.

Also home of ``make_tiny_bundle``: a tiny random RetinaNet exported like deploy/ does (normalised ``images`` ->
``cls_logits``, ``bbox_regression``) with a manifest written through runtime.manifest; the other runtime tests
import it so they run before (and independently of) deploy/.
"""
from __future__ import annotations

import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.anchors import AnchorSpec
from runtime.detector import Detector
from runtime.atomic import write_json_atomic
from runtime.manifest import InputInfo, Manifest, OutputInfo, TensorRTInfo, describe_file, file_sha256, write_manifest
from runtime.postprocess import Detections, PostprocessSpec
from runtime.preprocess import PreprocessSpec, read_image, resize_image, to_training_array

DOTA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dota_samples" / "images"
if not DOTA.is_dir():
    DOTA = Path("/work/shared/data/dota_samples/images")
CLASSES = ("vehicle", "storagetank", "airplane", "ship", "tenniscourt")
SPEC = types.SimpleNamespace(arch="retinanet", backbone="resnet18", fpn_width=32, head_convs=1,
                             pretrained_backbone=False, norm="bn")


def tiny_retinanet(size: int, seed: int = 0, score_thresh: float = 0.05):
    """The project's RetinaNet (distill.models) with a small FPN, random weights spread so scores vary."""
    from distill.models.build import build_detector

    torch.manual_seed(seed)
    model = build_detector(SPEC, len(CLASSES), size, score_thresh=score_thresh, nms_thresh=0.5,
                           detections_per_img=100, topk_candidates=1000)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.2)
        torch.nn.init.constant_(model.head.classification_head.cls_logits.bias, -2.0)
        torch.nn.init.normal_(model.head.regression_head.bbox_reg.weight, std=0.05)
    return model.eval()


class _HeadOutputs(torch.nn.Module):
    """Backbone + FPN + head on a normalised batch: the graph deploy/ exports."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        from distill.models.backbones import fpn_features

        out = self.model.head(fpn_features(self.model, images))
        return out["cls_logits"], out["bbox_regression"]


def make_tiny_bundle(out_dir: Path, size: int = 128, seed: int = 0, dynamic_batch: bool = False,
                     score_thresh: float = 0.05, engine: bool = False, int8_copy: bool = False,
                     pipeline: str = "tiny"):
    """Export a tiny RetinaNet to ``out_dir`` as a bundle (model_fp32.onnx + manifest.json); returns the model.

    ``engine=True`` also registers a (fake) TensorRT engine file in engine.json (built on 'Orin', compute capability
    8.7, TensorRT 10.3.0.30), for the tests of the TensorRT path; ``int8_copy``
    lists a copy of the FP32 model as the INT8 one, for the tests of model selection.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_retinanet(size, seed, score_thresh)
    dynamic = {"images": {0: "batch"}, "cls_logits": {0: "batch"}, "bbox_regression": {0: "batch"}}
    # The TorchScript exporter restores the wrapper's train/eval mode afterwards, so the wrapper must be in eval.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter: fast, and enough for a fixture
        torch.onnx.export(_HeadOutputs(model).eval(), (torch.zeros(1, 3, size, size),),
                          str(out_dir / "model_fp32.onnx"), input_names=["images"],
                          output_names=["cls_logits", "bbox_regression"], opset_version=17,
                          dynamic_axes=dynamic if dynamic_batch else None, dynamo=False)
    files = {"model_fp32.onnx": describe_file(out_dir, "model_fp32.onnx", "onnx-fp32", "fp32")}
    if int8_copy:
        (out_dir / "model_int8.onnx").write_bytes((out_dir / "model_fp32.onnx").read_bytes())
        files["model_int8.onnx"] = describe_file(out_dir, "model_int8.onnx", "onnx-int8", "int8")
    trt = TensorRTInfo(major_expected=10, onnx_file="model_fp32.onnx", precision="fp32")
    if engine:
        (out_dir / "model.engine").write_bytes(b"not a real engine")
        write_json_atomic(out_dir / "engine.json", {
            "engine": {"file": "model.engine", "sha256": file_sha256(out_dir / "model.engine"), "size": 17},
            "onnx": {"file": "model_fp32.onnx", "sha256": files["model_fp32.onnx"].sha256},
            "tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7", "precision": "fp32"})
    generator = model.anchor_generator
    anchors = AnchorSpec(sizes=tuple(tuple(s) for s in generator.sizes),
                         aspect_ratios=tuple(generator.aspect_ratios[0]))
    manifest = Manifest(
        pipeline=pipeline, model_role="student", target="cpu", classes=CLASSES,
        input=InputInfo(shape=("batch" if dynamic_batch else 1, 3, size, size)),
        preprocess=PreprocessSpec(input_size=(size, size)),
        postprocess=PostprocessSpec(kind="retinanet", num_classes=len(CLASSES), anchors=anchors,
                                    score_thresh=score_thresh),
        outputs=(OutputInfo(name="cls_logits", meaning="class logits (B, A, C), levels P3..P7"),
                 OutputInfo(name="bbox_regression", meaning="box deltas (B, A, 4) against the anchors")),
        files=files, tensorrt=trt)
    write_manifest(out_dir, manifest)
    return model


def torch_detections(model, image: np.ndarray, size: int) -> Detections:
    """The PyTorch model's detections on an image, stretched to ``size`` like the runtime, in original pixels."""
    resized, _ = resize_image(image, PreprocessSpec(input_size=(size, size)))
    with torch.no_grad():
        out = model([torch.from_numpy(to_training_array(resized))])[0]
    height, width = image.shape[:2]
    # Undo the stretch independently of the runtime's Transform, so the test also checks that mapping.
    scale = np.array([width / size, height / size] * 2, np.float32)
    return Detections(out["boxes"].numpy() * scale, out["scores"].numpy(), out["labels"].numpy().astype(np.int64))


def assert_same_detections(ours: Detections, theirs: Detections, box_tol: float = 1e-3, score_tol: float = 1e-4):
    """Same number of detections, and each of theirs has one of ours with its label, box (px) and score."""
    assert len(ours) == len(theirs), f"{len(ours)} detections vs {len(theirs)}"
    free = np.ones(len(ours), bool)
    for box, score, label in zip(theirs.boxes, theirs.scores, theirs.labels):
        close = free & (ours.labels == label) & (np.abs(ours.scores - score) <= score_tol) \
            & (np.abs(ours.boxes - box).max(axis=1) <= box_tol)
        assert close.any(), f"no match for label {label} score {score:.5f} box {box}"
        free[np.flatnonzero(close)[0]] = False


def scene_crops() -> list[np.ndarray]:
    """Real remote-sensing content at sizes that are not the input size (so the resize and its inverse matter)."""
    scene = read_image(DOTA / "P0706.png")
    return [scene[100:340, 200:500], scene[600:760, 50:210], scene[:128, :128]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    model = make_tiny_bundle(root / "static", size=128)
    make_tiny_bundle(root / "dynamic", size=128, dynamic_batch=True)
    return model, root


def test_ort_detections_equal_pytorch(tiny):
    model, root = tiny
    with Detector(root / "static", backend="ort-cpu", threads=1) as det:
        for image in scene_crops():
            ours = det.detect([image])[0]
            theirs = torch_detections(model, image, 128)
            assert len(theirs) > 10  # the comparison must compare something
            assert_same_detections(ours, theirs)
            assert ours.boxes.dtype == np.float32 and ours.labels.dtype == np.int64


def test_batching_does_not_change_detections(tiny):
    """Dynamic batch (one call) and fixed batch 1 (padded chunks) give the same detections as one image at a time."""
    _, root = tiny
    images = scene_crops()
    with Detector(root / "static", backend="ort-cpu", threads=1) as single:
        one_by_one = [single.detect([im])[0] for im in images]
        fixed = single.detect(images)
    with Detector(root / "dynamic", backend="ort-cpu", threads=1, batch_size=2) as batched:
        together = batched.detect(images)
        assert batched.last_times.images == 3 and batched.last_times.infer > 0
    for a, b, c in zip(one_by_one, fixed, together):
        assert_same_detections(b, a, box_tol=1e-3, score_tol=1e-5)
        assert_same_detections(c, a, box_tol=1e-3, score_tol=1e-5)


def test_score_threshold_override_keeps_the_confident_ones(tiny):
    _, root = tiny
    image = scene_crops()[0]
    with Detector(root / "static", backend="ort-cpu", threads=1) as low:
        all_dets = low.detect([image])[0]
    with Detector(root / "static", backend="ort-cpu", threads=1, score_thresh=0.6) as high:
        confident = high.detect([image])[0]
        assert high.describe()["score_thresh"] == 0.6
    assert 0 < len(confident) < len(all_dets)
    assert (confident.scores > 0.6).all()


def test_graph_that_ends_in_detections(tmp_path):
    """Faster R-CNN-style bundles: boxes / scores / labels from the graph, mapped back to the original image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    boxes = np.array([[8, 16, 32, 48], [0, 0, 64, 64], [10, 10, 20, 20]], np.float32)
    scores = np.array([0.9, 0.5, 0.01], np.float32)
    labels = np.array([1, 3, 2], np.int64)  # torchvision numbers classes from 1 (0 = background)
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in
            (("boxes", TensorProto.FLOAT), ("scores", TensorProto.FLOAT), ("labels", TensorProto.INT64))]
    # Each output = constant + 0 * (something from the input), so the graph really consumes the image.
    nodes = [helper.make_node("ReduceSum", ["images"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.float32(0), "zero")]
    for name, value in (("boxes", boxes), ("scores", scores)):
        inits.append(numpy_helper.from_array(value, f"{name}_c"))
        nodes.append(helper.make_node("Add", [f"{name}_c", "z"], [name]))
    inits.append(numpy_helper.from_array(labels, "labels_c"))
    nodes.append(helper.make_node("Identity", ["labels_c"], ["labels"]))
    model = helper.make_model(helper.make_graph(nodes, "dets", [images], outs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "model_fp32.onnx")
    manifest = Manifest(
        pipeline="tiny", model_role="student", target="cpu", classes=CLASSES, input=InputInfo(shape=(1, 3, 64, 64)),
        preprocess=PreprocessSpec(input_size=(64, 64)),
        postprocess=PostprocessSpec(kind="detections", num_classes=len(CLASSES), label_offset=1),
        outputs=tuple(OutputInfo(name=n, meaning=n) for n in ("boxes", "scores", "labels")),
        files={"model_fp32.onnx": describe_file(tmp_path, "model_fp32.onnx", "onnx-fp32", "fp32")})
    write_manifest(tmp_path, manifest)
    with Detector(tmp_path, backend="ort-cpu", threads=1) as det:
        wide, tall = np.zeros((64, 128, 3), np.uint8), np.zeros((256, 64, 3), np.uint8)
        first, second = det.detect([wide, tall])
    np.testing.assert_allclose(first.boxes, boxes[:2] * np.array([2, 1, 2, 1], np.float32))
    np.testing.assert_allclose(second.boxes, boxes[:2] * np.array([1, 4, 1, 4], np.float32))
    np.testing.assert_array_equal(first.labels, [0, 2])  # the 0.01 detection is below the 0.05 threshold
