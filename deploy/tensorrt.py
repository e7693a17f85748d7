"""TensorRT: the exact trtexec commands per target and TensorRT major, the bundle's build and timing scripts, and
where an engine may be built.

TensorRT cannot be installed on the machines this project is developed on, so nothing here has run against real
TensorRT (**not executed here**); the tests run ``build_engine.sh`` / ``bench_engine.sh`` end to end against a
labelled stand-in ``trtexec`` and fake ``tensorrt`` module (tests/doubles), and pin every flag.

- ``build_engine.sh`` builds the engine with trtexec on the device, then registers it: ``engine_record.py register``
  (runtime/engine_record.py, copied into the bundle) writes ``engine.json`` with the engine's sha256, TensorRT
  version, GPU, compute capability and build flags. The runtime finds the engine only through that record.
- ``bench_engine.sh`` times the registered engine alone (``--useCudaGraph --noDataTransfers --separateProfileRun
  --dumpProfile --exportTimes --exportProfile``) and condenses the JSON into ``engine_timing.json``.

Precision per major version:
- TensorRT 10 (JetPack 6): weakly typed build; INT8 = the explicit Q/DQ ONNX with ``--int8 --fp16`` (layers the Q/DQ
  leave out, e.g. the head's output convolutions, run in FP16, not FP32); FP16 = the FP32 ONNX with ``--fp16``.
- TensorRT 11: precision flags are gone and every network is strongly typed (``--stronglyTyped``): the ONNX carries
  the types, so the layers left out of INT8 run in the Q/DQ ONNX's float type (FP16 when deploy.quantize writes them
  so; :func:`float_types` reports it); FP16 = ModelOpt AutoCast's mixed FP16 ONNX. DLA is not offered by TensorRT 11
  on JetPack 6.

Shapes: the default export has a static batch of 1. With ``deploy.dynamic_batch`` the optimization profile is
min 1 / opt = the tiler's batch (runtime.tiling.TILE_BATCH, what tiled inference sends) / max MAX_BATCH; DLA needs
static shapes (min = opt = max), so a DLA target with a dynamic batch is refused.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.formats import get_format
from runtime.engine_record import CONDITIONS_LOG, RECORD_NAME, TEGRASTATS_LOG, TIMING_NAME
from runtime.errors import UserError
from runtime.tiling import TILE_BATCH

FP32_ONNX, FP16_ONNX = get_format("onnx").filename, get_format("onnx-fp16").filename
INT8_ONNX = get_format("onnx-int8-modelopt").filename
ENGINE_FILE = get_format("engine").filename
TIMING_CACHE = "timing.cache"
LAYER_INFO = "engine_layers.json"
BUILD_LOG = "engine_build.log"
BENCH_LOG = "engine_bench.log"
TIMES_JSON, PROFILE_JSON = "engine_times.json", "engine_profile.json"
BUILD_SCRIPT, BENCH_SCRIPT, RECORD_TOOL = "build_engine.sh", "bench_engine.sh", "engine_record.py"
CALIB_CACHE = get_format("trt-calib-cache").filename
ONNX_FOR_PRECISION = {"int8": INT8_ONNX, "fp16": FP32_ONNX, "fp32": FP32_ONNX}
MAX_BATCH = max(8, TILE_BATCH)
INPUT_NAME = "images"
# Files the device writes into a bundle after it was made: never in the manifest, verified through engine.json.
DEVICE_FILES = (ENGINE_FILE, RECORD_NAME, TIMING_NAME, TIMING_CACHE, LAYER_INFO, BUILD_LOG, BENCH_LOG, TIMES_JSON,
                PROFILE_JSON, TEGRASTATS_LOG, CONDITIONS_LOG)


@dataclass(frozen=True)
class EnginePlan:
    """What to build for a target: ONNX file, precision, TensorRT major, workspace, DLA, compatibility, shapes."""

    onnx_file: str
    precision: str
    trt_major: int
    workspace_mb: int
    dla_core: int | None = None
    input_shape: tuple[int, int, int, int] = (1, 3, 800, 800)
    max_batch: int | None = None  # set for ONNX files with a dynamic batch axis
    opt_batch: int = 1
    version_compatible: bool = False
    hardware_compatibility: str = "none"

    @property
    def strongly_typed(self) -> bool:
        """TensorRT 11 only builds strongly typed networks."""
        return self.trt_major >= 11

    def shape(self, batch: int) -> str:
        """trtexec shape spec of the input at ``batch``, e.g. 'images:4x3x800x800'."""
        _, c, h, w = self.input_shape
        return f"{INPUT_NAME}:{batch}x{c}x{h}x{w}"


def engine_plan(target: Any, precision: str, input_size: int, dynamic_batch: bool = False,
                target_name: str = "target") -> EnginePlan:
    """The engine build a TargetConfig asks for; combinations TensorRT cannot build are UserErrors."""
    major = target.trt_major or 10
    where = f"targets.{target_name}"
    if precision not in ONNX_FOR_PRECISION:
        raise UserError(f"unknown precision '{precision}'", where="--precision", fix="use int8, fp16 or fp32")
    onnx_file = ONNX_FOR_PRECISION[precision]
    if precision == "fp16" and major >= 11:
        onnx_file = FP16_ONNX  # TensorRT 11 has no --fp16: the types live in the ONNX (ModelOpt AutoCast)
    hardware = getattr(target, "hardware_compatibility", "none") or "none"
    jetson = getattr(target, "platform", None) == "jetson"
    if target.dla_core is not None:
        if major >= 11:
            raise UserError(f"target '{target_name}' asks for DLA core {target.dla_core} with TensorRT {major}",
                            where=where, fix="TensorRT 11 builds no DLA engines on JetPack 6: set trt_major: 10")
        if precision == "fp32":
            raise UserError("DLA runs INT8 or FP16 only", where="--precision", fix="use --precision int8 or fp16")
        if dynamic_batch:
            raise UserError(f"DLA needs static shapes (min = opt = max), but deploy.dynamic_batch is true for DLA "
                            f"target '{target_name}'", where=where,
                            fix="set deploy.dynamic_batch=false (batch 1; the runtime sends tiles one by one) or use "
                                "a target without dla_core")
    if hardware != "none" and (jetson or target.dla_core is not None):
        raise UserError(f"hardware compatibility '{hardware}' is not supported on Jetson / DLA by TensorRT",
                        where=f"{where}.hardware_compatibility", fix="set hardware_compatibility: none")
    return EnginePlan(onnx_file, precision, major, target.workspace_mb, target.dla_core,
                      (1, 3, input_size, input_size), MAX_BATCH if dynamic_batch else None,
                      TILE_BATCH if dynamic_batch else 1, bool(getattr(target, "version_compatible", False)), hardware)


def trtexec_command(plan: EnginePlan, trtexec: str = "trtexec") -> list[str]:
    """argv of the trtexec call that builds the plan's engine from files in the bundle directory."""
    cmd = [trtexec, f"--onnx={plan.onnx_file}", f"--saveEngine={ENGINE_FILE}"]
    if plan.strongly_typed:
        cmd.append("--stronglyTyped")
    elif plan.precision == "int8":
        cmd += ["--int8", "--fp16"]  # explicit Q/DQ decides the INT8 layers; FP16 (not FP32) for those left out
    elif plan.precision == "fp16":
        cmd.append("--fp16")
    if plan.dla_core is not None:
        cmd += [f"--useDLACore={plan.dla_core}", "--allowGPUFallback"]
    if plan.max_batch:
        cmd += [f"--minShapes={plan.shape(1)}", f"--optShapes={plan.shape(plan.opt_batch)}",
                f"--maxShapes={plan.shape(plan.max_batch)}"]
    if plan.version_compatible:
        cmd.append("--versionCompatible")
    if plan.hardware_compatibility != "none":
        cmd.append(f"--hardwareCompatibilityLevel={plan.hardware_compatibility}")
    cmd += [f"--memPoolSize=workspace:{plan.workspace_mb}M", f"--timingCacheFile={TIMING_CACHE}",
            "--profilingVerbosity=detailed", f"--exportLayerInfo={LAYER_INFO}", "--skipInference"]
    return cmd


