"""`python -m benchmarks.data_seeds [PIPELINE] [--seeds 0 1 2] [--students]`: does the recipe learn on any draw of
the synthetic data?

For each generator seed the pipeline's synthetic dataset is generated anew (same parameters, another seed) under
`<root>-seed<N>` and the teacher (with --students: also the DS2D2 and no-KD students) is trained with the
pipeline's own recipe in `<work_dir>/<pipeline>-data-seed<N>`; seed 0 is the pipeline's own data and run directory,
so `make demo`'s checkpoints are reused. Writes data_seeds.json and data_seeds.md (test-split COCO AP / AP50 of each
model, how its checkpoint was selected, wall time) to reports/<pipeline>/.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from runtime.atomic import write_bytes_atomic, write_json_atomic
from runtime.cli import add_debug_flag, run_cli
from runtime.config import Pipeline, add_config_args, load_config
from runtime.errors import UserError
from runtime.machine import machine_facts


def seed_overrides(pipe: Pipeline, seed: int) -> list[str]:
    """--set items that point the pipeline at generator seed `seed` (its own data and runs for seed 0)."""
    if seed == 0 and pipe.dataset.synthetic.get("seed", 0) == 0:
        return []
    dataset = pipe.spec.dataset if isinstance(pipe.spec.dataset, str) else None
    if dataset is None:
        raise UserError("data seeds need a pipeline whose dataset is a named entry of pipelines.yaml",
                        where=f"pipelines.{pipe.name}.dataset")
    root = f"{pipe.dataset.root.rstrip('/')}-seed{seed}"
    return [f"datasets.{dataset}.synthetic.seed={seed}", f"datasets.{dataset}.root={root}",
            f"work_dir={pipe.project.path(pipe.project.work_dir) / f'{pipe.name}-data-seed{seed}'}"]


def stage_record(pipe: Pipeline, stage: str, method: str | None = None) -> dict[str, Any]:
    """Test metrics and run facts of a finished stage (its metrics.json)."""
    from distill.stages import stage_dir

    record = json.loads((stage_dir(pipe, stage, method) / "metrics.json").read_text(encoding="utf-8"))
    metrics, run = record.get("metrics", {}), record.get("run", {})
    return {"AP": metrics.get("AP"), "AP50": metrics.get("AP50"), "AP_s": metrics.get("AP_s"),
            "scored_on": metrics.get("split"), "selected_on": run.get("selected_on"),
            "best_epoch": run.get("best_epoch"), "epochs": run.get("epochs"), "wall_time_s": run.get("wall_time_s")}


def run_seed(config: Path | None, overrides: Sequence[str], name: str, seed: int, students: bool,
             device: str) -> dict[str, Any]:
    """Train (or reuse) the teacher — and the students — of generator seed `seed`; returns their records."""
    import torch

    from distill.stages import PipelineRunner

    base = load_config(config, list(overrides), pipeline=name).pipeline(name)
    if base.dataset.synthetic is None:
        raise UserError(f"pipeline {name!r} does not use the synthetic generator", where=f"pipelines.{name}.dataset",
                        fix="use a synthetic pipeline such as demo_retina")
    pipe = load_config(config, [*overrides, *seed_overrides(base, seed)], pipeline=name).pipeline(name)
    runner = PipelineRunner(pipe, torch.device(device))
    runner.run(["teacher"], "none")
    out = {"seed": seed, "dataset_root": str(pipe.dataset_root), "teacher": stage_record(pipe, "teacher")}
    if students:
        runner.run(["amplifier", "student"], "ds2d2")
        runner.run(["student"], "none")
        out["students"] = {m: stage_record(pipe, "student", m) for m in ("ds2d2", "none")}
    return out


def markdown(pipe_name: str, rows: list[dict[str, Any]], machine: str) -> str:
    """The Markdown table of data_seeds.md."""
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"# {pipe_name}: the same recipe on other draws of the synthetic data", "",
             "| generator seed | teacher AP50 | teacher AP | DS2D2 student AP50 | no-KD student AP50 | selected on | "
             "teacher wall time (s) |", "|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        t, s = r["teacher"], r.get("students", {})
        lines.append(f"| {r['seed']} | {pct(t['AP50'])} | {pct(t['AP'])} | {pct(s.get('ds2d2', {}).get('AP50'))} | "
                     f"{pct(s.get('none', {}).get('AP50'))} | {t['selected_on'] or '—'} | "
                     f"{t['wall_time_s'] or 0:.0f} |")
    ap50 = [r["teacher"]["AP50"] for r in rows if r["teacher"]["AP50"] is not None]
    if len(ap50) > 1:
        lines += ["", f"Teacher AP50 over {len(ap50)} seeds: {100 * statistics.mean(ap50):.1f} +- "
                      f"{100 * statistics.stdev(ap50):.1f} (mean +- std), min {100 * min(ap50):.1f}."]
    lines += ["", f"COCO AP on each seed's test split (faster-coco-eval, PyTorch). Machine: {machine}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Train the teacher (and students) on each generator seed and write the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_seeds", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="generator seeds (default 0 1 2)")
    parser.add_argument("--students", action="store_true", help="also train the DS2D2 and no-KD students")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default reports/<pipeline>)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides, pipeline=args.pipeline)
    pipe = cfg.pipeline(args.pipeline)
    rows = [run_seed(args.config, args.overrides, pipe.name, seed, args.students, args.device) for seed in args.seeds]
    facts = machine_facts()
    machine = f"{facts.get('cpu_model', 'CPU')} ({facts.get('cpus_usable', '?')} cores), PyTorch {args.device}"
    out = args.out or cfg.path("reports") / pipe.name
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "data_seeds.json", {"pipeline": pipe.name, "machine": facts, "seeds": rows})
    write_bytes_atomic(out / "data_seeds.md", markdown(pipe.name, rows, machine).encode("utf-8"))
    table = Table(title=f"{pipe.name}: teacher on each generator seed (test split)")
    for col in ("seed", "AP50", "AP", "selected on", "wall s"):
        table.add_column(col, justify="right")
    for r in rows:
        t = r["teacher"]
        table.add_row(str(r["seed"]), f"{100 * t['AP50']:.1f}", f"{100 * t['AP']:.1f}", str(t["selected_on"]),
                      f"{t['wall_time_s'] or 0:.0f}")
    Console().print(table)
    print(f"written: {out / 'data_seeds.md'}, {out / 'data_seeds.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
