"""`python -m deploy.build --target jetson`: checkpoint -> ONNX -> INT8 Q/DQ -> (TensorRT engine) -> bundle.

Steps, each a loader from deploy/: export the network at the target's input size and check it against PyTorch on
real preprocessed training images (Polygraphy); quantize with the target's quantizer, calibrated on the training
split; gate the INT8 model on the test split (the runtime's detector loop on ONNX Runtime CPU + COCO AP50), keeping
sensitive layer groups in float when the AP50 drop is too large, and shipping FP16 (FP32 on ONNX Runtime targets)
when even that fails; for TensorRT targets write build_engine.sh / bench_engine.sh / engine_record.py, and run
build_engine.sh here only when this host is the target's platform (or --engine build); write the bundle atomically.
Same inputs -> the existing bundle is reused.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from deploy.bundle import BUILD_INFO, BundleWriter, input_hash, manifest_fields, readme, reusable
from deploy.calibration import calibration_set, load_split
from deploy.export import AutocastFp16, ExportOnnx, SimplifyOnnx, deploy_network
from deploy.fidelity import check_fidelity
from deploy.gate import GateReport, accuracy_gate, evaluate_models
from deploy.nms_graph import NMS_CHOICES, plan_nms
from deploy.quantize import QuantizeOnnx
from deploy.ranges import RANGES_FILE
from deploy.tensorrt import (BENCH_SCRIPT, BUILD_SCRIPT, CALIB_CACHE, FP16_ONNX, FP32_ONNX, INT8_ONNX, RECORD_TOOL,
                             bench_engine_script, build_calibration_cache, build_decision, build_engine_script,
                             engine_plan, float_types, record_tool_source, run_build_script, tensorrt_status)
from runtime.cli import add_debug_flag, run_cli
from runtime.config import DEFAULT_CONFIG, add_config_args, load_config
from runtime.errors import UserError
from runtime.postprocess import PostprocessSpec

FIDELITY_IMAGES = 4


@dataclass(frozen=True)
class Options:
    """What the command line asks for, after defaults from the target and the pipeline are applied."""

    target: str
    role: str
    precision: str
    calib_images: int | None  # None: the pipeline's calibration.images rule
    nms: str
    input_size: int
    engine: str = "auto"  # --engine: auto (build here only when this host is the target), build, script


def _names(section: str) -> str:
    try:
        return ", ".join(yaml.safe_load(DEFAULT_CONFIG.read_text()).get(section, {}))
    except Exception:  # help text must never fail
        return f"see pipelines.yaml '{section}'"


def checkpoint_path(pipe: Any, role: str, work_dir: Path | None) -> Path:
    """Where distill.run writes the role's model.pt: teacher/ or student-<method>/ under <work_dir>/<pipeline>."""
    from distill.stages import stage_dir

    return stage_dir(pipe, role, pipe.distill.method, work_dir) / "model.pt"


def require_checkpoint(path: Path, pipe: Any, role: str) -> None:
    """UserError naming the distill.run command that makes a missing checkpoint."""
    if path.is_file():
        return
    stage = "--stage teacher" if role == "teacher" else f"--stage student --method {pipe.distill.method}"
    raise UserError(f"no {role} checkpoint", where=str(path),
                    fix=f"train it with `python -m distill.run {pipe.name} {stage}` (or pass --checkpoint PATH)")


def _load_model(path: Path) -> tuple[Any, dict[str, Any]]:
    from distill.checkpoint import load_detector

    try:
        return load_detector(path)
    except UserError:
        raise
    except Exception as exc:  # anything torch/pickle/torchvision raise on a damaged or foreign file
        raise UserError(f"checkpoint cannot be loaded ({type(exc).__name__}: {exc})", where=str(path),
                        fix="re-create it with `python -m distill.run`") from None


