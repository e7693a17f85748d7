"""Bundle manifest: schema, atomic write, hash verification (a flipped byte is refused); the engine record
(engine.json) verified on its own, and the compatibility rules TensorRT enforces."""
from __future__ import annotations

import json

import pytest

from runtime.anchors import AnchorSpec
from runtime.atomic import write_json_atomic
from runtime.errors import UserError
from runtime.manifest import (MANIFEST_NAME, DeviceIdentity, EngineRecord, InputInfo, Manifest, OutputInfo,
                              TensorRTInfo, check_engine_compat, describe_file, engine_mismatch, file_sha256,
                              load_bundle, write_manifest)
from runtime.postprocess import PostprocessSpec
from runtime.preprocess import PreprocessSpec

CLASSES = ("airplane", "ship", "vehicle")


def make_bundle(root) -> Manifest:
    """A dummy bundle: two 'ONNX' files with a manifest describing them (a TensorRT target's)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_fp32.onnx").write_bytes(bytes(range(256)) * 40)
    (root / "model_int8.onnx").write_bytes(b"int8-model" * 100)
    files = {"model_fp32.onnx": describe_file(root, "model_fp32.onnx", "onnx-fp32", "fp32"),
             "model_int8.onnx": describe_file(root, "model_int8.onnx", "onnx-int8", "int8")}
    manifest = Manifest(
        pipeline="demo_retina", model_role="student", target="cpu", classes=CLASSES,
        input=InputInfo(shape=("batch", 3, 128, 128)),
        preprocess=PreprocessSpec(input_size=(128, 128)),
        postprocess=PostprocessSpec(kind="retinanet", num_classes=len(CLASSES), anchors=AnchorSpec()),
        outputs=(OutputInfo(name="cls_logits", meaning="(B, A, C) class logits, P3..P7 concatenated"),
                 OutputInfo(name="bbox_regression", meaning="(B, A, 4) box deltas (dx, dy, dw, dh)")),
        files=files, versions={"onnx": "1.x", "onnxruntime": "1.y"},
        tensorrt=TensorRTInfo(major_expected=10, onnx_file="model_int8.onnx", precision="int8"), notes="test bundle")
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


def register(root, **fields) -> dict:
    """Write model.engine and an engine.json describing it (as engine_record.py register does on the device)."""
    (root / "model.engine").write_bytes(b"plan bytes")
    record = {"schema_version": 1,
              "engine": {"file": "model.engine", "sha256": file_sha256(root / "model.engine"), "size": 10},
              "onnx": {"file": "model_int8.onnx", "sha256": file_sha256(root / "model_int8.onnx")},
              "tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7", "precision": "int8",
              **fields}
    write_json_atomic(root / "engine.json", record)
    return record


def test_engine_is_found_through_its_record_and_verified_on_its_own(tmp_path):
    manifest = make_bundle(tmp_path)
    assert load_bundle(tmp_path).engine is None
    (tmp_path / "model.engine").write_bytes(b"built but never registered")
    bundle = load_bundle(tmp_path)
    assert bundle.engine is None and bundle.unregistered_engine == "model.engine"
    with pytest.raises(UserError, match="no registered TensorRT engine"):
        bundle.engine_path()
    register(tmp_path)
    bundle = load_bundle(tmp_path)
    assert bundle.engine.gpu_name == "Orin" and bundle.engine_path() == tmp_path / "model.engine"
    assert "model.engine" not in manifest.files  # the manifest predates the engine; its hashes are untouched
    (tmp_path / "model.engine").write_bytes(b"plan bytez")  # same size, other bytes: tampered
    with pytest.raises(UserError, match="does not match the sha256 registered in engine.json") as exc:
        load_bundle(tmp_path)
    assert "model.engine" in exc.value.line() and "build_engine.sh" in exc.value.line()
    (tmp_path / "model.engine").unlink()
    with pytest.raises(UserError, match="missing"):
        load_bundle(tmp_path)


def test_engine_built_from_another_onnx_is_refused(tmp_path):
    make_bundle(tmp_path)
    record = register(tmp_path)
    record["onnx"]["sha256"] = "0" * 64
    write_json_atomic(tmp_path / "engine.json", record)
    with pytest.raises(UserError, match="not this bundle's"):
        load_bundle(tmp_path)
    (tmp_path / "engine.json").write_text("{ half written")
    with pytest.raises(UserError, match="engine record is not valid JSON"):
        load_bundle(tmp_path)
    write_json_atomic(tmp_path / "engine.json", {**register(tmp_path), "compute_capability": "eight"})
    with pytest.raises(UserError, match="invalid engine record: compute_capability"):
        load_bundle(tmp_path)


ORIN = DeviceIdentity("Orin", "8.7", "10.3.0.30")


def record(**fields) -> EngineRecord:
    base = {"engine": {"file": "model.engine", "sha256": "a" * 64, "size": 1},
            "onnx": {"file": "model_int8.onnx", "sha256": "b" * 64},
            "tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7", "precision": "int8"}
    return EngineRecord.model_validate({**base, **fields})


@pytest.mark.parametrize(("here", "problem"), [
    (ORIN, None),
    (DeviceIdentity("orin ", "8.7", "10.3.0.30"), None),  # spacing and case of the name do not matter
    (DeviceIdentity("Orin", "8.7", "10.3.0.31"), "TensorRT versions differ"),
    (DeviceIdentity("Orin", "8.7", "10.3.0"), "TensorRT versions differ"),  # exact: no prefix match
    (DeviceIdentity("Orin", "8.7", "10.3"), "TensorRT versions differ"),
    (DeviceIdentity("Orin", "8.6", "10.3.0.30"), "compute capabilities differ"),
    (DeviceIdentity("NVIDIA RTX A4000", "8.7", "10.3.0.30"), "GPU models differ"),
])
def test_engine_needs_the_exact_tensorrt_and_gpu(here, problem):
    found = engine_mismatch(record(), here)
    if problem is None:
        assert found is None
        check_engine_compat(record(), here)
        return
    assert problem in found
    # one line naming both sides
    assert "TensorRT 10.3.0.30 on Orin (compute capability 8.7)" in found and here.describe() in found
    with pytest.raises(UserError) as exc:
        check_engine_compat(record(), here)
    assert "\n" not in exc.value.line() and "build_engine.sh" in exc.value.line()


def test_compatibility_flags_relax_exactly_what_tensorrt_relaxes():
    versioned = record(version_compatible=True)
    assert engine_mismatch(versioned, DeviceIdentity("Orin", "8.7", "10.7.0.23")) is None  # newer, same major
    assert "version-compatible" in engine_mismatch(versioned, DeviceIdentity("Orin", "8.7", "10.1.0.27"))  # older
    assert engine_mismatch(versioned, DeviceIdentity("Orin", "8.7", "11.0.0.1")) is None  # TensorRT 10 -> 11
    assert "version-compatible" in engine_mismatch(record(version_compatible=True, tensorrt_version="11.1.0.1"),
                                                  DeviceIdentity("Orin", "8.7", "12.0.0.1"))
    ampere = record(hardware_compatibility="ampere+", gpu_name="NVIDIA A100", compute_capability="8.0")
    assert engine_mismatch(ampere, DeviceIdentity("NVIDIA H100", "9.0", "10.3.0.30")) is None
    assert "8.0 or later" in engine_mismatch(ampere, DeviceIdentity("Tesla T4", "7.5", "10.3.0.30"))
    same_cc = record(hardware_compatibility="sameComputeCapability", gpu_name="NVIDIA RTX A4000",
                     compute_capability="8.6")
    assert engine_mismatch(same_cc, DeviceIdentity("NVIDIA RTX A2000", "8.6", "10.3.0.30")) is None
    assert "compute capabilities differ" in engine_mismatch(same_cc, DeviceIdentity("NVIDIA L4", "8.9", "10.3.0.30"))
