"""`python -m benchmarks.report [PIPELINE] [--target T] [--latency-only] [--out DIR] [--iters N]`: teacher vs student.

Measures teacher FP32, student FP32 and student INT8 (the teacher's INT8 and the no-KD student too when they exist)
side by side in one run on one machine, backend and input size, and writes report.md, a self-contained report.html,
the figures as PNG and results.json (default: reports/<pipeline>/<target>/).

Bundles come from deploy.build (artifacts/<pipeline>/<target>/{teacher,student,student-none}); a missing or stale
one is built first from the checkpoints distill.run wrote (deploy.build reuses up-to-date bundles). With
`--latency-only` no trained weights are needed: randomly initialised networks of the pipeline's exact architectures
are deployed and timed — e.g. `python -m benchmarks.report dior_retina --latency-only` times the paper's R101 teacher
against the R18 student at 800 px, FP32 and INT8, on ONNX Runtime CPU.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks import plots
from benchmarks.document import build_document, fmt, kd_comparison, story
from benchmarks.html import render_html, render_markdown
from benchmarks.measure import Variant, measure_variants, scene_detections
from benchmarks.results import Context, Results, fill_relative, story_order, write_results, write_text_atomic
from runtime.backends.select import BACKENDS, bundle_precisions
from runtime.cli import add_debug_flag, run_cli
from runtime.config import Pipeline, ProjectConfig, add_config_args, load_config
from runtime.errors import UserError
from runtime.machine import machine_facts
from runtime.draw import draw_detections
from runtime.manifest import load_bundle
from runtime.postprocess import Detections
from runtime.preprocess import read_image
from runtime.records import DetectionSet

# Students other than the pipeline's own method that are measured when distill.run trained them.
BASELINES = ("none", "fitnet", "pkd", "fgd")
METHOD_NAMES = {"ds2d2": "DS2D2", "none": "no-KD", "fitnet": "FitNet", "pkd": "PKD", "fgd": "FGD"}
SCENE_SCORE = 0.3  # drawing threshold: the 0.05 evaluation threshold would bury the picture in low-score boxes
SCENE_OBJECTS = 15  # ground-truth objects in the scene picked for the figure (about; the closest is taken)
SCENE_SIDE = 768  # images are enlarged (integer factor) towards this side before drawing


@dataclass
class ReportOptions:
    """Everything the report run needs; the CLI fills it from its arguments, benchmarks.demo directly."""

    pipeline: str | None = None
    target: str = "cpu"
    latency_only: bool = False
    out: Path | None = None
    iters: int = 50
    warmup: int = 5
    threads: int | None = None
    backend: str | None = None
    eval_images: int | None = None
    calib_images: int = 8
    own_student_only: bool = False
    build: bool = True
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    work_dir: Path | None = None
    progress: bool = True


@dataclass
class Model:
    """One bundle to measure: its directory and what it holds."""

    role: str
    method: str | None
    name: str
    bundle: Path
    checkpoint: Path | None
    trained: bool = True
    params: int | None = None
    gflops: float | None = None


def _deploy(opts: ReportOptions, pipe: Pipeline, role: str, checkpoint: Path, out: Path,
            extra: Sequence[str] = ()) -> None:
    """Build or reuse one bundle through deploy.build's typed API (deploy.build.build_bundles)."""
    from deploy.build import BuildRequest, build_bundles

    build_bundles(BuildRequest(target=opts.target, pipeline=pipe.name, model=role, checkpoint=checkpoint, out=out,
                               calib_images=opts.calib_images if opts.latency_only else None, config=opts.config,
                               overrides=(*opts.overrides, *extra)))


def _size_of(checkpoint: Path) -> tuple[int | None, float | None]:
    """Parameters and GFLOPs of the network in a model checkpoint (None, None if it cannot be read)."""
    from distill.checkpoint import load_detector
    from distill.models.build import count_parameters, gflops

    try:
        model, meta = load_detector(checkpoint)
    except UserError:
        return None, None
    return count_parameters(model), gflops(model, int(meta["input_size"]))


def student_bundle_dir(bundles: Path) -> Path:
    """Where the pipeline's student bundle is: `<target>/student/` (deploy.build --model both) or the target
    directory itself (--model student, deploy.build's default layout)."""
    try:
        if load_bundle(bundles, verify=False).manifest.model_role == "student":
            return bundles
    except UserError:
        pass
    return bundles / "student"