def _anchor_spec(model: Any, input_size: int) -> Any:
    """runtime.anchors.AnchorSpec of a torchvision RetinaNet, checked to reproduce its anchors exactly."""
    import numpy as np
    import torch
    from torchvision.models.detection.image_list import ImageList

    from runtime.anchors import AnchorSpec, generate_anchors

    gen = model.anchor_generator
    with torch.no_grad():
        probe = torch.zeros(1, 3, input_size, input_size)
        feats = list(model.backbone(probe).values())
    # Nominal strides 2^l: the finest level's from its size (ceil(S / stride) cells), then doubling per level
    # (coarse levels of a small input are too few cells to tell their stride).
    finest = int(round(np.log2(input_size / feats[0].shape[-1])))
    strides = tuple(2 ** (finest + i) for i in range(len(feats)))
    spec = AnchorSpec(sizes=tuple(tuple(float(s) for s in level) for level in gen.sizes),
                      aspect_ratios=tuple(float(r) for r in gen.aspect_ratios[0]), strides=strides,
                      rounded=type(gen).__name__ != "UnroundedAnchorGenerator")
    with torch.no_grad():
        ours = gen(ImageList(probe, [(input_size, input_size)]), feats)[0].numpy()
    theirs, _ = generate_anchors(spec, (input_size, input_size))
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, atol=1e-3):
        raise UserError("export mismatch: runtime.anchors does not reproduce the model's anchors",
                        where=f"input size {input_size}", fix="the model's anchor generator is not RetinaNet's")
    return spec


