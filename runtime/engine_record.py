"""Engine registration: ``engine.json``, the sidecar that says what ``build_engine.sh`` built, and its timing summary.

A TensorRT engine is built on the device, after the bundle (and its manifest) was written elsewhere, so the engine
cannot be listed in ``manifest.json``. Instead the bundle's ``build_engine.sh`` ends with ``engine_record.py
register``, which writes ``engine.json`` atomically: the engine's sha256 and size, the ONNX file it was built from
(with its sha256, which must equal the manifest's), the TensorRT version, GPU name and compute capability of the
device that built it, the exact trtexec command, and whether the engine is version- or hardware-compatible.
``bench_engine.sh`` ends with ``engine_record.py timing``, which condenses trtexec's ``--exportTimes`` /
``--exportProfile`` JSON into ``engine_timing.json``, tied to the engine's sha256.

This file is copied verbatim into every TensorRT bundle and runs there as a script: it imports only the standard
library (and, when present, TensorRT's Python bindings to deserialize the engine once) and runs on Python 3.8+,
because a device may have nothing but JetPack's python3 (3.10 on JetPack 6). ``runtime.manifest`` validates and
checks what it writes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RECORD_NAME = "engine.json"
TIMING_NAME = "engine_timing.json"
# What bench_engine.sh captures of the device while trtexec times the engine (runtime.bench parses both).
TEGRASTATS_LOG, CONDITIONS_LOG = "engine_tegrastats.log", "engine_conditions.log"
SCHEMA_VERSION = 1
EXIT_USER_ERROR = 2
# trt.HardwareCompatibilityLevel member -> trtexec's --hardwareCompatibilityLevel spelling
_LEVELS = {"NONE": "none", "AMPERE_PLUS": "ampere+", "SAME_COMPUTE_CAPABILITY": "sameComputeCapability"}


class RecordError(Exception):
    """A problem the user can fix (missing file, failed build log, version mismatch): one line, exit status 2."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, streamed (the project's one sha256)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        # a loop rather than hashlib.file_digest (Python 3.11): JetPack 6's python3 is 3.10
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write JSON under a temporary name in the same directory, fsync, rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- trtexec's own output ------------------------------------------------------------------------------------------