def bench_command(plan: EnginePlan, trtexec: str = "trtexec") -> list[str]:
    """argv of the trtexec call that times the built engine alone (no copies, CUDA graph, per-layer profile)."""
    cmd = [trtexec, f"--loadEngine={ENGINE_FILE}", "--useCudaGraph", "--noDataTransfers", "--separateProfileRun",
           "--dumpProfile", f"--exportTimes={TIMES_JSON}", f"--exportProfile={PROFILE_JSON}", "--warmUp=500",
           "--duration=10"]
    if plan.dla_core is not None:
        cmd.append(f"--useDLACore={plan.dla_core}")
    if plan.max_batch:
        cmd.append(f"--shapes={plan.shape(plan.opt_batch)}")  # time the batch the runtime sends
    if plan.version_compatible:
        cmd.append("--versionCompatible")  # lets trtexec load a plan carrying the lean runtime
    return cmd


def _script_head(what: str, lines: list[str]) -> list[str]:
    return ["#!/usr/bin/env bash", *(f"# {line}" for line in [what, *lines]),
            "# Written by `python -m deploy.build`. TRTEXEC overrides the trtexec binary, PYTHON the python3 that has",
            "# TensorRT's Python bindings (JetPack: python3-libnvinfer).",
            "set -euo pipefail",
            'cd "$(dirname "$0")"',
            'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
            'PYTHON="${PYTHON:-python3}"',
            'if [ ! -x "$TRTEXEC" ]; then  # JetPack installs trtexec outside PATH',
            '  echo "error: trtexec not found ($TRTEXEC): install TensorRT (nvidia-tensorrt) or set TRTEXEC" >&2',
            "  exit 2",
            "fi"]


