"""The deploy bundle's ``manifest.json``: schema, atomic writing, loading with hash verification, engine checks.

deploy/ writes a bundle (ONNX files, calibration cache, maybe a TensorRT engine) and this manifest next to them; the
runtime loads it, refuses files whose sha256 or size changed, and refuses an engine built for another GPU or
TensorRT version, each with one line that names the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.atomic import write_bytes_atomic
from runtime.errors import UserError
from runtime.postprocess import PostprocessSpec
from runtime.preprocess import PreprocessSpec

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
# Roles deploy/ uses today; any lower-case dashed name is accepted so new artifacts need no schema change.
KNOWN_ROLES = ("onnx-fp32", "onnx-fp16", "onnx-int8", "calib-cache", "calib-manifest", "engine", "timing-cache",
               "build-script", "build-log", "sensitivity", "readme")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputInfo(_Strict):
    """The network input tensor."""

    name: str = "images"
    shape: tuple[int | str, ...] = Field(description="e.g. (1, 3, 800, 800); a string marks a dynamic axis ('batch')")
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32", "float16"] = "float32"


class OutputInfo(_Strict):
    """One network output and what it holds."""

    name: str
    meaning: str
    shape: tuple[int | str, ...] | None = None


class FileEntry(_Strict):
    """A bundle file (keyed by its path relative to the bundle): hash, size, what it is."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    role: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description=f"e.g. {', '.join(KNOWN_ROLES)}")
    precision: Literal["fp32", "fp16", "int8", "mixed"] | None = None


class EngineInfo(_Strict):
    """A serialized TensorRT engine and what it was built for (engines only run there)."""

    file: str
    gpu_name: str
    trt_version: str
    compute_capability: str | None = None
    # TensorRT builder flags that relax the match: VERSION_COMPATIBLE (same major) / hardware compatibility (any GPU).
    version_compatible: bool = False
    hardware_compatible: bool = False


class TensorRTInfo(_Strict):
    """The TensorRT major version the target expects and the engine, if one was built."""

    major_expected: int | None = None
    engine: EngineInfo | None = None


class Manifest(_Strict):
    """Everything a runtime needs to run a bundle without the training code."""

    schema_version: Literal[1] = SCHEMA_VERSION
    pipeline: str
    model_role: Literal["student", "teacher"]
    target: str
    classes: tuple[str, ...] = Field(min_length=1)
    input: InputInfo
    preprocess: PreprocessSpec
    postprocess: PostprocessSpec
    outputs: tuple[OutputInfo, ...] = Field(min_length=1)
    files: dict[str, FileEntry]
    versions: dict[str, str] = Field(default_factory=dict)
    tensorrt: TensorRTInfo = Field(default_factory=TensorRTInfo)
    # Where non-maximum suppression runs: on the host (runtime.nms), in the graph as ONNX NonMaxSuppression, or in
    # the graph as TensorRT's EfficientNMS_TRT plugin (ONNX Runtime then stops at the plugin's inputs and the host
    # applies runtime.efficient_nms, the plugin's numpy reference).
    nms: Literal["host", "onnx-nms", "efficient-nms-trt"] = "host"
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0))
    notes: str = ""

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts or "\\" in name or name in ("", MANIFEST_NAME):
                raise ValueError(f"file key {name!r} must be a relative POSIX path inside the bundle")
        return files

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if self.postprocess.num_classes != len(self.classes):
            raise ValueError(f"postprocess.num_classes {self.postprocess.num_classes} != {len(self.classes)} classes")
        if tuple(self.input.shape[-2:]) != tuple(self.preprocess.input_size):
            raise ValueError(f"input.shape {self.input.shape} does not end in preprocess.input_size "
                             f"{self.preprocess.input_size}")
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate output names {names}")
        engine = self.tensorrt.engine
        if engine is not None and engine.file not in self.files:
            raise ValueError(f"tensorrt.engine.file {engine.file!r} is not listed in files")
        return self


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its directory and manifest."""

    root: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        """Absolute path of a file listed in the manifest."""
        if name not in self.manifest.files:
            raise UserError(f"{name!r} is not a file of this bundle", str(self.root / MANIFEST_NAME))
        return self.root / name

    def path_for_role(self, role: str) -> Path:
        """The one file with ``role`` (e.g. 'onnx-int8'); UserError naming the roles present when there is none."""
        names = [name for name, entry in self.manifest.files.items() if entry.role == role]
        if len(names) != 1:
            roles = sorted({e.role for e in self.manifest.files.values()})
            what = f"no file with role {role!r}" if not names else f"{len(names)} files with role {role!r}"
            raise UserError(f"bundle has {what} (it has {roles})", str(self.root / MANIFEST_NAME),
                            "rebuild the bundle with deploy.build for the wanted precision")
        return self.root / names[0]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe_file(bundle_dir: str | Path, name: str, role: str, precision: str | None = None) -> FileEntry:
    """FileEntry (sha256, size, role) of ``bundle_dir / name``, for building a manifest."""
    path = Path(bundle_dir) / name
    return FileEntry(sha256=file_sha256(path), size=path.stat().st_size, role=role, precision=precision)


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file in the same directory, then rename); return its path."""
    return write_bytes_atomic(Path(bundle_dir) / MANIFEST_NAME, (manifest.model_dump_json(indent=2) + "\n").encode())


