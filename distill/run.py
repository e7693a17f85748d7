"""`python -m distill.run [pipeline]`: teacher -> high-frequency amplifier -> student, then a summary table.

Stages whose finished model.pt matches the current config are skipped; `--resume` continues an interrupted stage
exactly. Scale out with `torchrun --nproc_per_node=N -m distill.run ...` (DDP; gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from distill.distributed import cleanup, init_distributed
from distill.stages import METHODS, PipelineRunner, plan
from distill.summary import print_summary, write_summary
from runtime.cli import add_debug_flag, run_cli
from runtime.config import add_config_args, load_config
from runtime.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (pipeline names from pipelines.yaml in --help)."""
    parser = argparse.ArgumentParser(
        prog="python -m distill.run",
        description="Train a DS2D2 pipeline: teacher -> high-frequency amplifier -> student, then a summary table.",
        epilog="Writes <work_dir>/<pipeline>/{teacher,amplifier,student-<method>}/ (last.pt, model.pt, log.jsonl, "
               "metrics.json; best.pt when the dataset has a val split, which then selects model.pt; without one "
               "model.pt is the final epoch: the test split never selects) and summary.json. Several processes: "
               "torchrun --nproc_per_node=N -m distill.run ...")
    add_config_args(parser)
    parser.add_argument("--stage", default="all", choices=("teacher", "amplifier", "student", "all"),
                        help="run one stage only (default: all, skipping up-to-date stages)")
    parser.add_argument("--teacher", type=Path, default=None, metavar="PATH",
                        help="use this teacher model.pt instead of training the teacher stage")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="distillation method of the student stage (default: the pipeline's distill.method); "
                        "baselines: none (no KD), fitnet, pkd, fgd, each with its own weights in distill.<method>")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="training device (default: cuda when available)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last.pt")
    parser.add_argument("--work-dir", type=Path, default=None, help="where runs go (default: work_dir of the config)")
    add_debug_flag(parser)
    return parser


def pick_device(requested: str | None) -> str:
    """'cuda' or 'cpu': the requested one (checked) or the best available."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU", where="--device", fix="use --device cpu")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the requested stages of a pipeline and print the summary."""
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.method:
        overrides.append(f"distill.method={args.method}")
    if args.work_dir:
        overrides.append(f"work_dir={args.work_dir.resolve()}")
    project = load_config(args.config, overrides, pipeline=args.pipeline)
    pipe = project.pipeline(args.pipeline)
    method = pipe.distill.method
    stages = plan(args.stage, method, args.teacher)
    if args.teacher is not None and not args.teacher.is_file():
        raise UserError("teacher checkpoint not found", where=str(args.teacher), fix="pass a teacher model.pt")

    info, device = init_distributed(pick_device(args.device))
    console = Console(stderr=True, quiet=not info.is_main)
    try:
        runner = PipelineRunner(pipe, device, info, resume=args.resume, teacher_path=args.teacher, console=console)
        runner.run(stages, method)
    finally:
        cleanup()
    if info.is_main:
        path, entries = write_summary(pipe.work_dir, pipe.name)
        print_summary(entries, f"{pipe.name}: COCO AP on the test split (%)", Console())
        console.print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