def build_role(pipe: Any, target: Any, opts: Options, checkpoint: Path, out_dir: Path,
               console: Console) -> dict[str, Any]:
    """Build (or reuse) one bundle; returns a summary row."""
    say = lambda msg: console.print(f"[{opts.role}] {msg}", markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    require_checkpoint(checkpoint, pipe, opts.role)
    settings = {"target": target.model_dump(mode="json"), "options": opts.__dict__,
                "pipeline": {k: v for k, v in pipe.as_dict().items() if k not in ("schedule", "description")}}
    wanted = input_hash(checkpoint, settings)
    if reusable(out_dir, wanted):
        say(f"bundle up to date (same checkpoint, config and code): {out_dir}")
        info = json.loads((out_dir / BUILD_INFO).read_text(encoding="utf-8"))
        return {**info["summary"], "bundle": str(out_dir), "status": "reused"}
    model, meta = _load_model(checkpoint)
    classes = list(meta.get("classes") or [])
    if not classes:
        raise UserError("checkpoint has no class names", where=str(checkpoint), fix="rewrite it with distill.run")
    size = opts.input_size
    if meta.get("input_size") not in (None, size):
        say(f"note: trained at {meta['input_size']} px, exported at the target's {size} px")
    net = deploy_network(model, size)
    anchors = _anchor_spec(model, size) if net.kind == "retinanet" else None
    # fp32 / fp16 builds only need images for the fidelity check
    calib = calibration_set(pipe, size, opts.calib_images if opts.precision == "int8"
                            else min(opts.calib_images or FIDELITY_IMAGES, FIDELITY_IMAGES))
    test = pipe.test
    post = PostprocessSpec(kind=net.kind, num_classes=len(classes), anchors=anchors, score_thresh=test.score_thresh,
                           nms_iou=test.nms_iou, max_detections=test.max_detections,
                           topk_candidates=test.topk_candidates, label_offset=net.label_offset)
    nms = plan_nms(opts.nms, net, model, post, size, target.runtime, None if pipe.deploy.dynamic_batch else 1,
                   pipe.deploy.opset)
    trt = target.runtime == "tensorrt"
    plan = engine_plan(target, opts.precision, size, pipe.deploy.dynamic_batch, opts.target) if trt else None
    failed_dir = out_dir.parent / "failed" / out_dir.name
    described: dict[str, str] = {}
    summary: dict[str, Any] = {"role": opts.role, "precision": opts.precision}
    with BundleWriter(out_dir) as bundle:
        fp32_path = bundle.path(FP32_ONNX, "onnx-fp32", "fp32")
        SimplifyOnnx(ExportOnnx(net, fp32_path, size, pipe.deploy.opset, pipe.deploy.dynamic_batch))()
        described[FP32_ONNX] = "FP32 network, input `images` normalised NCHW"
        fidelity = check_fidelity(net.module, net.output_names, fp32_path, calib.feeds(FIDELITY_IMAGES),
                                  pipe.deploy.fidelity_atol, pipe.deploy.fidelity_rtol)
        bundle.write_json("fidelity.json", fidelity.as_dict(), "fidelity")
        described["fidelity.json"] = "PyTorch vs ONNX Runtime comparison on calibration images (Polygraphy)"
        if not fidelity.passed:
            kept = bundle.keep_failed(failed_dir)
            raise UserError(f"export mismatch: ONNX Runtime differs from PyTorch beyond tolerance ({fidelity.worst()})",
                            where=str(kept), fix="inspect fidelity.json there; loosen deploy.fidelity_atol/rtol only "
                            "if the difference is numerical noise")
        say(f"exported {fp32_path.name}: ONNX Runtime matches PyTorch ({fidelity.worst()})")
        records = load_split(pipe, pipe.dataset.test_split).records[: pipe.deploy.eval_images]
        evaluate = lambda paths: evaluate_models(paths, records, classes, calib.spec, nms.postprocess,  # noqa: E731
                                                 nms.tail)
        if opts.precision == "int8":
            report = _quantize_and_gate(bundle, pipe, target, plan, calib, evaluate, described, summary, say)
        else:  # no INT8 gate, but the device gate needs the FP32 AP50 this build measured
            report = GateReport(evaluate({"fp32": fp32_path})["fp32"], None, None, pipe.deploy.ap50_drop_limit, None,
                                shipped=opts.precision)
            summary.update(fp32_ap50=report.fp32.AP50, fp32_ms=report.fp32.latency_ms_median)
        report.split, report.images = pipe.dataset.test_split, [r.path.name for r in records]
        failed = report.passed is False
        if failed:  # INT8 would cost too much accuracy even after the sensitivity pass: ship the fallback instead
            fallback = "fp16" if trt else "fp32"
            report.shipped = summary["precision"] = fallback
            summary["fallback"] = f"INT8 failed the gate (AP50 drop {report.drop_ap50:.2f} > {report.limit:g})"
        gate_dict = report.as_dict()
        bundle.write_json("accuracy_gate.json", gate_dict, "accuracy-gate")
        described["accuracy_gate.json"] = (f"AP50 on {len(records)} test images ({report.split} split) with the "
                                           "image list; what the device gate (deploy.verify --dataset) compares to")
        if failed:
            kept = bundle.keep_failed(failed_dir, move=False)
            bundle.drop(INT8_ONNX)
            described.pop(INT8_ONNX, None)
            say(f"INT8 AP50 drop {report.drop_ap50:.2f} stays above the limit {report.limit:g} even with "
                f"{', '.join(report.kept_float_groups) or 'no group'} in float: writing an {fallback.upper()} bundle "
                f"instead (the INT8 attempt, its accuracy_gate.json and sensitivity.json are kept in {kept})")
            plan = engine_plan(target, fallback, size, pipe.deploy.dynamic_batch, opts.target) if trt else None
        if plan is not None and plan.onnx_file == FP16_ONNX:
            AutocastFp16(fp32_path, bundle.path(FP16_ONNX, "onnx-fp16", "fp16"))()
            described[FP16_ONNX] = "mixed FP16 (ModelOpt AutoCast) for strongly typed TensorRT"
        # In-graph NMS goes on after calibration (ONNX Runtime could not calibrate through a TensorRT plugin).
        nms.attach([bundle.tmp / n for n in (FP32_ONNX, INT8_ONNX, FP16_ONNX) if (bundle.tmp / n).is_file()])
        described["manifest.json"] = f"hashes, versions, pre/post-processing. {nms.describe()}"
        if nms.plugin and "accuracy_gate.json" in described:
            described["accuracy_gate.json"] += (" (NMS scored with runtime.efficient_nms, the numpy reference of "
                                                "EfficientNMS_TRT: the plugin itself is not executed here)")
        engine_note = "The target runs the ONNX files with ONNX Runtime; no TensorRT engine is involved."
        if plan is not None:
            engine_note = _tensorrt(bundle, plan, target, opts, calib, fp32_path, report, described, say)
        notes = f"built by deploy.build from {checkpoint} ({meta.get('role')}, method {meta.get('method')})"
        bundle.write_text("README.md", readme(pipe.name, opts.role, opts.target, target.description,
                                              described,
                                              gate_dict, engine_note), "readme")
        bundle.write_json(BUILD_INFO, {"input_hash": wanted, "checkpoint": str(checkpoint), "settings": settings,
                                       "summary": summary}, "build-info")
        bundle.commit(**manifest_fields(pipe.name, opts.role, opts.target, classes, calib.spec, nms.postprocess,
                                        nms.output_names, (1 if not pipe.deploy.dynamic_batch else "batch", 3, size,
                                                           size), plan, notes), nms=nms.kind)
    say(f"bundle written: {out_dir}")
    return {**summary, "bundle": str(out_dir), "status": "built"}


def _quantize_and_gate(bundle: BundleWriter, pipe: Any, target: Any, plan: Any, calib: Any, evaluate: Any,
                       described: dict[str, str], summary: dict[str, Any], say: Any) -> GateReport:
    """INT8 Q/DQ with the target's quantizer, then the accuracy gate (and sensitivity pass); returns its report."""
    fp32_path = bundle.tmp / FP32_ONNX
    bundle.write_json("calibration.json", calib.manifest(), "calib-manifest")
    described["calibration.json"] = f"{len(calib)} calibration images ({calib.split} split) + preprocessing"
    described[RANGES_FILE] = f"activation ranges from calibration ({calib.method}), reused by the sensitivity pass"
    dla = plan is not None and plan.dla_core is not None
    int8_path = bundle.path(INT8_ONNX, "onnx-int8", "int8")
    ranges = bundle.path(RANGES_FILE, "calib-ranges")  # the sensitivity pass re-quantizes from it
    first = QuantizeOnnx(fp32_path, int8_path, calib, target.quantizer, dla=dla, ranges_cache=ranges,
                         progress=say)()
    if first.note:
        say(first.note)
    say(f"quantized with {first.quantizer}: {first.qdq['QuantizeLinear']} Q / {first.qdq['DequantizeLinear']} DQ "
        "nodes, head outputs in float")
    report, final = accuracy_gate(
        fp32_path, first,
        requantize=lambda keep: QuantizeOnnx(fp32_path, int8_path, calib, target.quantizer, keep, dla, ranges,
                                             say)(),
        evaluate=evaluate, limit=pipe.deploy.ap50_drop_limit, max_groups=pipe.deploy.sensitivity_groups,
        feeds=calib.feeds(min(8, len(calib))), progress=say)
    described[INT8_ONNX] = f"INT8 explicit Q/DQ ({final.quantizer}), head outputs in float"
    if report.sensitivity:
        bundle.write_json("sensitivity.json", report.sensitivity, "sensitivity")
        described["sensitivity.json"] = "output drift per layer group left in float"
    summary.update(fp32_ap50=report.fp32.AP50, int8_ap50=report.int8.AP50, drop=report.drop_ap50,
                   fp32_ms=report.fp32.latency_ms_median, int8_ms=report.int8.latency_ms_median)
    return report


def _tensorrt(bundle: BundleWriter, plan: Any, target: Any, opts: Options, calib: Any, fp32_path: Path,
              report: GateReport, described: dict[str, str], say: Any) -> str:
    """Write build_engine.sh, bench_engine.sh and engine_record.py; build the engine here only where it runs.
    Returns the README's section on the device steps."""
    bundle.write_text(RECORD_TOOL, record_tool_source(), "engine-tool", mode=0o755)
    bundle.write_text(BUILD_SCRIPT, build_engine_script(plan, opts.target, calib_cache=False), "build-script",
                      mode=0o755)
    bundle.write_text(BENCH_SCRIPT, bench_engine_script(plan, opts.target), "bench-script", mode=0o755)
    described[BUILD_SCRIPT] = f"builds and registers the engine on the device (trtexec, TensorRT {plan.trt_major}.x)"
    described[BENCH_SCRIPT] = "times the registered engine alone with trtexec; runtime.bench shows the figures"
    described[RECORD_TOOL] = "writes engine.json / engine_timing.json (standard library only)"
    notes = []
    if plan.strongly_typed and plan.precision == "int8":
        kinds = float_types(bundle.tmp / plan.onnx_file)
        notes.append(f"TensorRT {plan.trt_major} builds strongly typed: the layers left out of INT8 run in the Q/DQ "
                     f"model's float types ({', '.join(sorted(kinds)) or 'none'}).")
        if "float32" in kinds:
            say(f"note: {notes[-1]} FP16 needs a Q/DQ model written with FP16 high precision")
    version, _ = tensorrt_status(plan.trt_major)
    if version and plan.trt_major < 11 and plan.precision == "int8":  # pragma: no cover - needs TensorRT and a GPU
        build_calibration_cache(fp32_path, ({"images": b} for b in calib.batches()),
                                bundle.path(CALIB_CACHE, "calib-cache"), calib.method, plan.workspace_mb)
        bundle.write_text(BUILD_SCRIPT, build_engine_script(plan, opts.target, calib_cache=True), "build-script",
                          mode=0o755)
    here, why = build_decision(target, opts.engine)
    if here:
        cache = bundle.final.parent / "timing-caches" / f"{opts.target}-trt{plan.trt_major}.cache"
        run_build_script(bundle.tmp, cache, log=say)
        built = (f"The engine was built and registered in engine.json when this bundle was made ({why}); on any "
                 f"other device run ./{BUILD_SCRIPT} again.")
    else:
        say(f"no TensorRT engine was built on this machine: {why}")
        built = f"No engine was built when this bundle was made ({why})."
    limit = report.limit
    steps = [
        built, "",
        "On the device (nothing here needs editing; copy the whole directory):", "",
        f"1. `./{BUILD_SCRIPT}` builds `model.engine` with trtexec (TensorRT {plan.trt_major}.x, {plan.precision}"
        + (f", DLA core {plan.dla_core}" if plan.dla_core is not None else "") + ") and registers it in `engine.json` "
        "(sha256, TensorRT version, GPU, compute capability, flags). The runtime finds the engine only through "
        "`engine.json` and refuses an engine whose file, TensorRT version or GPU differs.",
        "2. `python -m runtime.bench <this directory> --image scene.jpg`: `--backend auto` runs the registered "
        "engine when it matches this device (else ONNX Runtime, with a warning saying why); the report records "
        "JetPack, TensorRT, nvpmodel, jetson_clocks, GPU/EMC clocks, temperatures and power beside the latency.",
        f"3. `./{BENCH_SCRIPT}` times the engine alone (trtexec, CUDA graph, no copies, per-layer profile); "
        "`runtime.bench` then shows those engine-only figures beside its end-to-end ones.",
        f"4. `python -m deploy.verify <this directory> --dataset DIR --backend trt` scores the engine on the "
        f"{len(report.images)} {report.split}-split images listed in `accuracy_gate.json` and fails when its AP50 is "
        f"more than {limit:g} points below the FP32 AP50 measured here ({100 * report.fp32.AP50:.2f}).",
        *([""] + notes if notes else []),
        "", "These scripts were written against TensorRT's documented trtexec and Python APIs; this project's "
        "machines have no TensorRT, so they ran only against labelled test doubles there.",
    ]
    return "\n".join(steps)


@dataclass(frozen=True)
class BuildRequest:
    """What to build: the typed form of the command line (benchmarks and other tools call build_bundles with it)."""

    target: str
    pipeline: str | None = None
    model: str = "student"  # 'student' | 'teacher' | 'both'
    checkpoint: Path | None = None
    precision: str | None = None  # default: the target's
    calib_images: int | None = None  # default: calibration.images of the pipeline (unset there: 500 or the split)
    nms: str = "host"
    engine: str = "auto"  # TensorRT targets: 'auto' | 'build' | 'script'
    work_dir: Path | None = None
    out: Path | None = None
    config: Path | None = None
    overrides: tuple[str, ...] = ()


def build_bundles(request: BuildRequest, console: Console | None = None) -> list[dict[str, Any]]:
    """Build (or reuse) the requested bundles; returns one summary row per role (bundle path, AP50s, status)."""
    console = console or Console(stderr=True)
    cfg = load_config(request.config, list(request.overrides), pipeline=request.pipeline)
    pipe = cfg.pipeline(request.pipeline)
    target = cfg.target(request.target)
    precision = request.precision or target.precision
    if target.runtime == "onnxruntime" and precision == "fp16":
        raise UserError(f"target '{request.target}' runs ONNX Runtime on the CPU: fp32 or int8", where="--precision")
    roles = ("student", "teacher") if request.model == "both" else (request.model,)
    if request.checkpoint is not None and len(roles) > 1:
        raise UserError("--checkpoint names one model, --model both needs two", where="--checkpoint",
                        fix="build them one at a time with --model student / --model teacher")
    size = target.input_size or pipe.input_size
    if size % 32:
        raise UserError(f"input size {size} is not a multiple of 32", where=f"targets.{request.target}.input_size")
    base = request.out or cfg.path(cfg.artifacts_dir) / pipe.name / request.target
    rows = []
    for role in roles:
        opts = Options(request.target, role, precision, request.calib_images, request.nms, size, request.engine)
        ckpt = request.checkpoint or checkpoint_path(pipe, role, request.work_dir)
        out = base / role if len(roles) > 1 else base
        rows.append(build_role(pipe, target, opts, Path(ckpt), Path(out), console))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Build deploy bundles for the given target."""
    parser = argparse.ArgumentParser(prog="python -m deploy.build", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help=f"deploy target from pipelines.yaml: {_names('targets')}")
    parser.add_argument("--pipeline", default=None,
                        help=f"pipeline (default from pipelines.yaml): {_names('pipelines')}")
    parser.add_argument("--model", choices=("student", "teacher", "both"), default="student")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model.pt to deploy instead of the pipeline's")
    parser.add_argument("--precision", choices=("int8", "fp16", "fp32"), default=None,
                        help="default: the target's precision")
    parser.add_argument("--calib-images", type=int, default=None,
                        help="default: calibration.images of the pipeline (unset there: 500, or all the split has)")
    parser.add_argument("--nms", choices=NMS_CHOICES, default="host",
                        help="host: numpy post-processing + library NMS (default); onnx-nms: decoding + ONNX "
                        "NonMaxSuppression in the graph; efficient-nms-trt: decoding + TensorRT's EfficientNMS_TRT "
                        "plugin; graph: the in-graph one the target's runtime runs")
    parser.add_argument("--engine", choices=("auto", "build", "script"), default="auto",
                        help="TensorRT targets: auto builds the engine here only when this host is the target's "
                             "platform (a Jetson for jetson targets, an x86 GPU host for x86-cuda); build forces it; "
                             "script only ships build_engine.sh (default: auto)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where distill.run wrote checkpoints")
    parser.add_argument("--out", type=Path, default=None,
                        help="bundle directory (default artifacts/<pipeline>/<target>, + /<role> with --model both)")
    add_config_args(parser, with_pipeline=False)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    request = BuildRequest(target=args.target, pipeline=args.pipeline, model=args.model, checkpoint=args.checkpoint,
                           precision=args.precision, calib_images=args.calib_images, nms=args.nms,
                           engine=args.engine, work_dir=args.work_dir, out=args.out, config=args.config, overrides=tuple(args.overrides))
    console = Console(stderr=True)
    _print_summary(console, build_bundles(request, console))
    return 0


def _print_summary(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="deploy bundles (AP50 on the test split, ONNX Runtime CPU latency per image)")
    for col in ("role", "precision", "AP50 fp32", "AP50 int8", "drop", "ms fp32", "ms int8", "status"):
        table.add_column(col, justify="right" if col not in ("role", "status") else "left")
    fmt = lambda v, scale=1.0: "-" if v is None else f"{scale * v:.2f}"  # noqa: E731
    for r in rows:
        table.add_row(r["role"], r["precision"], fmt(r.get("fp32_ap50"), 100), fmt(r.get("int8_ap50"), 100),
                      fmt(r.get("drop")), fmt(r.get("fp32_ms")), fmt(r.get("int8_ms")), r["status"])
    console.print(table)
    for r in rows:
        console.print(f"{r['role']}: {r['bundle']}", markup=False, highlight=False)


if __name__ == "__main__":
    run_cli(main)