def trained_models(opts: ReportOptions, cfg: ProjectConfig, pipe: Pipeline, bundles: Path) -> list[Model]:
    """Teacher, the pipeline's student and every baseline student that was trained (no-KD, FitNet, PKD), each with
    its bundle (built or refreshed through deploy.build unless --no-build)."""
    from distill.stages import stage_dir

    method = pipe.distill.method
    wanted = [("teacher", None, stage_dir(pipe, "teacher", None, opts.work_dir), bundles / "teacher"),
              ("student", method, stage_dir(pipe, "student", method, opts.work_dir), student_bundle_dir(bundles))]
    wanted += [("student", m, stage_dir(pipe, "student", m, opts.work_dir), bundles / f"student-{m}")
               for m in BASELINES if m != method]
    models = []
    for role, kd, run_dir, out in wanted:
        ckpt, name = run_dir / "model.pt", "teacher" if role == "teacher" else f"student {METHOD_NAMES[kd]}"
        if not ckpt.is_file():
            if role == "student" and kd != method:
                continue  # a baseline is reported only when it was trained
            if opts.build or not (out / "manifest.json").is_file():
                stage = "--stage teacher" if role == "teacher" else f"--stage student --method {kd}"
                raise UserError(f"no {name} checkpoint", where=str(ckpt),
                                fix=f"train it with `python -m distill.run {pipe.name} {stage}`, or use "
                                    "--latency-only to time untrained networks")
        if opts.build and ckpt.is_file():
            _deploy(opts, pipe, role, ckpt, out)
        params, flops = _size_of(ckpt) if ckpt.is_file() else (None, None)
        models.append(Model(role, kd, name, out, ckpt if ckpt.is_file() else None, True, params, flops))
    return models


def untrained_models(opts: ReportOptions, pipe: Pipeline, out_dir: Path, bundles: Path,
                     notes: list[str]) -> list[Model]:
    """Randomly initialised teacher and student deployed through deploy.build (see benchmarks.latency_only), plus
    the students of the sibling pipelines (same teacher, data and input size: the edge students) unless
    --own-student-only."""
    from benchmarks.latency_only import (FIDELITY_NOTE, FIDELITY_OVERRIDES, calibration_for, describe_spec,
                                         latency_models, random_checkpoint, shared_overrides)

    calib = calibration_for(pipe, out_dir / "calibration-data", opts.calib_images)
    notes += [calib.note, FIDELITY_NOTE]
    models = []
    wanted = latency_models(pipe, opts.own_student_only, opts.config, opts.overrides)
    sibling_opts = replace(opts, overrides=shared_overrides(opts.overrides))  # a sibling keeps its own student
    for m in wanted:
        ckpt, params, flops = random_checkpoint(m.pipe, m.role, out_dir / "checkpoints" / m.folder / "model.pt",
                                                "untrained")
        _deploy(opts if m.pipe is pipe else sibling_opts, m.pipe, m.role, ckpt, bundles / m.folder,
                calib.overrides + FIDELITY_OVERRIDES)
        models.append(Model(m.role, None, m.name, bundles / m.folder, ckpt, False, params, flops))
    students = "; ".join([f"student {describe_spec(pipe.student)}"]
                         + [f"{m.name} {describe_spec(m.pipe.student)}" for m in wanted[2:]])
    notes.append(f"Latency only — untrained weights: teacher {describe_spec(pipe.teacher)}; {students}; "
                 f"{len(class_list_of(pipe))} classes, randomly initialised (seed 0).")
    return models


def class_list_of(pipe: Pipeline) -> tuple[str, ...]:
    """The pipeline's class names."""
    from runtime.data.classes import class_list

    return class_list(pipe.dataset.classes)


def variants_of(models: Sequence[Model]) -> list[Variant]:
    """FP32 first, then every other precision each bundle holds (INT8, FP16), teacher first."""
    out = []
    for m in models:
        bundle = load_bundle(m.bundle)
        for precision in sorted(bundle_precisions(bundle), key=("fp32", "fp16", "int8").index):
            out.append(Variant(f"{m.name} {precision.upper()}", m.role, m.method, precision, m.bundle, m.trained,
                               m.params, m.gflops))
    return out


def eval_split(opts: ReportOptions, pipe: Pipeline, bundle: Path) -> DetectionSet:
    """The pipeline's test split (generated first if synthetic) with the bundle's classes, limited to --eval-images.

    Read from the resolved pipeline (so --config / --set apply), exactly as runtime.evaluate reads it by default.
    """
    from runtime.data import load_dataset

    if pipe.dataset.synthetic is not None:
        from runtime.data.synthetic import SyntheticParams, generate

        generate(SyntheticParams(**pipe.dataset.synthetic), pipe.dataset_root, overwrite=True)  # no-op when unchanged
    manifest = load_bundle(bundle, verify=False).manifest
    data = load_dataset(pipe.dataset.format, pipe.dataset_root, pipe.dataset.test_split, classes=list(manifest.classes))
    if opts.eval_images:
        data = DetectionSet(data.name, data.classes, data.records[: opts.eval_images])
    return data


