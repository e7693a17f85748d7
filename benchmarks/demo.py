"""`make demo` = `python -m benchmarks.demo`: the whole chain on the synthetic default, end to end, on a CPU.

generate the data -> teacher -> high-frequency amplifier -> DS2D2 student -> no-KD student -> deploy for the CPU
(INT8; teacher, both students) and a Jetson bundle -> runtime.evaluate and runtime.bench -> the benchmark report.
Every step is the real command a user would type (printed before it runs); finished stages are reused, so a second
run only re-measures. Ends with the headline table, the step times and the report's path.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.report import ReportOptions, make_report, print_headline, write_outputs
from runtime.cli import add_debug_flag, run_cli
from runtime.config import Pipeline, add_config_args, load_config
from runtime.errors import UserError


@dataclass
class Step:
    """One demo step: a CLI command (python -m ...) and the files whose change means it did work."""

    name: str
    command: list[str]
    outputs: list[Path] = field(default_factory=list)

    def shown(self) -> str:
        """The command as a user would type it."""
        return shlex.join(["python", *self.command])


def _stamps(paths: Sequence[Path]) -> list[float | None]:
    return [p.stat().st_mtime if p.exists() else None for p in paths]


def run_step(step: Step, console: Console, log: Any) -> dict[str, Any]:
    """Run one step, streaming its output to the terminal and the log; 'reused' when its outputs did not change."""
    console.rule(f"[bold]{step.name}")
    console.print(f"$ {step.shown()}", markup=False, highlight=False)
    before = _stamps(step.outputs)
    start = time.perf_counter()
    log.write(f"\n$ {step.shown()}\n")
    log.flush()
    if sys.stdout.isatty():
        # On a terminal the child keeps it, so its progress bars stay live; the log gets the commands only.
        proc = subprocess.Popen([sys.executable, *step.command])
    else:
        proc = subprocess.Popen([sys.executable, *step.command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:  # tee: whoever reads the pipe sees progress, the log keeps it
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
    if proc.wait() != 0:
        raise UserError(f"demo step '{step.name}' failed (exit {proc.returncode})", where=step.shown(),
                        fix="see the output above; fix it and run `make demo` again — finished steps are reused")
    wall = time.perf_counter() - start
    reused = bool(step.outputs) and None not in before and before == _stamps(step.outputs)
    return {"name": step.name, "command": step.shown(), "wall_s": wall, "status": "reused" if reused else "ran"}


def demo_steps(pipe: Pipeline, artifacts: Path, out_dir: Path, config_args: list[str], iters: int,
               jetson: bool = True) -> list[Step]:
    """The chain as commands; `config_args` (--config / --set) go to every one of them, JSON reports to `out_dir`.
    `jetson`: also make and evaluate a bundle for the 'jetson' target."""
    name, work = pipe.name, pipe.work_dir
    bundles = artifacts / name
    ckpt = lambda stage: work / stage / "model.pt"  # noqa: E731

    data: list[str] = []
    if pipe.dataset.synthetic is not None:  # a real dataset needs nothing generated: distill.run reads it
        sets = [f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in pipe.dataset.synthetic.items()]
        data = ["-m", "runtime.data", "synth", str(pipe.dataset_root), "--overwrite",
                *[a for s in sets for a in ("--set", s)]]
    train = ["-m", "distill.run", name, *config_args, "--stage"]
    deploy = ["-m", "deploy.build", "--pipeline", name, *config_args, "--target"]
    cpu_student = str(bundles / "cpu" / "student")
    steps = [
        *([Step("generate the synthetic data", data, outputs=[pipe.dataset_root / "manifest.json"])] if data else []),
        Step("train the teacher", [*train, "teacher"], outputs=[ckpt("teacher")]),
        Step("train the high-frequency amplifier", [*train, "amplifier"], outputs=[ckpt("amplifier")]),
        Step("train the DS2D2 student", [*train, "student", "--method", "ds2d2"], outputs=[ckpt("student-ds2d2")]),
        Step("train the no-KD student (baseline)", [*train, "student", "--method", "none"],
             outputs=[ckpt("student-none")]),
        Step("deploy teacher + DS2D2 student for the CPU (INT8)", [*deploy, "cpu", "--model", "both"],
             outputs=[bundles / "cpu" / r / "manifest.json" for r in ("teacher", "student")]),
        Step("deploy the no-KD student for the CPU (INT8)",
             [*deploy, "cpu", "--model", "student", "--checkpoint", str(ckpt("student-none")),
              "--out", str(bundles / "cpu" / "student-none")],
             outputs=[bundles / "cpu" / "student-none" / "manifest.json"]),
    ]
    if jetson:
        steps += [
            Step("deploy the DS2D2 student for a Jetson (INT8 Q/DQ + build_engine.sh)",
                 [*deploy, "jetson", "--model", "student"], outputs=[bundles / "jetson" / "manifest.json"]),
            Step("evaluate the Jetson bundle's INT8 ONNX on the CPU (runtime.evaluate)",
                 ["-m", "runtime.evaluate", str(bundles / "jetson"), "--backend", "ort-cpu", "--precision", "int8",
                  "--dataset", str(pipe.dataset_root), "--format", pipe.dataset.format,
                  "--split", pipe.dataset.test_split, "--json", str(out_dir / "evaluate_jetson_int8.json")]),
        ]
    return steps + [
        Step("benchmark the CPU student bundle (runtime.bench)",
             ["-m", "runtime.bench", cpu_student, "--backend", "ort-cpu", "--precision", "int8",
              "--iters", str(iters), "--warmup", "5", "--json", str(out_dir / "bench_cpu_student_int8.json")]),
    ]


def print_steps(steps: list[dict[str, Any]], console: Console) -> None:
    """Step times table."""
    table = Table(title="make demo — steps")
    for col in ("step", "status", "seconds"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for s in steps:
        table.add_row(s["name"], s["status"], f"{s['wall_s']:.1f}")
    table.add_row("[bold]total", "", f"[bold]{sum(s['wall_s'] for s in steps):.1f}")
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo chain, then the report; print the headline table and where the report is."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--iters", type=int, default=50, help="timed rounds in the report and runtime.bench (50)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cfg = load_config(args.config, args.overrides, args.pipeline)
    pipe = cfg.pipeline(args.pipeline)
    config_args = (["--config", str(args.config)] if args.config else []) + \
        [arg for item in args.overrides for arg in ("--set", item)]
    # Wide output even when piped to a log: the tables are the point of the demo.
    console = Console(width=None if sys.stdout.isatty() else 150)
    out_dir = cfg.path("reports") / pipe.name / "cpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    with open(out_dir / "demo.log", "a", encoding="utf-8") as log:
        for step in demo_steps(pipe, cfg.path(cfg.artifacts_dir), out_dir, config_args, args.iters,
                               "jetson" in cfg.targets):
            done.append(run_step(step, console, log))
    console.rule("[bold]benchmark report (python -m benchmarks.report)")
    start = time.perf_counter()
    opts = ReportOptions(pipeline=pipe.name, target="cpu", out=out_dir, iters=args.iters, build=False,
                         config=args.config, overrides=list(args.overrides))
    results, out_dir = make_report(opts, steps=done, console=console)
    done.append({"name": "benchmark report", "command": f"python -m benchmarks.report {pipe.name} --no-build",
                 "wall_s": time.perf_counter() - start, "status": "ran"})
    results.steps = done
    results.context.notes.append(f"`make demo` wall time: {time.perf_counter() - started:.0f} s "
                                 f"({sum(s['status'] == 'reused' for s in done)} of {len(done)} steps reused).")
    write_outputs(results, out_dir)  # again, now with the report step's own time
    console.rule("[bold]done")
    print_steps(done, console)
    print_headline(results, console)
    console.print(f"[bold]report:[/] {out_dir / 'report.html'}  (also report.md, results.json, PNGs; log: "
                  f"{out_dir / 'demo.log'})")
    return 0


if __name__ == "__main__":
    run_cli(main)
