"""Bundles on disk: atomic replacement, manifest hashes that catch a flipped byte, reuse only when nothing changed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.bundle import BUILD_INFO, BundleWriter, input_hash, manifest_fields, reusable, versions
from runtime.anchors import AnchorSpec
from runtime.errors import UserError
from runtime.manifest import load_bundle
from runtime.postprocess import PostprocessSpec
from runtime.preprocess import PreprocessSpec


def fields() -> dict:
    post = PostprocessSpec(kind="retinanet", num_classes=2, anchors=AnchorSpec())
    return manifest_fields("demo", "student", "cpu", ["ship", "plane"], PreprocessSpec(input_size=(64, 64)), post,
                           ("cls_logits", "bbox_regression"), (1, 3, 64, 64), None)


def write_bundle(final: Path, payload: bytes = b"onnx-bytes", info_hash: str = "h1") -> None:
    with BundleWriter(final) as bundle:
        bundle.path("model_fp32.onnx", "onnx-fp32", "fp32").write_bytes(payload)
        bundle.write_json(BUILD_INFO, {"input_hash": info_hash, "summary": {}}, "build-info")
        bundle.commit(**fields())


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_commit_writes_a_verifiable_bundle(tmp_path):
    final = tmp_path / "demo" / "cpu"
    write_bundle(final)
    bundle = load_bundle(final, verify=True)
    assert set(bundle.manifest.files) == {"model_fp32.onnx", BUILD_INFO}
    assert bundle.manifest.files["model_fp32.onnx"].role == "onnx-fp32"
    assert {"torch", "onnx", "onnxruntime", "modelopt", "tensorrt"} <= set(bundle.manifest.versions)
    assert leftovers(final.parent) == []


def test_flipped_byte_is_caught(tmp_path):
    final = tmp_path / "cpu"
    write_bundle(final, payload=bytes(range(256)))
    target = final / "model_fp32.onnx"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 does not match") as err:
        load_bundle(final, verify=True)
    assert "model_fp32.onnx" in err.value.line()
    assert not reusable(final, "h1")  # a damaged bundle is rebuilt, never reused


def test_failure_leaves_nothing_behind(tmp_path):
    final = tmp_path / "cpu"
    with pytest.raises(RuntimeError), BundleWriter(final) as bundle:
        bundle.path("model_fp32.onnx", "onnx-fp32").write_bytes(b"half")
        raise RuntimeError("export crashed")
    assert not final.exists() and leftovers(tmp_path) == []


def test_failed_build_is_kept_under_failed(tmp_path):
    final = tmp_path / "cpu"
    with pytest.raises(UserError), BundleWriter(final) as bundle:
        bundle.path("fidelity.json", "fidelity").write_text("{}")
        kept = bundle.keep_failed(tmp_path / "failed" / "cpu")
        raise UserError("export mismatch")
    assert (kept / "fidelity.json").is_file() and not final.exists() and leftovers(tmp_path) == []


def test_rebuild_replaces_the_old_bundle_whole(tmp_path):
    final = tmp_path / "cpu"
    write_bundle(final, b"old")
    (final / "stray.txt").write_text("from the old bundle")
    write_bundle(final, b"new", info_hash="h2")
    assert (final / "model_fp32.onnx").read_bytes() == b"new" and not (final / "stray.txt").exists()
    assert reusable(final, "h2") and not reusable(final, "h1")
    assert leftovers(tmp_path) == []


def test_input_hash_follows_checkpoint_and_settings(tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    base = input_hash(ckpt, {"target": "cpu"})
    assert input_hash(ckpt, {"target": "cpu"}) == base
    assert input_hash(ckpt, {"target": "jetson"}) != base
    ckpt.write_bytes(b"weights2")
    assert input_hash(ckpt, {"target": "cpu"}) != base


def test_manifest_describes_outputs_and_preprocessing(tmp_path):
    final = tmp_path / "cpu"
    write_bundle(final)
    data = json.loads((final / "manifest.json").read_text())
    assert [o["name"] for o in data["outputs"]] == ["cls_logits", "bbox_regression"]
    assert all(o["meaning"] for o in data["outputs"])
    assert data["preprocess"]["mean"] == [0.485, 0.456, 0.406] and data["input"]["layout"] == "NCHW"
    assert data["postprocess"]["anchors"]["strides"] == [8, 16, 32, 64, 128]
    assert versions()["python"]