def _validation_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {err['msg']}{more}"


def load_manifest(path: str | Path) -> Manifest:
    """Parse and validate a manifest.json; UserError with the key path on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError("bundle manifest not found", str(path), "point at a directory made by deploy.build")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise UserError(f"manifest is not valid JSON ({exc})", f"{path}{line}", "rebuild the bundle") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"invalid manifest: {_validation_line(exc)}", str(path), "rebuild the bundle") from None


def verify_files(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Check every listed file exists with its recorded size and sha256; UserError naming the first bad file."""
    bundle_dir = Path(bundle_dir)
    fix = "the bundle was modified or copied incompletely: copy it again or rebuild it with deploy.build"
    for name, entry in manifest.files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise UserError(f"bundle file missing ({entry.role})", str(path), fix)
        size = path.stat().st_size
        if size != entry.size:
            raise UserError(f"size {size} != {entry.size} recorded in the manifest ({entry.role})", str(path), fix)
        if file_sha256(path) != entry.sha256:
            raise UserError(f"sha256 does not match the manifest ({entry.role})", str(path), fix)


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> Bundle:
    """Load a bundle directory; with ``verify`` refuse it when a listed file is missing or its hash changed."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise UserError("bundle directory not found", str(bundle_dir),
                        "build one with `python -m deploy.build --target ...` (artifacts/<pipeline>/<target>/)")
    manifest = load_manifest(bundle_dir / MANIFEST_NAME)
    if verify:
        verify_files(bundle_dir, manifest)
    return Bundle(bundle_dir, manifest)


def _version(text: str) -> list[int]:
    """'10.3.0.30' -> [10, 3, 0, 30]; stops at the first non-numeric component ('10.0.1-rc' -> [10, 0])."""
    parts = []
    for part in text.strip().split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return parts


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def check_engine_compat(manifest: Manifest, gpu_name: str, trt_version: str) -> None:
    """Refuse (UserError) a bundle's engine built for another GPU or TensorRT version than this machine's."""
    engine = manifest.tensorrt.engine
    fix = "rebuild the engine on this device with the bundle's build_engine.sh"
    if engine is None:
        raise UserError("bundle has no TensorRT engine", manifest.target, fix)
    if not engine.hardware_compatible and _norm(engine.gpu_name) != _norm(gpu_name):
        raise UserError(f"engine was built for GPU '{engine.gpu_name}', this machine has '{gpu_name}'",
                        engine.file, fix)
    built, here = _version(engine.trt_version), _version(trt_version)
    if not built or not here:  # unparsable: only an identical string is safe
        same = _norm(engine.trt_version) == _norm(trt_version)
    elif engine.version_compatible:
        same = built[:1] == here[:1] and here >= built  # version-compatible engines run on same-major, newer runtimes
    else:
        n = min(len(built), len(here))  # "10.3" vs "10.3.0.30": compare the components both give
        same = built[:n] == here[:n]
    if not same:
        raise UserError(f"engine was built with TensorRT {engine.trt_version}, this machine has TensorRT {trt_version}",
                        engine.file, fix)
