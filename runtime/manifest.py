"""The deploy bundle's ``manifest.json``: schema, atomic writing, loading with hash verification, engine checks.

deploy/ writes a bundle (ONNX files, calibration list, build scripts) and this manifest next to them; the runtime
loads it and refuses files whose sha256 or size changed. A TensorRT engine, built later on the device, is registered
in its own sidecar (``engine.json``, written by :mod:`runtime.engine_record`), verified here on its own; an engine
built for another GPU or TensorRT version is refused with one line naming both sides.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.atomic import write_bytes_atomic
from runtime.engine_record import RECORD_NAME, file_sha256
from runtime.errors import UserError
from runtime.postprocess import PostprocessSpec
from runtime.preprocess import PreprocessSpec

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
# Roles deploy/ uses today; any lower-case dashed name is accepted so new artifacts need no schema change.
KNOWN_ROLES = ("onnx-fp32", "onnx-fp16", "onnx-int8", "calib-cache", "calib-manifest", "build-script",
               "bench-script", "engine-tool", "sensitivity", "readme")


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


class TensorRTInfo(_Strict):
    """What a TensorRT target needs to build its engine on the device; the engine itself is registered apart.

    An engine is built where it runs (``build_engine.sh``), after this manifest was written, so it is never listed in
    ``files``: ``build_engine.sh`` registers it in the ``record`` sidecar (``engine.json``, see
    :mod:`runtime.engine_record`), which :func:`load_bundle` verifies on its own.
    """

    major_expected: int | None = None
    onnx_file: str | None = Field(None, description="the bundle's ONNX file build_engine.sh builds the engine from")
    precision: Literal["fp32", "fp16", "int8"] | None = None
    build_script: str | None = "build_engine.sh"
    bench_script: str | None = "bench_engine.sh"
    record: str = RECORD_NAME


class EngineFile(_Strict):
    """The serialized engine a record describes."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class EngineSource(_Strict):
    """The bundle ONNX file the engine was built from."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class EngineRecord(_Strict):
    """``engine.json``: what build_engine.sh built, where, with which TensorRT and flags (runtime.engine_record)."""

    schema_version: Literal[1] = 1
    engine: EngineFile
    onnx: EngineSource
    tensorrt_version: str = Field(pattern=r"^\d+(\.\d+)*$")
    tensorrt_version_source: str = ""
    gpu_name: str = Field(min_length=1)
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    precision: Literal["fp32", "fp16", "int8"]
    strongly_typed: bool = False
    dla_core: int | None = Field(None, ge=0)
    gpu_fallback: bool = False
    version_compatible: bool = False
    hardware_compatibility: Literal["none", "ampere+", "sameComputeCapability"] = "none"
    input_shapes: dict[str, list[int] | None] | None = None
    build_command: list[str] = Field(default_factory=list)
    built_at: str = ""
    built_on: str = ""
    deserialized_after_build: bool = False


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
        onnx = self.tensorrt.onnx_file
        if onnx is not None and onnx not in self.files:
            raise ValueError(f"tensorrt.onnx_file {onnx!r} is not listed in files")
        return self


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its directory, manifest, and the registered TensorRT engine (None when there is none)."""

    root: Path
    manifest: Manifest
    engine: EngineRecord | None = None
    unregistered_engine: str | None = None  # an engine file lies there but engine.json does not describe it

    def engine_path(self) -> Path:
        """Absolute path of the registered engine; UserError when none is registered."""
        if self.engine is None:
            raise UserError("bundle has no registered TensorRT engine (no engine.json)", str(self.root),
                            "build it on the device with the bundle's ./build_engine.sh, or use --backend ort-cpu")
        return self.root / self.engine.engine.file

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
    """Load a bundle directory; with ``verify`` refuse it when a listed file is missing or its hash changed, or when
    the registered engine (engine.json) does not match its engine file or the bundle's ONNX."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise UserError("bundle directory not found", str(bundle_dir),
                        "build one with `python -m deploy.build --target ...` (artifacts/<pipeline>/<target>/)")
    manifest = load_manifest(bundle_dir / MANIFEST_NAME)
    if verify:
        verify_files(bundle_dir, manifest)
    record = load_engine_record(bundle_dir, manifest, verify)
    stray = None
    if record is None:
        engines = sorted(p.name for p in bundle_dir.glob("*.engine"))
        stray = engines[0] if engines else None
    return Bundle(bundle_dir, manifest, record, stray)


def load_engine_record(bundle_dir: str | Path, manifest: Manifest, verify: bool = True) -> EngineRecord | None:
    """The bundle's engine.json, validated; with ``verify`` its engine's sha256 and its ONNX source are checked.

    The record is verified on its own (the manifest predates the engine): the engine must be the file it hashed,
    and the ONNX it was built from must be this bundle's (same sha256 as in the manifest).
    """
    path = Path(bundle_dir) / manifest.tensorrt.record
    if not path.is_file():
        return None
    fix = "run the bundle's ./build_engine.sh again on this device"
    try:
        record = EngineRecord.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"engine record is not valid JSON ({exc})", str(path), fix) from None
    except ValidationError as exc:
        raise UserError(f"invalid engine record: {_validation_line(exc)}", str(path), fix) from None
    if not verify:
        return record
    engine = Path(bundle_dir) / record.engine.file
    if not engine.is_file():
        raise UserError(f"engine registered in {path.name} is missing", str(engine), fix)
    if engine.stat().st_size != record.engine.size or file_sha256(engine) != record.engine.sha256:
        raise UserError(f"engine does not match the sha256 registered in {path.name} (modified, or rebuilt without "
                        "registering)", str(engine), fix)
    source = manifest.files.get(record.onnx.file)
    if source is None or source.sha256 != record.onnx.sha256:
        raise UserError(f"engine was built from a {record.onnx.file} that is not this bundle's (sha256 differs from "
                        "manifest.json)", str(engine), fix)
    return record


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


# Majors whose version-compatible engines a later major's runtime loads (TensorRT support matrix).
CROSS_MAJOR_VERSION_COMPATIBLE = {(8, 9), (8, 10), (10, 11)}


@dataclass(frozen=True)
class DeviceIdentity:
    """What decides whether an engine runs here: the GPU (name, compute capability) and TensorRT's version."""

    gpu_name: str
    compute_capability: str
    trt_version: str

    def describe(self) -> str:
        """'TensorRT 10.3.0.30 on Orin (compute capability 8.7)'."""
        return f"TensorRT {self.trt_version} on {self.gpu_name} (compute capability {self.compute_capability})"


