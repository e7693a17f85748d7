"""DS2D2 against the other distillers, honestly: the same student, teacher, amplifier, schedule and data, N seeds.

    python -m benchmarks.kd_compare PIPELINE [--methods ds2d2 none fitnet pkd fgd] [--seeds N] [--device cpu|cuda]

Trains (or reuses) the pipeline's teacher and, for DS2D2, its amplifier once, then every requested student for each
of N student seeds (schedule.student.seed, +1, ...: the student's initialisation, sample order and flips). Every
student is selected and scored like any distill.run stage (selection on val when the dataset has one, else the final
epoch; scored once on test). Writes `kd_compare.json` and `kd_compare.md` (default reports/<pipeline>/kd_compare/):
AP, AP50, AP_s per method as mean +- std over seeds, the gain over `none`, the share of the teacher-student gap
closed, and the student-stage wall time per method. Finished students are reused, so an interrupted comparison
continues where it stopped.
"""
from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from runtime.atomic import write_bytes_atomic, write_json_atomic
from runtime.cli import add_debug_flag, run_cli
from runtime.config import DISTILL_METHODS, Pipeline, add_config_args, load_config
from runtime.errors import UserError

METHODS = DISTILL_METHODS
METRICS = ("AP", "AP50", "AP_s")
NAMES = {"ds2d2": "DS2D2", "none": "no KD", "fitnet": "FitNet", "pkd": "PKD", "fgd": "FGD"}


