"""The deploy bundle on disk: written atomically, described by runtime.manifest, reused when nothing changed.

A bundle is built in a temporary sibling directory; only when every file and ``manifest.json`` (sha256 of each file)
are written is it renamed into place, so readers see the old bundle or the new one, never a half-written one.
A failed build's files move (or, when the build falls back to another precision, are copied) under ``failed/`` for
inspection. A TensorRT engine built later on the device is not part of the manifest: ``build_engine.sh`` registers
it in ``engine.json``, verified on its own by runtime.manifest.load_bundle. ``build_info.json`` records the hash of
everything that went in (checkpoint bytes, target, config sections, options, deploy code, tool versions): the
next build with the same hash reuses the bundle after re-checking its files.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from runtime.errors import UserError
from runtime.manifest import (
    InputInfo,
    Manifest,
    OutputInfo,
    TensorRTInfo,
    describe_file,
    file_sha256,
    load_bundle,
    write_manifest,
)

BUILD_INFO = "build_info.json"
ROOT = Path(__file__).resolve().parent.parent
# Code whose change alters what a build writes: the deploy chain and the runtime pieces baked into the bundle.
HASHED_CODE = ("deploy", "distill/models", "distill/checkpoint.py", "runtime/preprocess.py", "runtime/postprocess.py",
               "runtime/anchors.py", "runtime/nms.py", "runtime/efficient_nms.py", "runtime/manifest.py",
               "runtime/engine_record.py", "runtime/tiling.py", "runtime/detector.py", "runtime/boxes.py",
               "runtime/metrics", "runtime/data/coco.py", "runtime/data/images.py")
PACKAGES = {"torch": "torch", "torchvision": "torchvision", "onnx": "onnx", "onnxruntime": "onnxruntime",
            "onnxruntime-gpu": "onnxruntime-gpu", "onnxslim": "onnxslim", "polygraphy": "polygraphy",
            "modelopt": "nvidia-modelopt", "tensorrt": "tensorrt", "numpy": "numpy"}
OUTPUT_MEANINGS = {
    "cls_logits": "class logits (B, A, C) per anchor, FPN levels finest first in runtime.anchors order; sigmoid = score",
    "bbox_regression": "box deltas (dx, dy, dw, dh) (B, A, 4) against the anchors, BoxCoder weights (1, 1, 1, 1)",
    "boxes": "detections' xyxy boxes (N, 4) in network-input pixels",
    "scores": "detections' scores (N,)",
    "labels": "detections' class indices (N,) (minus postprocess.label_offset = index into classes)",
    "num_detections": "valid detections per image (B, 1) int32: the first n slots of the outputs below",
    "detection_boxes": "xyxy boxes (B, max_detections, 4) in network-input pixels, zeros past num_detections",
    "detection_scores": "scores (B, max_detections), sigmoid of the class logit",
    "detection_classes": "class indices (B, max_detections) int32 (minus postprocess.label_offset)",
}


def versions() -> dict[str, str]:
    """Installed versions of the packages a bundle depends on ('not installed' where missing)."""
    found = {"python": platform.python_version()}
    for key, dist in PACKAGES.items():
        try:
            found[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if key != "onnxruntime-gpu":
                found.setdefault(key, "not installed")
    if "onnxruntime-gpu" in found and found.get("onnxruntime") == "not installed":
        found["onnxruntime"] = found.pop("onnxruntime-gpu")
    return found


def code_hash() -> str:
    """sha256 over the deploy code and the runtime modules whose behaviour is baked into a bundle."""
    digest = hashlib.sha256()
    for item in HASHED_CODE:
        path = ROOT / item
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(file.relative_to(ROOT).as_posix().encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()


def input_hash(checkpoint: Path, settings: dict[str, Any]) -> str:
    """Hash of everything a bundle is made from: checkpoint bytes, settings (JSON), code and tool versions."""
    payload = {"checkpoint": file_sha256(checkpoint), "settings": settings, "code": code_hash(),
               "versions": {k: v for k, v in versions().items() if k != "python"}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def reusable(bundle_dir: Path, wanted_hash: str) -> bool:
    """True when `bundle_dir` holds a bundle built from the same inputs whose files all still verify."""
    info_path = bundle_dir / BUILD_INFO
    if not info_path.is_file():
        return False
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("input_hash") != wanted_hash:
            return False
        load_bundle(bundle_dir, verify=True)  # every listed file, and a registered engine against engine.json
    except (UserError, ValueError, OSError):
        return False  # a damaged bundle is rebuilt, not reused
    return True


class BundleWriter:
    """Collects a bundle's files in a temporary sibling directory; `commit` renames it into place atomically.

    Used as a context manager: leaving the block without a commit (an exception) removes the temporary directory,
    unless `keep_failed` moved it under ``failed/`` first.
    """

    def __init__(self, final_dir: Path):
        self.final = Path(final_dir)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.roles: dict[str, tuple[str, str | None]] = {}

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name: str, role: str | None = None, precision: str | None = None) -> Path:
        """Where to write file `name`; with `role` it is listed (and hashed) in the manifest."""
        if role is not None:
            self.roles[name] = (role, precision)
        return self.tmp / name

    def write_text(self, name: str, text: str, role: str, mode: int = 0o644) -> Path:
        """Write a text file into the bundle and list it."""
        path = self.path(name, role)
        path.write_text(text, encoding="utf-8")
        os.chmod(path, mode)
        return path

    def write_json(self, name: str, data: Any, role: str) -> Path:
        """Write a JSON file into the bundle and list it."""
        return self.write_text(name, json.dumps(data, indent=2, default=str) + "\n", role)

    def keep_failed(self, failed_dir: Path, move: bool = True) -> Path:
        """Move (or copy, when the build goes on with a fallback) what was written so far to `failed_dir`,
        replacing an older failure; return it."""
        failed_dir.parent.mkdir(parents=True, exist_ok=True)
        if failed_dir.exists():
            shutil.rmtree(failed_dir)
        if move:
            os.replace(self.tmp, failed_dir)
        else:
            shutil.copytree(self.tmp, failed_dir)
        return failed_dir

    def drop(self, name: str) -> None:
        """Remove a file written earlier (and its manifest listing), e.g. an INT8 model that failed its gate."""
        self.roles.pop(name, None)
        (self.tmp / name).unlink(missing_ok=True)

    def commit(self, **manifest_fields: Any) -> Manifest:
        """Hash every listed file, write manifest.json, then swap the directory into place."""
        files = {name: describe_file(self.tmp, name, role, precision)
                 for name, (role, precision) in sorted(self.roles.items())}
        manifest = Manifest(files=files, versions=versions(), **manifest_fields)
        write_manifest(self.tmp, manifest)
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, old)  # a directory cannot be renamed over a non-empty one: step it aside
        try:
            os.replace(self.tmp, self.final)
        except OSError:
            if old is not None:  # put the last good bundle back before reporting the failure
                os.replace(old, self.final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest


def manifest_fields(pipeline: str, role: str, target: str, classes: list[str], preprocess: Any, postprocess: Any,
                    output_names: tuple[str, ...], input_shape: tuple, plan: Any = None,
                    notes: str = "") -> dict[str, Any]:
    """The manifest's fields other than files and versions (which BundleWriter.commit adds); ``plan`` is the
    deploy.tensorrt.EnginePlan of a TensorRT target (None for ONNX Runtime targets)."""
    trt = TensorRTInfo(major_expected=plan.trt_major, onnx_file=plan.onnx_file, precision=plan.precision) \
        if plan is not None else TensorRTInfo(build_script=None, bench_script=None)
    return {
        "pipeline": pipeline, "model_role": role, "target": target, "classes": tuple(classes),
        "input": InputInfo(shape=tuple(input_shape)), "preprocess": preprocess, "postprocess": postprocess,
        "outputs": tuple(OutputInfo(name=n, meaning=OUTPUT_MEANINGS[n]) for n in output_names),
        "tensorrt": trt, "notes": notes,
    }


def readme(pipeline: str, role: str, target: str, description: str, files: dict[str, str], gate: dict | None,
           engine_note: str) -> str:
    """A short README.md: what the bundle is, its files, the accuracy gate, how to get an engine."""
    lines = [f"# {pipeline} / {target} / {role}", "", description or "", "",
             "Written by `python -m deploy.build`; `python -m deploy.verify <this directory>` re-checks it.",
             "Pre- and post-processing are described in manifest.json and implemented in runtime/ "
             "(runtime.preprocess, runtime.postprocess); `runtime.manifest.load_bundle` loads and verifies it.", "",
             "## Files", ""]
    lines += [f"- `{name}`: {what}" for name, what in files.items()]
    if gate and gate.get("int8"):
        lines += ["", "## INT8 accuracy gate (ONNX Runtime CPU, test split)", "",
                  f"AP50 FP32 {100 * gate['fp32']['AP50']:.2f}, INT8 {100 * gate['int8']['AP50']:.2f}: "
                  f"drop {gate['drop_ap50']:.2f} points (limit {gate['limit']:g}) on {gate['fp32']['images']} images."]
        if gate.get("kept_float_groups"):
            lines.append(f"Kept in float after the sensitivity pass: {', '.join(gate['kept_float_groups'])}.")
        if gate.get("shipped", "int8") != "int8":
            lines.append(f"**INT8 failed the gate: this bundle ships {gate['shipped'].upper()} instead** (the INT8 "
                         "attempt and its sensitivity table are kept under `../failed/`; `sensitivity.json` here too).")
    elif gate:
        lines += ["", "## Reference accuracy (ONNX Runtime CPU, test split)", "",
                  f"AP50 FP32 {100 * gate['fp32']['AP50']:.2f} on {gate['fp32']['images']} images (no INT8 model)."]
    lines += ["", "## TensorRT engine", "", engine_note, ""]
    return "\n".join(lines)