def engine_mismatch(record: EngineRecord, here: DeviceIdentity) -> str | None:
    """Why TensorRT would refuse ``record``'s engine on ``here`` (one line naming both sides), or None if it runs.

    Without version compatibility TensorRT needs the identical version (major, minor, patch and build); with it, the
    same or a newer release of the same major (or a supported next major). Without hardware compatibility the engine
    runs only on the GPU model it was built on; ``sameComputeCapability`` relaxes that to the compute capability and
    ``ampere+`` to any GPU of compute capability 8.0 or later.
    """
    built = DeviceIdentity(record.gpu_name, record.compute_capability, record.tensorrt_version)
    problems = []
    have, want = _version(here.trt_version), _version(built.trt_version)
    if record.version_compatible:
        pair = (want[:1] + [0])[0], (have[:1] + [0])[0]
        ok = have >= want and (pair[0] == pair[1] or pair in CROSS_MAJOR_VERSION_COMPATIBLE)
        if not ok:
            problems.append("a version-compatible engine needs the same or a newer TensorRT of a compatible major")
    elif not have or have != want:
        problems.append("TensorRT versions differ (an engine needs the exact version it was built with)")
    cc_here, cc_built = _version(here.compute_capability), _version(built.compute_capability)
    if record.hardware_compatibility == "ampere+":
        if not cc_here or cc_here[0] < 8:
            problems.append("an ampere+ engine needs compute capability 8.0 or later")
    elif cc_here != cc_built:
        problems.append("compute capabilities differ")
    elif record.hardware_compatibility == "none" and _norm(here.gpu_name) != _norm(built.gpu_name):
        problems.append("GPU models differ (the engine was not built hardware-compatible)")
    if not problems:
        return None
    return f"engine built with {built.describe()}, this machine has {here.describe()}: {'; '.join(problems)}"


def check_engine_compat(record: EngineRecord, here: DeviceIdentity) -> None:
    """Refuse (UserError naming both sides) an engine that TensorRT would not run on this machine."""
    problem = engine_mismatch(record, here)
    if problem is not None:
        raise UserError(problem, record.engine.file,
                        "rebuild the engine on this device with the bundle's ./build_engine.sh, or use "
                        "--backend ort-cpu / ort-cuda")