@dataclass
class Spread:
    """Mean and sample standard deviation over seeds (std None with a single seed)."""

    mean: float
    std: float | None
    values: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of a non-empty list of values."""
        values = [float(v) for v in values]
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, values)


@dataclass
class MethodResult:
    """One method over all seeds: metric spreads, gain over `none`, share of the teacher gap closed, wall time."""

    method: str
    seeds: list[int]
    metrics: dict[str, Spread]
    wall_time_s: Spread
    gain_over_none: dict[str, float] = field(default_factory=dict)  # difference of the means
    gain_beyond_spread: dict[str, bool] = field(default_factory=dict)  # gain > the larger of the two stds
    gap_closed: dict[str, float | None] = field(default_factory=dict)  # (method - none) / (teacher - none)


def summarise(teacher: dict[str, float], runs: dict[str, list[dict[str, Any]]]) -> list[MethodResult]:
    """Per-method statistics from per-seed runs ({method: [{seed, AP, AP50, AP_s, wall_time_s}, ...]})."""
    results = []
    for method, method_runs in runs.items():
        if not method_runs:
            continue
        results.append(MethodResult(method, [r["seed"] for r in method_runs],
                                    {m: Spread.of([r[m] for r in method_runs]) for m in METRICS},
                                    Spread.of([r["wall_time_s"] for r in method_runs])))
    base = next((r for r in results if r.method == "none"), None)
    if base is None:
        return results
    for result in results:
        for m in METRICS:
            gain = result.metrics[m].mean - base.metrics[m].mean
            spread = max(s for s in (result.metrics[m].std, base.metrics[m].std, 0.0) if s is not None)
            result.gain_over_none[m] = gain
            result.gain_beyond_spread[m] = result.method != "none" and gain > spread
            gap = teacher[m] - base.metrics[m].mean
            result.gap_closed[m] = gain / gap if gap > 0 else None  # a teacher below the student leaves no gap
    return results


def versus(results: list[MethodResult], method: str = "ds2d2", metric: str = "AP50") -> dict[str, dict[str, Any]]:
    """`method` against every other method: the difference of the means and whether it exceeds one std of either."""
    mine = next((r for r in results if r.method == method), None)
    if mine is None:
        return {}
    out = {}
    for other in results:
        if other.method == method:
            continue
        diff = mine.metrics[metric].mean - other.metrics[metric].mean
        spread = max(s for s in (mine.metrics[metric].std, other.metrics[metric].std, 0.0) if s is not None)
        out[other.method] = {"metric": metric, "difference": diff, "larger_std": spread,
                             "beyond_one_std": diff > spread}
    return out


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def markdown(report: dict[str, Any], results: list[MethodResult]) -> str:
    """The comparison as a Markdown table, with the facts every figure depends on."""
    ctx = report["context"]
    lines = [f"# Distillation methods on `{report['pipeline']}`", "",
             f"{ctx['date']}; {ctx['machine']}; PyTorch {ctx['torch']} on {ctx['device']} ({ctx['precision']}), "
             f"input {ctx['input_size']}x{ctx['input_size']}, {len(report['seeds'])} student seed(s) "
             f"{report['seeds']}, student epochs: {ctx['student_epochs']}; COCO metrics (%) on the "
             f"`{ctx['scored_on']}` split, students selected by: {ctx['selection']}.", "",
             "| method | AP | AP50 | AP_s | AP50 gain over no KD | beyond seed spread | teacher gap closed (AP50) | "
             "student wall time / run |", "|---|---:|---:|---:|---:|:---:|---:|---:|"]
    t = report["teacher"]
    lines.append(f"| teacher | {_pct(t['AP'])} | {_pct(t['AP50'])} | {_pct(t['AP_s'])} | | | | "
                 f"{t['wall_time_s']:.0f} s |")
    for r in results:
        gap = r.gap_closed.get("AP50")
        beyond = "" if r.method == "none" or "AP50" not in r.gain_beyond_spread else \
            ("yes" if r.gain_beyond_spread["AP50"] else "no")
        lines.append(
            f"| {NAMES.get(r.method, r.method)} | {_pct(r.metrics['AP'].mean, r.metrics['AP'].std)} | "
            f"{_pct(r.metrics['AP50'].mean, r.metrics['AP50'].std)} | "
            f"{_pct(r.metrics['AP_s'].mean, r.metrics['AP_s'].std)} | "
            f"{'' if r.method == 'none' else _signed(r.gain_over_none.get('AP50'))} | {beyond} | "
            f"{'' if r.method == 'none' or gap is None else f'{100 * gap:.0f}%'} | "
            f"{r.wall_time_s.mean:.0f} s |")
    if report.get("amplifier_wall_time_s") is not None:
        lines += ["", f"DS2D2 also needs the amplifier stage once per teacher: "
                      f"{report['amplifier_wall_time_s']:.0f} s."]
    if report["ds2d2_versus"]:
        beaten = [NAMES.get(m, m) for m, v in report["ds2d2_versus"].items() if v["beyond_one_std"]]
        not_beaten = [NAMES.get(m, m) for m, v in report["ds2d2_versus"].items() if not v["beyond_one_std"]]
        lines += ["", "DS2D2's mean AP50 exceeds, by more than the larger of the two standard deviations: "
                      f"{', '.join(beaten) or 'none of the others'}"
                      + (f"; not: {', '.join(not_beaten)}." if not_beaten else ".")]
    lines += ["", "Mean ± sample standard deviation over the seeds; 'beyond seed spread': the gain exceeds the larger "
                  "of the two methods' standard deviations. Gap closed = (method − no KD) / (teacher − no KD)."]
    return "\n".join(lines) + "\n"


def print_table(report: dict[str, Any], results: list[MethodResult], console: Console | None = None) -> None:
    """The comparison in the terminal."""
    ctx = report["context"]
    table = Table(title=f"{report['pipeline']}: {len(report['seeds'])} seed(s), {ctx['device']} {ctx['precision']}, "
                        f"{ctx['input_size']} px, COCO % on {ctx['scored_on']}")
    for col in ("method", "AP", "AP50", "AP_s", "AP50 gain", "gap closed", "wall / run"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    t = report["teacher"]
    table.add_row("teacher", _pct(t["AP"]), _pct(t["AP50"]), _pct(t["AP_s"]), "", "", f"{t['wall_time_s']:.0f} s")
    for r in results:
        gap = r.gap_closed.get("AP50")
        table.add_row(NAMES.get(r.method, r.method), *(_pct(r.metrics[m].mean, r.metrics[m].std) for m in METRICS),
                      "" if r.method == "none" else _signed(r.gain_over_none.get("AP50")),
                      "" if r.method == "none" or gap is None else f"{100 * gap:.0f}%", f"{r.wall_time_s.mean:.0f} s")
    (console or Console()).print(table)


def _stage_record(directory: Path) -> dict[str, Any]:
    """metrics.json of a finished stage plus the upstream sha256s its model.pt was trained from."""
    import json

    from distill.checkpoint import load_checkpoint

    record = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    record["inputs"] = load_checkpoint(directory / "model.pt", mmap=True).get("inputs", {})
    return record


def _run_row(record: dict[str, Any]) -> dict[str, Any]:
    return {"seed": record["run"]["seed"], **{m: record["metrics"][m] for m in METRICS},
            "wall_time_s": record["run"]["wall_time_s"], "checkpoint_sha256": record["checkpoint"]["sha256"],
            "selection": (record.get("selection") or {}).get("rule"), "scored_on": record["metrics"]["split"]}


def compare(config: Path | None, overrides: list[str], pipeline: str | None, methods: Sequence[str], seeds: int,
            device_kind: str, console: Console) -> tuple[dict[str, Any], list[MethodResult]]:
    """Train what is missing and gather the comparison (the JSON report and the per-method results)."""
    import torch

    from distill.stages import PipelineRunner, stage_dir
    from distill.trainer import device_name
    from runtime.machine import cpu_model

    pipe = load_config(config, overrides, pipeline).pipeline(pipeline)
    device = torch.device(device_kind)
    base = PipelineRunner(pipe, device, console=console)
    base.run_stage("teacher", "none")
    if "ds2d2" in methods:
        base.run_stage("amplifier", "ds2d2")
    seed_list = [pipe.schedule.student.seed + i for i in range(seeds)]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    teachers = set()
    for seed in seed_list:
        seeded = load_config(config, [*overrides, f"schedule.student.seed={seed}"], pipeline).pipeline(pipe.name)
        runner = PipelineRunner(seeded, device, console=console, per_seed_students=True)
        for method in methods:
            runner.run_stage("student", method)
            record = _stage_record(runner.student_dir(method))
            if method != "none":
                teachers.add(record["inputs"].get("teacher"))
            runs[method].append(_run_row(record))
    if len(teachers) > 1:  # cannot happen through the runner; guards hand-edited run directories
        raise UserError("the students were distilled from different teachers", where=str(pipe.work_dir),
                        fix="rerun kd_compare so every student is trained from the same teacher")
    teacher = _stage_record(stage_dir(pipe, "teacher"))
    amplifier_time = _stage_record(stage_dir(pipe, "amplifier"))["run"]["wall_time_s"] if "ds2d2" in methods else None
    results = summarise(teacher["metrics"], runs)
    first = runs[methods[0]][0]
    amp = pipe.schedule.student.amp and device.type == "cuda"
    report = {
        "pipeline": pipe.name, "methods": list(methods), "seeds": seed_list,
        "context": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": (f"{cpu_model()}, {os.cpu_count()} cores" if device.type == "cpu"
                                else device_name(device)),
                    "device": device.type, "precision": "AMP fp16/fp32" if amp else "fp32",
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "input_size": pipe.input_size,
                    "student_epochs": pipe.schedule.student.epochs, "scored_on": first["scored_on"],
                    "selection": first["selection"]},
        "teacher": {**{m: teacher["metrics"][m] for m in METRICS}, "wall_time_s": teacher["run"]["wall_time_s"],
                    "checkpoint_sha256": teacher["checkpoint"]["sha256"]},
        "amplifier_wall_time_s": amplifier_time,
        "settings": {m: _method_settings(pipe, m) for m in methods},
        "runs": runs,
        "results": [asdict(r) for r in results],
        "ds2d2_versus": versus(results),
    }
    return report, results


def _method_settings(pipe: Pipeline, method: str) -> dict[str, Any]:
    """The part of the distill section a method was trained with (for the record)."""
    from distill.stages import METHOD_CONFIG

    data = pipe.distill.model_dump(mode="json")
    return {k: data[k] for k in METHOD_CONFIG[method]}


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kd_compare", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="students to compare (default: all five)")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per method (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--work-dir", type=Path, default=None, help="where runs go (default: work_dir of the config)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default reports/<pipeline>/kd_compare)")
    add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    from distill.run import pick_device

    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise UserError("--seeds must be >= 1", where="--seeds")
    methods = list(dict.fromkeys(args.methods))  # drop repeats, keep the order given
    overrides = list(args.overrides) + ([f"work_dir={args.work_dir.resolve()}"] if args.work_dir else [])
    console = Console(stderr=True)
    report, results = compare(args.config, overrides, args.pipeline, methods, args.seeds, pick_device(args.device),
                              console)
    cfg = load_config(args.config, overrides, args.pipeline)
    out = args.out or cfg.path(Path("reports") / report["pipeline"] / "kd_compare")
    write_json_atomic(out / "kd_compare.json", report)
    write_bytes_atomic(out / "kd_compare.md", markdown(report, results).encode("utf-8"))
    print_table(report, results)
    console.print(f"wrote {out / 'kd_compare.json'} and {out / 'kd_compare.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