def scene_figure(results: Results, variants: Sequence[Variant], detectors: Sequence[Any], data: DetectionSet,
                 path: Path) -> Path | None:
    """Ground truth, teacher FP32 and each student's INT8 (else FP32) detections on one test image of typical
    density."""
    if not data.records:
        return None
    # A scene of typical density (closest to SCENE_OBJECTS objects) keeps the drawn labels readable.
    record = min(data.records[:50], key=lambda r: (abs(len(r) - SCENE_OBJECTS), r.image_id))
    image = read_image(record.path)
    picks = [i for i, v in enumerate(variants) if v.role == "teacher" and v.precision == "fp32"]
    for method in dict.fromkeys(v.method for v in variants if v.role == "student"):
        mine = [i for i, v in enumerate(variants) if v.role == "student" and v.method == method]
        int8 = [i for i in mine if variants[i].precision == "int8"]
        picks += int8[:1] or mine[:1]
    dets = scene_detections([detectors[i] for i in picks], image)
    # Draw on an enlarged copy: label text has a minimum size, which would cover a 256 px image.
    scale = max(1, SCENE_SIDE // max(image.shape[:2]))
    big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    gt = Detections(record.boxes, np.ones(len(record), np.float32), record.labels)
    panels = [(f"ground truth ({len(record)} objects)", draw_detections(big, _scaled(gt, scale), data.classes))]
    panels += [(f"{variants[i].name}: {int((d.scores >= SCENE_SCORE).sum())} boxes >= {SCENE_SCORE}",
                draw_detections(big, _scaled(d, scale), data.classes, SCENE_SCORE)) for i, d in zip(picks, dets)]
    precisions = ", ".join(dict.fromkeys(variants[i].precision.upper() for i in picks))
    return plots.scene_plot(panels, results.context.caption(f"precision: {precisions}"),
                            f"{results.context.pipeline}: {record.image_id} ({results.context.eval_split} split)", path)


def _scaled(dets: Detections, scale: int) -> Detections:
    """Detections with boxes multiplied by `scale` (to draw on an enlarged image)."""
    return Detections(dets.boxes * scale, dets.scores, dets.labels)


def report_models(opts: ReportOptions, cfg: ProjectConfig, pipe: Pipeline) -> tuple[Path, list[Model], list[str]]:
    """The report's output directory, its models (trained bundles, or with --latency-only untrained networks built
    into OUT/bundles) and the notes that describe them; benchmarks.scene_bench times the same models."""
    suffix = "-latency-only" if opts.latency_only else ""
    out_dir = Path(opts.out) if opts.out else cfg.path("reports") / pipe.name / f"{opts.target}{suffix}"
    notes: list[str] = []
    if opts.latency_only:
        models = untrained_models(opts, pipe, out_dir, out_dir / "bundles", notes)
    else:
        models = trained_models(opts, cfg, pipe, cfg.path(cfg.artifacts_dir) / pipe.name / opts.target)
    return out_dir, models, notes


def make_report(opts: ReportOptions, steps: list[dict[str, Any]] | None = None,
                console: Console | None = None) -> tuple[Results, Path]:
    """Measure, plot and write the report; returns the results and the output directory."""
    console = console or Console()
    cfg = load_config(opts.config, opts.overrides, opts.pipeline)
    pipe = cfg.pipeline(opts.pipeline)
    target = cfg.target(opts.target)
    if opts.iters < 1 or opts.warmup < 0:
        raise UserError(f"need --iters >= 1 and --warmup >= 0, got {opts.iters} and {opts.warmup}", where="--iters")
    backend = opts.backend or ("ort-cpu" if target.runtime == "onnxruntime" else "auto")
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}", where="--backend", fix=f"choose one of {', '.join(BACKENDS)}")
    out_dir, models, notes = report_models(opts, cfg, pipe)
    variants = variants_of(models)
    data = None if opts.latency_only else eval_split(opts, pipe, models[0].bundle)
    console.print(f"measuring {len(variants)} models side by side ({opts.iters} rounds"
                  + (f", then accuracy on {len(data)} test images" if data is not None else "") + ")")
    rows, detectors = measure_variants(variants, backend, opts.threads, opts.iters, opts.warmup, data, opts.progress)
    try:
        fill_relative(rows)
        first = detectors[0].describe()
        ctx = Context(pipeline=pipe.name, target=opts.target,
                      date=datetime.now(timezone.utc).replace(microsecond=0).isoformat(), machine=machine_facts(),
                      backend=rows[0].backend, input_size=int(first["input_size"][0]), batch=1, iters=opts.iters,
                      warmup=opts.warmup, threads=first["runner"].get("intra_op_threads") or opts.threads,
                      latency_only=opts.latency_only, eval_split=data.name if data is not None else None,
                      eval_images=len(data) if data is not None else None, notes=notes)
        results = Results(ctx, rows, steps=list(steps or []))
        results.comparisons["ds2d2_vs_none"] = kd_comparison(results)
        out_dir.mkdir(parents=True, exist_ok=True)
        figures = {"pareto": plots.pareto_plot(results, out_dir / "pareto.png"),
                   "latency": plots.latency_plot(results, out_dir / "latency.png"),
                   "per_class": plots.per_class_plot(results, out_dir / "per_class_ap50.png")}
        if data is not None:
            figures["scene"] = scene_figure(results, variants, detectors, data, out_dir / "scene.png")
    finally:
        for det in detectors:
            det.close()
    results.figures = {k: Path(p).name for k, p in figures.items() if p is not None}
    write_outputs(results, out_dir)
    return results, out_dir


