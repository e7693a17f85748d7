"""TensorRT: the exact ``trtexec`` command per target and TensorRT major version, and the Polygraphy build path.

TensorRT cannot be installed on the machines this project is developed on, so ``build_engine`` and
``build_calibration_cache`` (Polygraphy's TensorRT loaders, TensorRT 10 / 11 APIs) are **not executed here**; they
run only where ``tensorrt`` imports and a GPU answers. Everywhere else the bundle carries ``build_engine.sh`` with
the command from ``trtexec_command``, which the tests pin flag by flag.

Precision per major version:
- TensorRT 10 (JetPack 6): weakly typed build; INT8 = the explicit Q/DQ ONNX with ``--int8 --fp16`` (layers
  outside Q/DQ, e.g. the head's output convolutions, run in FP16); FP16 = the FP32 ONNX with ``--fp16``.
- TensorRT 11: precision flags are gone and every network is strongly typed (``--stronglyTyped`` is kept: a no-op
  there, and it makes the same line correct on 10.x); the ONNX carries the types: the Q/DQ ONNX for INT8 (float
  parts in FP32), ModelOpt AutoCast's mixed FP16 ONNX for FP16. DLA is not offered by TensorRT 11.
"""
from __future__ import annotations

import importlib.util
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.formats import get_format
from runtime.errors import UserError

FP32_ONNX, FP16_ONNX = get_format("onnx").filename, get_format("onnx-fp16").filename
INT8_ONNX = get_format("onnx-int8-modelopt").filename
ENGINE_FILE = get_format("engine").filename
TIMING_CACHE = "timing.cache"
LAYER_INFO = "engine_layers.json"
BUILD_LOG = "engine_build.log"
CALIB_CACHE = get_format("trt-calib-cache").filename
ONNX_FOR_PRECISION = {"int8": INT8_ONNX, "fp16": FP32_ONNX, "fp32": FP32_ONNX}


@dataclass(frozen=True)
class EnginePlan:
    """What to build for a target: ONNX file, precision, TensorRT major, workspace, DLA core, typing."""

    onnx_file: str
    precision: str
    trt_major: int
    workspace_mb: int
    dla_core: int | None = None
    input_shape: tuple[int, int, int, int] = (1, 3, 800, 800)
    max_batch: int | None = None  # set for ONNX files with a dynamic batch axis

    @property
    def strongly_typed(self) -> bool:
        """TensorRT 11 only builds strongly typed networks."""
        return self.trt_major >= 11


def engine_plan(target: Any, precision: str, input_size: int, dynamic_batch: bool = False,
                target_name: str = "target") -> EnginePlan:
    """The engine build a TargetConfig asks for; combinations TensorRT cannot build are UserErrors."""
    major = target.trt_major or 10
    if precision not in ONNX_FOR_PRECISION:
        raise UserError(f"unknown precision '{precision}'", where="--precision", fix="use int8, fp16 or fp32")
    onnx_file = ONNX_FOR_PRECISION[precision]
    if precision == "fp16" and major >= 11:
        onnx_file = FP16_ONNX  # TensorRT 11 has no --fp16: the types live in the ONNX (ModelOpt AutoCast)
    if target.dla_core is not None:
        if major >= 11:
            raise UserError(f"target '{target_name}' asks for DLA core {target.dla_core} with TensorRT {major}",
                            where=f"targets.{target_name}", fix="TensorRT 11 builds no DLA engines: set trt_major: 10")
        if precision == "fp32":
            raise UserError("DLA runs INT8 or FP16 only", where="--precision", fix="use --precision int8 or fp16")
    shape = (1, 3, input_size, input_size)
    return EnginePlan(onnx_file, precision, major, target.workspace_mb, target.dla_core, shape,
                      8 if dynamic_batch else None)


def trtexec_command(plan: EnginePlan, trtexec: str = "trtexec") -> list[str]:
    """argv of the trtexec call that builds the plan's engine from files in the bundle directory."""
    cmd = [trtexec, f"--onnx={plan.onnx_file}", f"--saveEngine={ENGINE_FILE}"]
    if plan.strongly_typed:
        cmd.append("--stronglyTyped")
    elif plan.precision == "int8":
        cmd += ["--int8", "--fp16"]  # explicit Q/DQ decides the INT8 layers; FP16 for the layers left out
    elif plan.precision == "fp16":
        cmd.append("--fp16")
    if plan.dla_core is not None:
        cmd += [f"--useDLACore={plan.dla_core}", "--allowGPUFallback"]
    if plan.max_batch:
        _, c, h, w = plan.input_shape
        cmd += [f"--minShapes=images:1x{c}x{h}x{w}", f"--optShapes=images:1x{c}x{h}x{w}",
                f"--maxShapes=images:{plan.max_batch}x{c}x{h}x{w}"]
    cmd += [f"--memPoolSize=workspace:{plan.workspace_mb}M", f"--timingCacheFile={TIMING_CACHE}",
            "--profilingVerbosity=detailed", f"--exportLayerInfo={LAYER_INFO}", "--skipInference"]
    return cmd


