"""Bundle manifest: schema, atomic write, hash verification (a flipped byte is refused), engine compatibility."""
from __future__ import annotations

import json

import pytest

from runtime.anchors import AnchorSpec
from runtime.errors import UserError
from runtime.manifest import (MANIFEST_NAME, EngineInfo, InputInfo, Manifest, OutputInfo, TensorRTInfo,
                              check_engine_compat, describe_file, file_sha256, load_bundle, write_manifest)
from runtime.postprocess import PostprocessSpec
from runtime.preprocess import PreprocessSpec

CLASSES = ("airplane", "ship", "vehicle")


def make_bundle(root, engine: EngineInfo | None = None) -> Manifest:
    """A dummy bundle: two 'ONNX' files and optionally an 'engine', with a manifest describing them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_fp32.onnx").write_bytes(bytes(range(256)) * 40)
    (root / "model_int8.onnx").write_bytes(b"int8-model" * 100)
    files = {"model_fp32.onnx": describe_file(root, "model_fp32.onnx", "onnx-fp32", "fp32"),
             "model_int8.onnx": describe_file(root, "model_int8.onnx", "onnx-int8", "int8")}
    if engine is not None:
        (root / engine.file).write_bytes(b"plan")
        files[engine.file] = describe_file(root, engine.file, "engine", "int8")
    manifest = Manifest(
        pipeline="demo_retina", model_role="student", target="cpu", classes=CLASSES,
        input=InputInfo(shape=("batch", 3, 128, 128)),
        preprocess=PreprocessSpec(input_size=(128, 128)),
        postprocess=PostprocessSpec(kind="retinanet", num_classes=len(CLASSES), anchors=AnchorSpec()),
        outputs=(OutputInfo(name="cls_logits", meaning="(B, A, C) class logits, P3..P7 concatenated"),
                 OutputInfo(name="bbox_regression", meaning="(B, A, 4) box deltas (dx, dy, dw, dh)")),
        files=files, versions={"onnx": "1.x", "onnxruntime": "1.y"},
        tensorrt=TensorRTInfo(major_expected=10, engine=engine), notes="test bundle")
    write_manifest(root, manifest)
    return manifest


def test_round_trip_and_verify(tmp_path):
    manifest = make_bundle(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest == manifest
    assert bundle.path_for_role("onnx-int8") == tmp_path / "b" / "model_int8.onnx"
    assert [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".")] == []  # no temp file left
    text = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())
    assert text["files"]["model_fp32.onnx"]["sha256"] == file_sha256(tmp_path / "b" / "model_fp32.onnx")
    assert text["created"].startswith(str(manifest.created.year))


def test_flipped_byte_is_refused(tmp_path):
    make_bundle(tmp_path)
    path = tmp_path / "model_fp32.onnx"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256") as exc:
        load_bundle(tmp_path)
    line = exc.value.line()
    assert "model_fp32.onnx" in line and "\n" not in line
    assert load_bundle(tmp_path, verify=False).manifest.pipeline == "demo_retina"


def test_missing_or_truncated_file_is_refused(tmp_path):
    make_bundle(tmp_path)
    (tmp_path / "model_int8.onnx").write_bytes(b"short")
    with pytest.raises(UserError, match="size"):
        load_bundle(tmp_path)
    (tmp_path / "model_int8.onnx").unlink()
    with pytest.raises(UserError, match="missing") as exc:
        load_bundle(tmp_path)
    assert "model_int8.onnx" in str(exc.value)


def test_bad_manifest_files(tmp_path):
    with pytest.raises(UserError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(UserError, match="manifest not found"):
        load_bundle(tmp_path)
    make_bundle(tmp_path)
    path = tmp_path / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["surprise"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="surprise"):
        load_bundle(tmp_path)
    path.write_text("{ not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_schema_consistency_checks(tmp_path):
    manifest = make_bundle(tmp_path)
    base = manifest.model_dump()
    for change, message in [({"classes": ("a", "b")}, "num_classes"),
                            ({"input": {"shape": (1, 3, 64, 64)}}, "input_size"),
                            ({"files": {"../x.onnx": base["files"]["model_fp32.onnx"]}}, "relative"),
                            ({"model_role": "amplifier"}, "model_role")]:
        with pytest.raises(ValueError, match=message):
            Manifest.model_validate({**base, **change})


def test_engine_compatibility(tmp_path):
    engine = EngineInfo(file="model.engine", gpu_name="Orin (nvgpu)", trt_version="10.3.0.30")
    manifest = make_bundle(tmp_path, engine)
    check_engine_compat(manifest, "orin  (NVGPU)", "10.3.0.30")  # same GPU, same version: accepted
    check_engine_compat(manifest, "Orin (nvgpu)", "10.3")
    with pytest.raises(UserError, match="built for GPU 'Orin") as exc:
        check_engine_compat(manifest, "NVIDIA H100", "10.3.0.30")
    assert "model.engine" in exc.value.line()
    with pytest.raises(UserError, match="TensorRT 10.3.0.30"):
        check_engine_compat(manifest, "Orin (nvgpu)", "10.7.0")
    relaxed = manifest.model_copy(update={"tensorrt": TensorRTInfo(major_expected=10, engine=engine.model_copy(
        update={"version_compatible": True, "hardware_compatible": True}))})
    check_engine_compat(relaxed, "NVIDIA H100", "10.7.0")
    with pytest.raises(UserError, match="TensorRT"):
        check_engine_compat(relaxed, "NVIDIA H100", "11.0.0")
    with pytest.raises(UserError, match="TensorRT"):
        check_engine_compat(relaxed, "NVIDIA H100", "10.1.0")
    with pytest.raises(UserError, match="no TensorRT engine"):
        check_engine_compat(make_bundle(tmp_path / "plain"), "Orin (nvgpu)", "10.3.0.30")
