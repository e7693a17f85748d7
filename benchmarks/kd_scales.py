"""What each distillation term weighs at the start of student training, to set (and check) the loss weights.

    python -m benchmarks.kd_scales PIPELINE [--steps N] [--device cpu|cuda] [--json PATH]

Runs N training batches of the pipeline's data (forward only) through a freshly initialised student, the pipeline's
trained teacher and, for DS2D2, its amplifier, and reports every method's terms at unit weight ("raw"), the
pipeline's weight for each and the weighted value, next to the detection loss. Both forms of the explicit stream and
of FitNet are measured (raw, and divided by the teacher's energy), and the FitNet weight the pipeline's rule implies:
FitNet's term equal to the sum of DS2D2's explicit terms at the start (the same share of the loss). Writes JSON.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from runtime.atomic import write_json_atomic
from runtime.cli import add_debug_flag, run_cli
from runtime.config import DistillConfig, DistillWeights, FitNetConfig, Pipeline, add_config_args, load_config
from runtime.errors import UserError

METHODS = ("ds2d2", "fitnet", "pkd", "fgd")
NORMS = ("raw", "teacher_energy")


def unit_config(pipe: Pipeline, norm: str) -> DistillConfig:
    """The pipeline's distill section with every weight 1 (the box terms follow their cls weight)."""
    ones = DistillWeights(explicit_low=1.0, explicit_high=1.0, implicit_full=1.0, implicit_high=1.0)
    fgd = pipe.distill.fgd.model_copy(update={"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "lambda_": 1.0})
    return pipe.distill.model_copy(update={"weights": ones, "explicit_norm": norm, "fitnet": FitNetConfig(weight=1.0),
                                           "pkd": pipe.distill.pkd.model_copy(update={"weight": 1.0}), "fgd": fgd})


def pipeline_weight(pipe: Pipeline, term: str, arch_pkd_weight: float) -> float | None:
    """The weight the pipeline gives a term (None for detection terms)."""
    d, w = pipe.distill, pipe.distill.weights
    if term.startswith("kd_implicit_"):
        amplifier, kind = term.removeprefix("kd_implicit_").split("_")
        return w.implicit(amplifier)[0 if kind == "cls" else 1]
    table = {"kd_explicit_low": w.explicit_low, "kd_explicit_high": w.explicit_high, "kd_fitnet": d.fitnet.weight,
             "kd_pkd": d.pkd.weight if d.pkd.weight is not None else arch_pkd_weight,
             "kd_fgd_fg": d.fgd.alpha, "kd_fgd_bg": d.fgd.beta, "kd_fgd_attention": d.fgd.gamma,
             "kd_fgd_global": d.fgd.lambda_}
    return table.get(term)


def measure(pipe: Pipeline, steps: int, device: torch.device, work_dir: Path | None = None) -> dict[str, Any]:
    """Mean raw term values over `steps` training batches, per method and explicit-stream form."""
    from distill.checkpoint import load_detector, thresholds_from_config
    from distill.data import epoch_batches, make_loader
    from distill.models import build_detector
    from distill.stages import PipelineRunner, stage_dir
    from distill.tasks import arch_module, build_task
    from distill.trainer import seed_everything

    runner = PipelineRunner(pipe, device)
    teacher_path = stage_dir(pipe, "teacher", work_dir=work_dir) / "model.pt"
    amplifier_path = stage_dir(pipe, "amplifier", work_dir=work_dir) / "model.pt"
    teacher, _ = load_detector(teacher_path, map_location=device)
    amplifier, _ = load_detector(amplifier_path, map_location=device)
    train, _, _ = runner.datasets("student")
    sched = pipe.schedule.student
    batches = epoch_batches(len(train), sched.batch_size, 0, sched.seed)[:steps]
    if not batches:
        raise UserError("the training split has no batch", where=pipe.name)
    seed_everything(sched.seed)
    student = build_detector(pipe.student, len(train.set.classes), pipe.input_size,
                             **thresholds_from_config(pipe.as_dict())).to(device)
    sums: dict[str, dict[str, float]] = {}
    for method in METHODS:
        for norm in (NORMS if method in ("ds2d2", "fitnet") else ("raw",)):
            seed_everything(sched.seed)  # the same adapter and RoI samples for every method
            task = build_task("student", model=student, teacher=teacher, amplifier=amplifier, method=method,
                              distill=unit_config(pipe, norm)).to(device).train()
            key = method if norm == "raw" else f"{method} ({norm})"
            totals: dict[str, float] = {}
            with torch.no_grad():
                for batch in make_loader(train, batches, 0):
                    batch = batch.to(device)
                    for name, value in task(batch.images, batch.targets).items():
                        totals[name] = totals.get(name, 0.0) + float(value) / len(batches)
            sums[key] = totals
    return {"terms": sums, "pkd_default_weight": arch_module(student).PKD_WEIGHT, "batches": len(batches),
            "teacher": str(teacher_path), "amplifier": str(amplifier_path)}


def implied_fitnet_weight(terms: dict[str, dict[str, float]], pipe: Pipeline, norm: str) -> float:
    """FitNet weight making its term equal the pipeline's weighted explicit terms at the start, in form `norm`."""
    w = pipe.distill.weights
    ds2d2 = terms["ds2d2" if norm == "raw" else f"ds2d2 ({norm})"]
    fitnet = terms["fitnet" if norm == "raw" else f"fitnet ({norm})"]["kd_fitnet"]
    return (w.explicit_low * ds2d2["kd_explicit_low"] + w.explicit_high * ds2d2["kd_explicit_high"]) / fitnet


def in_use_form(key: str, pipe: Pipeline) -> bool:
    """Whether a measured variant ('ds2d2', 'ds2d2 (teacher_energy)', 'pkd'...) is the form the pipeline trains."""
    method, _, form = key.partition(" (")
    return method not in ("ds2d2", "fitnet") or (form.rstrip(")") or "raw") == pipe.distill.explicit_norm


def build_result(pipe: Pipeline, measured: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The JSON-ready result: per method, each term's raw value, the pipeline's weight, the weighted value."""
    from benchmarks.distill_cost import machine_facts

    rows = []
    for method, terms in measured["terms"].items():
        detection = sum(v for k, v in terms.items() if not k.startswith("kd_"))
        for term, raw in terms.items():
            if not term.startswith("kd_"):
                continue
            weight = pipeline_weight(pipe, term, measured["pkd_default_weight"])
            in_use = in_use_form(method, pipe)
            rows.append({"method": method, "term": term, "raw": raw, "weight": weight if in_use else None,
                         "weighted": raw * weight if in_use and weight is not None else None,
                         "detection_loss": detection})
    return {"pipeline": pipe.name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_facts(), "device": str(device), "input_size": pipe.input_size,
            "batch": pipe.schedule.student.batch_size, "batches": measured["batches"],
            "explicit_norm": pipe.distill.explicit_norm, "teacher": measured["teacher"],
            "amplifier": measured["amplifier"], "rows": rows,
            "fitnet_weight_by_rule": {norm: implied_fitnet_weight(measured["terms"], pipe, norm) for norm in NORMS}}


def print_table(result: dict[str, Any], console: Console | None = None) -> None:
    """One row per (method, term): raw, weight, weighted, and the detection loss it sits next to."""
    table = Table(title=f"KD terms at the start of training — {result['pipeline']}, {result['input_size']} px, batch "
                        f"{result['batch']} x {result['batches']} batches, {result['device']}, {result['date']}")
    for col in ("method", "term", "raw (weight 1)", "pipeline weight", "weighted", "detection loss"):
        table.add_column(col, justify="left" if col in ("method", "term") else "right")
    for r in result["rows"]:
        table.add_row(r["method"], r["term"], f"{r['raw']:.4g}", "-" if r["weight"] is None else f"{r['weight']:.3g}",
                      "-" if r["weighted"] is None else f"{r['weighted']:.4g}", f"{r['detection_loss']:.4g}")
    console = console or Console()
    console.print(table)
    rule = ", ".join(f"{k}: {v:.3g}" for k, v in result["fitnet_weight_by_rule"].items())
    console.print(f"FitNet weight by the explicit-stream rule (term = weighted explicit terms at the start): {rule}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kd_scales", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--steps", type=int, default=4, help="training batches to average over (default 4)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where distill.run wrote the teacher/amplifier")
    parser.add_argument("--json", type=Path, default=None, help="output (default reports/<pipeline>/kd_scales.json)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError("--steps must be >= 1", where="--steps")
    cfg = load_config(args.config, list(args.overrides), args.pipeline)
    pipe = cfg.pipeline(args.pipeline)
    device = torch.device(args.device)
    result = build_result(pipe, measure(pipe, args.steps, device, args.work_dir), device)
    print_table(result)
    out = args.json or cfg.path(Path("reports") / pipe.name / "kd_scales.json")
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