def _banner_version(text: str) -> str | None:
    """'[TensorRT v100300] [b30]' (trtexec's first line) -> '10.3.0.30'; TensorRT 8 writes v8601 for 8.6.1."""
    match = re.search(r"\[TensorRT v(\d+)\](?:\s*\[b(\d+)\])?", text)
    if not match:
        return None
    code, build = int(match.group(1)), match.group(2)
    if code >= 10000:  # TensorRT >= 10: MAJOR * 10000 + MINOR * 100 + PATCH
        parts = [code // 10000, code // 100 % 100, code % 100]
    else:  # TensorRT 8: MAJOR * 1000 + MINOR * 100 + PATCH
        parts = [code // 1000, code // 100 % 10, code % 100]
    return ".".join(str(p) for p in parts + ([int(build)] if build else []))


def parse_trtexec_log(text: str) -> dict[str, Any]:
    """What trtexec says about itself and the GPU: version (banner and 'TensorRT version:'), device, compute
    capability, whether it PASSED, and the performance summary's throughput when present."""
    def field(label: str) -> str | None:
        match = re.search(rf"\] {re.escape(label)}: ([^\n]*)", text) or re.search(rf"^{re.escape(label)}: ([^\n]*)",
                                                                                 text, re.MULTILINE)
        return match.group(1).strip() if match else None

    throughput = field("Throughput")
    return {
        "banner_version": _banner_version(text),
        "tensorrt_version": field("TensorRT version"),
        "gpu_name": field("Selected Device"),
        "compute_capability": field("Compute Capability"),
        "passed": bool(re.search(r"^&&&& PASSED", text, re.MULTILINE)),
        "failed": bool(re.search(r"^&&&& FAILED", text, re.MULTILINE)),
        "throughput_qps": float(throughput.split()[0]) if throughput else None,
    }


def _flag(argv: list[str], name: str) -> str | None:
    """Value of --name=value in an argv, '' for a bare --name, None when absent."""
    for arg in argv:
        if arg == name:
            return ""
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _shape(spec: str | None, tensor: str) -> list[int] | None:
    """'images:4x3x64x64' -> [4, 3, 64, 64] for the named tensor of a trtexec shape spec."""
    if not spec:
        return None
    for item in spec.split(","):
        name, _, dims = item.rpartition(":")
        if name.strip("'\"") == tensor:
            return [int(d) for d in dims.split("x")]
    return None


def build_flags(argv: list[str], input_name: str = "images") -> dict[str, Any]:
    """The facts of a build that its trtexec command decides: precision flags, DLA, compatibility, shapes."""
    dla = _flag(argv, "--useDLACore")
    shapes = {key: _shape(_flag(argv, f"--{key}Shapes"), input_name) for key in ("min", "opt", "max")}
    return {
        "precision_flags": [a for a in argv if a in ("--int8", "--fp16", "--bf16", "--fp8", "--best")],
        "strongly_typed": _flag(argv, "--stronglyTyped") is not None,
        "dla_core": int(dla) if dla else None,
        "gpu_fallback": _flag(argv, "--allowGPUFallback") is not None,
        "version_compatible": _flag(argv, "--versionCompatible") is not None or _flag(argv, "--vc") is not None,
        "hardware_compatibility": _flag(argv, "--hardwareCompatibilityLevel") or "none",
        "input_shapes": shapes if any(shapes.values()) else None,
    }


# -- TensorRT's Python bindings, when the device has them ------------------------------------------------------------

def _bindings_check(engine: Path, flags: dict[str, Any]) -> dict[str, Any] | None:
    """Deserialize the engine once with TensorRT's Python bindings (the runtime's loader); None without bindings.

    Not executed here against real TensorRT (none on our machines); the tests run it against a labelled fake.
    """
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional on the device
    except ImportError:
        return None
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if flags["version_compatible"]:
        runtime.engine_host_code_allowed = True  # a version-compatible plan embeds the lean runtime
    if flags["dla_core"] is not None:
        runtime.DLA_core = flags["dla_core"]
    loaded = runtime.deserialize_cuda_engine(engine.read_bytes())
    if loaded is None:
        raise RecordError(f"{engine}: TensorRT {trt.__version__} cannot deserialize the engine it just built — see "
                          "the TensorRT messages above; rebuild with ./build_engine.sh")
    level = getattr(loaded, "hardware_compatibility_level", None)  # TensorRT >= 8.6
    if level is not None:
        found = _LEVELS.get(str(level).rsplit(".", 1)[-1].upper(), str(level))
        if found != flags["hardware_compatibility"]:
            raise RecordError(f"{engine}: the engine's hardware compatibility is {found}, the build asked for "
                              f"{flags['hardware_compatibility']} — rebuild with ./build_engine.sh")
    return {"tensorrt_version": str(trt.__version__)}


# -- the two commands ----------------------------------------------------------------------------------------------

def register(bundle: Path, engine: str, onnx: str, log: str, precision: str, argv: list[str]) -> dict[str, Any]:
    """Write ``engine.json`` for ``engine`` built from ``onnx`` by the trtexec ``argv`` whose output is in ``log``."""
    bundle = Path(bundle)
    for name in (engine, onnx, log):
        if not (bundle / name).is_file():
            raise RecordError(f"{bundle / name}: not found — run ./build_engine.sh in the bundle directory")
    facts = parse_trtexec_log((bundle / log).read_text(encoding="utf-8", errors="replace"))
    if facts["failed"] or not facts["passed"]:
        raise RecordError(f"{bundle / log}: trtexec did not report '&&&& PASSED' — the engine is not registered; "
                          "read the log, fix the cause, run ./build_engine.sh again")
    if not facts["gpu_name"] or not facts["compute_capability"]:
        raise RecordError(f"{bundle / log}: no 'Selected Device' / 'Compute Capability' lines from trtexec")
    flags = build_flags(argv)
    bindings = _bindings_check(bundle / engine, flags)
    version = facts["banner_version"] or facts["tensorrt_version"]
    if bindings is not None:
        # The runtime compares against the bindings' version, so record that one; trtexec must be the same release.
        built_with = [int(p) for p in re.findall(r"\d+", version or "")][:3]
        if built_with and built_with != [int(p) for p in re.findall(r"\d+", bindings["tensorrt_version"])][:3]:
            raise RecordError(f"trtexec is TensorRT {version} but python3's tensorrt is "
                              f"{bindings['tensorrt_version']}: the runtime would refuse this engine — use the "
                              "trtexec of the same TensorRT (set TRTEXEC) or the matching python3 (set PYTHON)")
        version = bindings["tensorrt_version"]
    if not version:
        raise RecordError(f"{bundle / log}: trtexec printed no TensorRT version")
    record = {
        "schema_version": SCHEMA_VERSION,
        "engine": {"file": engine, "sha256": file_sha256(bundle / engine), "size": (bundle / engine).stat().st_size},
        "onnx": {"file": onnx, "sha256": file_sha256(bundle / onnx)},
        "tensorrt_version": version,
        "tensorrt_version_source": "tensorrt python bindings" if bindings else "trtexec banner",
        "gpu_name": facts["gpu_name"],
        "compute_capability": facts["compute_capability"],
        "precision": precision,
        **{k: flags[k] for k in ("strongly_typed", "dla_core", "gpu_fallback", "version_compatible",
                                 "hardware_compatibility", "input_shapes")},
        "build_command": [Path(argv[0]).name, *argv[1:]] if argv else [],
        "built_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "built_on": platform.node() or "unknown",
        "deserialized_after_build": bindings is not None,
    }
    write_json_atomic(bundle / RECORD_NAME, record)
    return record


def check(bundle: Path) -> dict[str, Any]:
    """The engine record of ``bundle``, after checking the engine file still has the recorded sha256 and size."""
    path = Path(bundle) / RECORD_NAME
    if not path.is_file():
        raise RecordError(f"{path}: no engine is registered — run ./build_engine.sh first")
    record = json.loads(path.read_text(encoding="utf-8"))
    engine = Path(bundle) / record["engine"]["file"]
    if not engine.is_file() or engine.stat().st_size != record["engine"]["size"] \
            or file_sha256(engine) != record["engine"]["sha256"]:
        raise RecordError(f"{engine}: differs from {RECORD_NAME} (missing, modified or from another build) — "
                          "run ./build_engine.sh again")
    return record


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(q: float) -> float:  # nearest rank, as trtexec reports its percentiles
        return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered))) - 1))]

    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "min": ordered[0],
            "p90": pct(90), "p99": pct(99), "max": ordered[-1]}