def build_engine_script(plan: EnginePlan, target_name: str, calib_cache: bool = False) -> str:
    """build_engine.sh: runs trtexec in the bundle directory, logging per-layer precisions."""
    command = shlex.join(trtexec_command(plan, trtexec="TRTEXEC_PLACEHOLDER")).replace(
        "TRTEXEC_PLACEHOLDER", '"$TRTEXEC"')
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engine for target '{target_name}' (TensorRT {plan.trt_major}.x, {plan.precision}"
        + (f", DLA core {plan.dla_core} with GPU fallback" if plan.dla_core is not None else "") + ").",
        "# Run it on the device itself: an engine only runs on the GPU model and TensorRT version it was built with.",
        "# Written by `python -m deploy.build`; TRTEXEC overrides the trtexec binary.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        f"{command} 2>&1 | tee {BUILD_LOG}",
        f'echo "engine: $(pwd)/{ENGINE_FILE}; per-layer precisions: {LAYER_INFO}"',
    ]
    if calib_cache and plan.trt_major < 11:
        implicit = EnginePlan(FP32_ONNX, "int8", plan.trt_major, plan.workspace_mb, plan.dla_core,
                              plan.input_shape, plan.max_batch)
        alt = trtexec_command(implicit)
        lines += ["", "# Implicit INT8 from the TensorRT 10 calibration cache instead of the Q/DQ model (deprecated):",
                  "# " + shlex.join(alt[:3] + [f"--calib={CALIB_CACHE}"] + alt[3:])]
    return "\n".join(lines) + "\n"


def tensorrt_status(expected_major: int | None = None) -> tuple[str | None, str]:
    """(TensorRT version, '') when an engine for `expected_major` can be built here, else (None, why not)."""
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


@dataclass(frozen=True)
class EngineBuild:
    """A built engine: files written and what the manifest records about the GPU."""

    engine: Path
    timing_cache: Path
    layer_info: Path
    build_log: Path
    trt_version: str
    gpu_name: str
    compute_capability: str | None


def build_engine(plan: EnginePlan, bundle_dir: Path, timing_cache: Path,
                 log: Callable[[str], None] = print) -> EngineBuild:  # pragma: no cover - not executed here
    """Build the plan's engine with Polygraphy's TensorRT loaders (not executed here: needs TensorRT and a GPU).

    `timing_cache` lives outside the bundle (bundles are rebuilt from scratch) so tactic timings carry over from
    build to build; a copy goes into the bundle next to the engine.
    """
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, PostprocessConfig,
                                        SaveEngine)

    bundle_dir = Path(bundle_dir)
    import shutil

    cache, engine_path = Path(timing_cache), bundle_dir / ENGINE_FILE
    cache.parent.mkdir(parents=True, exist_ok=True)
    network = NetworkFromOnnxPath(str(bundle_dir / plan.onnx_file), strongly_typed=plan.strongly_typed)
    options: dict[str, Any] = {
        "memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: plan.workspace_mb << 20},
        "load_timing_cache": str(cache),  # missing on the first build: Polygraphy warns and starts empty
        "profiling_verbosity": trt.ProfilingVerbosity.DETAILED,
    }
    if not plan.strongly_typed:  # TensorRT 11 removed BuilderFlag.FP16 / INT8
        options.update(fp16=plan.precision in ("fp16", "int8"), int8=plan.precision == "int8")
    if plan.max_batch:
        from polygraphy.backend.trt import Profile

        _, c, h, w = plan.input_shape
        options["profiles"] = [Profile().add("images", min=(1, c, h, w), opt=(1, c, h, w),
                                             max=(plan.max_batch, c, h, w))]
    if plan.dla_core is not None:
        options.update(use_dla=True, allow_gpu_fallback=True)
    config: Any = CreateConfig(**options)
    if plan.dla_core:  # Polygraphy's use_dla selects core 0
        config = PostprocessConfig(config, lambda _b, _n, cfg: setattr(cfg, "DLA_core", plan.dla_core))
    engine = SaveEngine(EngineFromNetwork(network, config, save_timing_cache=str(cache)), path=str(engine_path))()
    shutil.copyfile(cache, bundle_dir / TIMING_CACHE)
    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    (bundle_dir / LAYER_INFO).write_text(info, encoding="utf-8")
    lines = [f"TensorRT {trt.__version__}, {plan.precision}, strongly typed: {plan.strongly_typed}"]
    for layer in json.loads(info).get("Layers", []):
        if isinstance(layer, dict):
            outs = layer.get("Outputs") or [{}]
            lines.append(f"{layer.get('Name', '?')}: {layer.get('LayerType', '?')} -> "
                         f"{outs[0].get('Format/Datatype', outs[0].get('Datatype', '?'))}")
    (bundle_dir / BUILD_LOG).write_text("\n".join(lines) + "\n", encoding="utf-8")
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    log(f"built {engine_path.name} with TensorRT {trt.__version__}")
    return EngineBuild(engine_path, bundle_dir / TIMING_CACHE, bundle_dir / LAYER_INFO, bundle_dir / BUILD_LOG,
                       trt.__version__, torch.cuda.get_device_name(0), f"{major}.{minor}")


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