def _cmd_array(argv: list[str]) -> str:
    return "CMD=(" + shlex.join(["TRTEXEC_PLACEHOLDER", *argv[1:]]).replace("TRTEXEC_PLACEHOLDER", '"$TRTEXEC"') + ")"


def build_engine_script(plan: EnginePlan, target_name: str, calib_cache: bool = False) -> str:
    """build_engine.sh: trtexec builds the engine in the bundle directory, engine_record.py registers it."""
    device = f", DLA core {plan.dla_core} with GPU fallback" if plan.dla_core is not None else ""
    lines = _script_head(
        f"Build and register the TensorRT engine for target '{target_name}' (TensorRT {plan.trt_major}.x, "
        f"{plan.precision}{device}).",
        ["Run it on the device itself: an engine runs only on the GPU model and TensorRT version it was built with.",
         f"It writes {ENGINE_FILE}, then registers it in {RECORD_NAME} (sha256, TensorRT version, GPU, compute",
         "capability, build flags); the runtime finds the engine only through that record and refuses a mismatch."])
    lines += [f"rm -f {RECORD_NAME} {TIMING_NAME}  # unregister first: an engine without its record is never used",
              _cmd_array(trtexec_command(plan)),
              f'"${{CMD[@]}}" 2>&1 | tee {BUILD_LOG}',
              f'"$PYTHON" {RECORD_TOOL} register --engine {ENGINE_FILE} --onnx {plan.onnx_file} --log {BUILD_LOG} '
              f'--precision {plan.precision} -- "${{CMD[@]}}"',
              f'echo "per-layer precisions: {LAYER_INFO}; time the engine alone with ./{BENCH_SCRIPT}"']
    if calib_cache and plan.trt_major < 11:
        implicit = EnginePlan(FP32_ONNX, "int8", plan.trt_major, plan.workspace_mb, plan.dla_core, plan.input_shape,
                              plan.max_batch, plan.opt_batch, plan.version_compatible, plan.hardware_compatibility)
        alt = trtexec_command(implicit)
        lines += ["", "# Implicit INT8 from the TensorRT 10 calibration cache instead of the Q/DQ model (deprecated):",
                  "# " + shlex.join(alt[:3] + [f"--calib={CALIB_CACHE}"] + alt[3:])]
    return "\n".join(lines) + "\n"