def write_outputs(results: Results, out_dir: Path) -> None:
    """results.json, report.md and report.html (figures must already be in out_dir)."""
    write_results(results, out_dir / "results.json")
    doc = build_document(results, out_dir)
    write_text_atomic(out_dir / "report.md", render_markdown(doc, out_dir))
    write_text_atomic(out_dir / "report.html", render_html(doc))


def print_headline(results: Results, console: Console | None = None) -> None:
    """The headline table on the terminal."""
    # Piped output (make demo | tee log) would get rich's 80-column default and truncate every cell.
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    table = Table(title=f"{results.context.pipeline} on {results.context.target}", caption=results.context.caption())
    cols = ("model", "params M", "GFLOPs", "MB", "mean ms", "p50 ms", "p99 ms", "img/s", "AP", "AP50", "AP_s",
            "ΔAP50", "speed-up")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    lead = story(results)
    if lead is not None:
        console.print(f"[bold]{lead}[/]")
    for r in story_order(results.rows):
        table.add_row(r.label, fmt(r.params, ".2f", 1e-6), fmt(r.gflops, ".2f"),
                      fmt(r.file_mb, ".1f"), fmt(r.mean_ms, ".1f"), fmt(r.p50_ms, ".1f"), fmt(r.p99_ms, ".1f"),
                      fmt(r.throughput_ips, ".1f"), fmt(r.AP, ".1f", 100), fmt(r.AP50, ".1f", 100),
                      fmt(r.AP_s, ".1f", 100), fmt(r.ap50_delta_vs_teacher, "+.1f"),
                      fmt(r.speedup_vs_teacher, ".2f", suffix="x"))
    console.print(table)
    for precision, metrics in (results.comparisons.get("ds2d2_vs_none") or {}).items():
        d = metrics["AP50"]
        console.print(f"DS2D2 vs no-KD student ({precision.upper()}): AP50 {fmt(d['ds2d2'], '.1f', 100)} vs "
                      f"{fmt(d['none'], '.1f', 100)} ({fmt(d['delta_points'], '+.1f')} points)")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser (pipeline names in --help)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--target", default="cpu", help="deploy target whose bundles are measured (default cpu)")
    parser.add_argument("--latency-only", action="store_true",
                        help="time randomly initialised networks of the pipeline (no trained weights needed)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default reports/<pipeline>/<target>)")
    parser.add_argument("--iters", type=int, default=50, help="timed rounds over all models (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per model first (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default all cores)")
    parser.add_argument("--backend", default=None, choices=BACKENDS,
                        help="runtime backend for every model (default ort-cpu for ONNX Runtime targets, else auto)")
    parser.add_argument("--eval-images", type=int, default=None, help="only the first N test images for accuracy")
    parser.add_argument("--calib-images", type=int, default=8,
                        help="calibration images with --latency-only (default 8)")
    parser.add_argument("--own-student-only", action="store_true",
                        help="with --latency-only: time only this pipeline's student, not also the students of "
                             "pipelines with the same teacher, data and input size (e.g. the edge students)")
    parser.add_argument("--no-build", dest="build", action="store_false",
                        help="use the bundles as they are; do not (re)build them with deploy.build")
    parser.add_argument("--work-dir", type=Path, default=None, help="where distill.run wrote checkpoints")
    add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and write the report; print the headline table and where it is."""
    args = build_parser().parse_args(argv)
    if args.eval_images is not None and args.eval_images < 1:
        raise UserError(f"--eval-images must be at least 1, got {args.eval_images}", where="--eval-images")
    opts = ReportOptions(pipeline=args.pipeline, target=args.target, latency_only=args.latency_only, out=args.out,
                         iters=args.iters, warmup=args.warmup, threads=args.threads, backend=args.backend,
                         eval_images=args.eval_images, calib_images=args.calib_images,
                         own_student_only=args.own_student_only, build=args.build,
                         config=args.config, overrides=list(args.overrides), work_dir=args.work_dir)
    results, out_dir = make_report(opts)
    print_headline(results)
    print(f"report: {out_dir / 'report.html'} (also report.md, results.json, "
          f"{', '.join(results.figures.values())})")
    return 0


if __name__ == "__main__":
    run_cli(main)