def timing(bundle: Path, times: str, profile: str, log: str, argv: list[str], top: int = 15) -> dict[str, Any]:
    """Write ``engine_timing.json``: trtexec's per-inference times and per-layer profile of the registered engine."""
    bundle = Path(bundle)
    record = check(bundle)
    for name in (times, profile, log):
        if not (bundle / name).is_file():
            raise RecordError(f"{bundle / name}: not written by trtexec — see {log}")
    trace = json.loads((bundle / times).read_text(encoding="utf-8"))
    if not isinstance(trace, list) or not trace:
        raise RecordError(f"{bundle / times}: no inferences recorded")
    layers = json.loads((bundle / profile).read_text(encoding="utf-8"))
    runs = next((item.get("count") for item in layers if isinstance(item, dict) and "count" in item), None)
    per_layer = sorted((item for item in layers if isinstance(item, dict) and "name" in item),
                       key=lambda item: -float(item.get("timeMs", 0.0)))
    facts = parse_trtexec_log((bundle / log).read_text(encoding="utf-8", errors="replace"))
    summary = {
        "schema_version": SCHEMA_VERSION,
        "engine_sha256": record["engine"]["sha256"],
        "tensorrt_version": record["tensorrt_version"],
        "gpu_name": facts["gpu_name"] or record["gpu_name"],
        "command": [Path(argv[0]).name, *argv[1:]] if argv else [],
        "measured": "engine only (trtexec): no pre/post-processing; --noDataTransfers: no host<->device copies",
        "inferences": len(trace),
        "gpu_compute_ms": _stats([float(t["computeMs"]) for t in trace]),
        "latency_ms": _stats([float(t["latencyMs"]) for t in trace]),
        "enqueue_ms": _stats([float(t["endEnqMs"]) - float(t["startEnqMs"]) for t in trace]),
        "throughput_qps": facts["throughput_qps"],
        "profile_runs": runs,
        "slowest_layers": [{"name": item["name"], "average_ms": float(item.get("averageMs", 0.0)),
                            "percent": float(item.get("percentage", 0.0))} for item in per_layer[:top]],
        "measured_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    write_json_atomic(bundle / TIMING_NAME, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``engine_record.py register|check|timing`` (run by build_engine.sh / bench_engine.sh in the bundle)."""
    parser = argparse.ArgumentParser(prog="engine_record.py", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent,
                        help="bundle directory (default: the directory of this script)")
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="write engine.json after trtexec built the engine")
    reg.add_argument("--engine", required=True)
    reg.add_argument("--onnx", required=True)
    reg.add_argument("--log", required=True)
    reg.add_argument("--precision", required=True)
    sub.add_parser("check", help="exit 0 when the engine matches engine.json")
    tim = sub.add_parser("timing", help="write engine_timing.json from trtexec's exported times and profile")
    tim.add_argument("--times", required=True)
    tim.add_argument("--profile", required=True)
    tim.add_argument("--log", required=True)
    for p in (reg, tim):
        p.add_argument("trtexec_argv", nargs=argparse.REMAINDER, help="-- then the trtexec command that ran")
    args = parser.parse_args(argv)
    command = list(getattr(args, "trtexec_argv", []))
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        if args.command == "register":
            rec = register(args.bundle, args.engine, args.onnx, args.log, args.precision, command)
            print(f"registered {rec['engine']['file']} in {RECORD_NAME}: TensorRT {rec['tensorrt_version']}, "
                  f"{rec['gpu_name']} (compute capability {rec['compute_capability']})")
        elif args.command == "check":
            rec = check(args.bundle)
            print(f"{rec['engine']['file']} matches {RECORD_NAME}")
        else:
            out = timing(args.bundle, args.times, args.profile, args.log, command)
            print(f"engine only: GPU compute median {out['gpu_compute_ms']['median']:.3f} ms over "
                  f"{out['inferences']} inferences; wrote {TIMING_NAME}")
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