def bench_engine_script(plan: EnginePlan, target_name: str) -> str:
    """bench_engine.sh: trtexec times the registered engine alone; engine_record.py writes engine_timing.json."""
    lines = _script_head(
        f"Time the registered TensorRT engine of target '{target_name}' alone with trtexec: GPU compute per",
        ["inference with a CUDA graph and no host<->device copies, per-layer profile in a separate run. Writes",
         f"{TIMES_JSON}, {PROFILE_JSON}, {BENCH_LOG} and {TIMING_NAME} (tied to the engine's sha256),",
         "which `python -m runtime.bench` shows beside its end-to-end figures.",
         "Lock the clocks first for stable numbers: sudo nvpmodel -m 0 && sudo jetson_clocks."])
    lines += [f'"$PYTHON" {RECORD_TOOL} check  # the engine must be the one registered in {RECORD_NAME}',
              "# the device's state beside the figures: power mode and clocks now, power/clocks/temperatures during",
              f"{{ nvpmodel -q; jetson_clocks --show; }} >{CONDITIONS_LOG} 2>&1 || true",
              f"rm -f {TEGRASTATS_LOG}",
              'SAMPLER=""',
              f"if command -v tegrastats >/dev/null; then tegrastats --interval 200 >{TEGRASTATS_LOG} 2>/dev/null & "
              "SAMPLER=$!; fi",
              'trap \'[ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null || true\' EXIT',
              _cmd_array(bench_command(plan)),
              f'"${{CMD[@]}}" 2>&1 | tee {BENCH_LOG}',
              f'"$PYTHON" {RECORD_TOOL} timing --times {TIMES_JSON} --profile {PROFILE_JSON} --log {BENCH_LOG} '
              '-- "${CMD[@]}"']
    return "\n".join(lines) + "\n"


def record_tool_source() -> str:
    """The text of runtime/engine_record.py, which every TensorRT bundle carries as engine_record.py."""
    import runtime.engine_record as tool

    return Path(tool.__file__).read_text(encoding="utf-8")


# -- where an engine may be built -----------------------------------------------------------------------------------

def host_platform() -> str | None:
    """'jetson' on an aarch64 Tegra (L4T), 'x86-cuda' on x86-64 with an NVIDIA GPU, else None."""
    from runtime.backends.ort import gpu_present
    from runtime.machine import is_jetson

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64") and is_jetson():
        return "jetson"
    if machine in ("x86_64", "amd64") and gpu_present():
        return "x86-cuda"
    return None


def find_trtexec() -> str | None:
    """The trtexec build_engine.sh would run (TRTEXEC, PATH, JetPack's location), or None."""
    candidate = os.environ.get("TRTEXEC") or shutil.which("trtexec") or "/usr/src/tensorrt/bin/trtexec"
    return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None


def build_decision(target: Any, requested: str) -> tuple[bool, str]:
    """(build here?, why): ``requested`` is --engine auto|build|script. ``auto`` builds only when this host is the
    target's platform (an engine runs only where it was built) and trtexec is here; ``build`` always tries."""
    if requested == "script":
        return False, "--engine script: the device builds it with ./build_engine.sh"
    if requested == "build":
        return True, "--engine build"
    wanted, here = getattr(target, "platform", None), host_platform()
    if wanted is None or here != wanted:
        return False, (f"this host is not the target's platform ({here or 'no Jetson, no NVIDIA GPU'} vs "
                       f"{wanted or 'unspecified'}): the engine is built where it runs")
    if find_trtexec() is None:
        return False, "this host is the target's platform but has no trtexec (set TRTEXEC to build here)"
    return True, f"this host is a {here}, the target's platform"


def run_build_script(bundle_dir: Path, timing_cache: Path | None = None,
                     log: Callable[[str], None] = print) -> None:
    """Run the bundle's build_engine.sh on this host, exactly as the device would; a timing cache kept outside the
    bundle (bundles are rebuilt from scratch) is copied in first and back afterwards so tactic timings carry over."""
    bundle_dir = Path(bundle_dir)
    if find_trtexec() is None:
        raise UserError("cannot build the engine here: trtexec not found", where="--engine build",
                        fix="install TensorRT's trtexec (TensorRT's pip wheels do not include it) or set TRTEXEC")
    if timing_cache is not None and timing_cache.is_file():
        shutil.copyfile(timing_cache, bundle_dir / TIMING_CACHE)
    done = subprocess.run(["bash", str(bundle_dir / BUILD_SCRIPT)], cwd=bundle_dir, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise UserError(f"build_engine.sh failed (exit {done.returncode}): {tail[0]}",
                        where=str(bundle_dir / BUILD_LOG),
                        fix="read the build log; fix the cause or use --engine script")
    if timing_cache is not None and (bundle_dir / TIMING_CACHE).is_file():
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle_dir / TIMING_CACHE, timing_cache)
    log(f"engine built and registered on this host: {bundle_dir.name}/{RECORD_NAME}")


def float_types(onnx_path: Path) -> set[str]:
    """Element types of the float weights that do not pass through a DequantizeLinear (the layers left out of INT8),
    e.g. {'float16'}: in a strongly typed TensorRT 11 build those layers run in exactly these types."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    consumed = {name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                for name in n.input[1:2]}
    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16:
             "bfloat16"}
    return {names[i.data_type] for i in model.graph.initializer
            if i.name in consumed and i.name not in dequantized and i.data_type in names}


def tensorrt_status(expected_major: int | None = None) -> tuple[str | None, str]:
    """(TensorRT version, '') when TensorRT's builder works here for `expected_major`, else (None, why not)."""
    if importlib.util.find_spec("tensorrt") is None:
        return None, ("the tensorrt Python package is not installed (it cannot be installed here; JetPack ships it "
                      "on a Jetson)")
    try:
        import tensorrt as trt
    except Exception as exc:  # a broken install raises anything from OSError to AttributeError
        return None, f"`import tensorrt` failed ({type(exc).__name__}: {exc})"
    major = int(trt.__version__.split(".")[0])
    if expected_major is not None and major != expected_major:
        return None, f"TensorRT {trt.__version__} is installed, the target expects TensorRT {expected_major}"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:
        return None, f"TensorRT could not create a builder, no usable GPU ({type(exc).__name__}: {exc})"
    if builder is None:
        return None, "TensorRT could not create a builder (no usable NVIDIA GPU)"
    return trt.__version__, ""


def build_calibration_cache(fp32_onnx: Path, feeds: Any, cache_path: Path, method: str,
                            workspace_mb: int) -> Path:  # pragma: no cover - not executed here
    """TensorRT 10 implicit-INT8 calibration cache through Polygraphy's Calibrator (not executed here)."""
    import tensorrt as trt
    from polygraphy.backend.trt import Calibrator, CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    base = trt.IInt8EntropyCalibrator2 if method == "entropy" else trt.IInt8MinMaxCalibrator
    calibrator = Calibrator(feeds, cache=str(cache_path), BaseClass=base)
    config = CreateConfig(int8=True, calibrator=calibrator,
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mb << 20})
    EngineBytesFromNetwork(NetworkFromOnnxPath(str(fp32_onnx)), config)()  # building runs the calibration
    return cache_path
