"""What DS2D2 costs during training: a plain student step, a DS2D2 step and the DS2D2 loss terms alone, side by side
on the same batch, plus DISW build time for 10/100/1000 boxes, vectorised vs the per-box loop.

    python -m benchmarks.distill_cost [PIPELINE] [--iters N] [--batch B] [--device cpu|cuda] [--tiny] [--json PATH]

Every figure is the median of --iters (>= 20) timed calls after --warmup untimed ones (benchmarks.timing); ratios
are ratios of medians. Weights are random (the cost of a step does not depend on them). Prints a table and writes
JSON.
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

from benchmarks.timing import DEFAULT_WARMUP, MIN_CALLS, Timing, measure_interleaved
from benchmarks.workload import NO_DOWNLOAD, TINY_OVERRIDES, Workload, build_workload, optimizer_for, student_task
from distill.ds2d2.disw import disw_weights, disw_weights_reference
from distill.models.backbones import fpn_features
from runtime.atomic import write_json_atomic
from runtime.cli import add_debug_flag, run_cli
from runtime.config import add_config_args, load_config
from runtime.errors import UserError

DISW_BOXES = (10, 100, 1000)


def step_fn(task, optimizer, work: Workload):
    """One optimiser step of `task` on the workload's batch (forward, backward, update)."""
    def step() -> None:
        losses = task(work.images, work.targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    return step


def loss_term_fns(task, work: Workload) -> dict[str, Any]:
    """Callables for the DS2D2 pieces alone on fixed features: teacher forward, explicit, implicit, both.

    Student features and target assignment are computed once; they are leaves, so backward stops at them.
    """
    batch, targets = task.model.transform(list(work.images), [dict(t) for t in work.targets])
    _, s_feats, state = task.arch.train_step(task.model, batch, targets)
    s_feats = [f.detach().requires_grad_(True) for f in s_feats]
    with torch.no_grad():
        t_feats = fpn_features(task.teacher, batch.tensors)
    boxes = [t["boxes"] for t in targets]
    hw = batch.tensors.shape[-2:]

    def explicit() -> dict:
        return task.explicit(task.adapter(s_feats), t_feats, boxes, hw)

    def implicit() -> dict:
        return task.implicit(task.adapter(s_feats) if task.widths_differ else s_feats, t_feats, state)

    def backward(terms_fn):
        def run() -> None:
            sum(terms_fn().values()).backward()
            for f in s_feats:
                f.grad = None
            task.adapter.zero_grad(set_to_none=True)
        return run

    @torch.no_grad()
    def teacher_forward() -> None:
        fpn_features(task.teacher, batch.tensors)

    return {
        "teacher features (no grad)": teacher_forward,
        "DS2D2 explicit terms, fwd+bwd": backward(explicit),
        "DS2D2 implicit terms, fwd+bwd": backward(implicit),
        "DS2D2 all terms, fwd only": lambda: (explicit(), implicit()),
        "DS2D2 all terms, fwd+bwd": backward(lambda: explicit() | implicit()),
    }


def disw_inputs(num_boxes: int, batch: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """`num_boxes` random xyxy boxes per image (sides 2..S/4 px), for DISW timing."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        wh = 2 + torch.rand(num_boxes, 2, generator=gen) * (size / 4 - 2)
        xy = torch.rand(num_boxes, 2, generator=gen) * (size - wh)
        out.append(torch.cat([xy, xy + wh], 1))
    return out


def run_disw(size: int, batch: int, iters: int, warmup: int, device: str) -> list[dict[str, Any]]:
    """DISW build time on the P3 low-band grid (S/16) for 10/100/1000 boxes per image, vectorised vs per-box loop,
    each the median of `iters` interleaved calls after `warmup`."""
    grid = (size // 16, size // 16)  # Haar LL of P3 (stride 8): the largest grid the explicit stream weights
    rows = []
    for n in DISW_BOXES:
        boxes = [b.to(device) for b in disw_inputs(n, batch, size)]
        t = measure_interleaved({"vectorised": lambda: disw_weights(boxes, grid, (size, size)),
                                 "per_box_loop": lambda: disw_weights_reference(boxes, grid, (size, size))},
                                iters, warmup, device)
        diff = float((disw_weights(boxes, grid, (size, size)) - disw_weights_reference(boxes, grid, (size, size)))
                     .abs().max())
        rows.append({"boxes_per_image": n, "batch": batch, "grid": list(grid),
                     "vectorised": t["vectorised"].as_dict(), "per_box_loop": t["per_box_loop"].as_dict(),
                     "speedup": t["per_box_loop"].median_ms / max(t["vectorised"].median_ms, 1e-9),
                     "max_abs_diff": diff})
    return rows


def run(work: Workload, iters: int, warmup: int) -> dict[str, Any]:
    """All measurements on one workload, timed side by side in interleaved rounds; returns the JSON-ready result."""
    device, pipe = work.device, work.pipeline
    plain = student_task(work, "none")
    ds2d2 = student_task(work, "ds2d2")
    fns = {"plain student step (no KD)": step_fn(plain, optimizer_for(plain, pipe), work),
           "DS2D2 student step": step_fn(ds2d2, optimizer_for(ds2d2, pipe), work)}
    fns |= loss_term_fns(ds2d2, work)
    steps: dict[str, Timing] = measure_interleaved(fns, iters, warmup, device)
    base = steps["plain student step (no KD)"].median_ms
    return {
        "pipeline": pipe.name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "input_size": work.input_size,
        "batch": int(work.images.shape[0]),
        "boxes_per_image": len(work.targets[0]["boxes"]),
        "teacher": pipe.teacher.model_dump(mode="json"),
        "student": pipe.student.model_dump(mode="json"),
        "weights": "random (cost does not depend on weights)",
        "loss_weights": pipe.distill.weights.model_dump(mode="json"),
        "timing": steps["DS2D2 student step"].summary + " each, in interleaved rounds (ratios are ratios of medians)",
        "steps": {name: t.as_dict() | {"x_plain_step": t.median_ms / base} for name, t in steps.items()},
        "ds2d2_overhead": steps["DS2D2 student step"].median_ms / base,
        "disw": run_disw(work.input_size, int(work.images.shape[0]), iters, warmup, device),
    }


def machine_facts() -> dict[str, Any]:
    """CPU model, cores, OS (runtime.machine) plus the CUDA device name when there is one."""
    from runtime.machine import machine_facts as facts

    data = facts()
    data = data.as_dict() if hasattr(data, "as_dict") else dict(data)
    if torch.cuda.is_available():
        data["cuda_device"] = torch.cuda.get_device_name()
    return data


def print_table(result: dict[str, Any], console: Console | None = None) -> None:
    """The steps table and the DISW table."""
    console = console or Console()
    m = result["machine"]
    title = (f"DS2D2 training cost — {result['pipeline']}, {result['input_size']} px, batch {result['batch']}, "
             f"{result['device']} ({m.get('cpu_model', '?')}, {result['threads']} threads), {result['date']}")
    table = Table(title=title, caption=result["timing"])
    for col in ("measurement", "median ms", "mean ms", "p99 ms", "x plain step"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for name, t in result["steps"].items():
        table.add_row(name, *(f"{t[k]:.1f}" for k in ("median_ms", "mean_ms", "p99_ms")), f"{t['x_plain_step']:.2f}")
    console.print(table)
    disw = Table(title=f"DISW build on a {result['disw'][0]['grid'][0]}² grid, batch {result['batch']}",
                 caption=result["disw"][0]["vectorised"]["summary"] + " each; speed-up = ratio of medians")
    for col in ("boxes / image", "vectorised median ms", "per-box loop median ms", "speed-up", "max |diff|"):
        disw.add_column(col, justify="right")
    for row in result["disw"]:
        disw.add_row(str(row["boxes_per_image"]), f"{row['vectorised']['median_ms']:.3f}",
                     f"{row['per_box_loop']['median_ms']:.3f}", f"{row['speedup']:.1f}x", f"{row['max_abs_diff']:.1e}")
    console.print(disw)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distill_cost", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--iters", type=int, default=MIN_CALLS,
                        help=f"timed calls per measurement, at least {MIN_CALLS}; the median is reported "
                             f"(default {MIN_CALLS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed calls before each measurement (default {DEFAULT_WARMUP})")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the student stage's)")
    parser.add_argument("--boxes", type=int, default=8, help="ground-truth boxes per image in the batch (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--tiny", action="store_true", help="64 px tiny models, batch 2: a seconds-long smoke run")
    parser.add_argument("--json", type=Path, default=None,
                        help="output JSON (default reports/<pipeline>/distill_cost.json)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.iters < MIN_CALLS or args.warmup < 0:
        raise UserError(f"need --iters >= {MIN_CALLS} and --warmup >= 0, got {args.iters} and {args.warmup}",
                        where="command line", fix=f"every figure is a median of at least {MIN_CALLS} calls")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine", where="--device", fix="use --device cpu")
    overrides = NO_DOWNLOAD + (TINY_OVERRIDES if args.tiny else []) + list(args.overrides)
    cfg = load_config(args.config, overrides, args.pipeline)
    pipe = cfg.pipeline(args.pipeline)
    work = build_workload(pipe, args.device, args.batch, args.boxes)
    result = run(work, args.iters, args.warmup)
    result["tiny"] = args.tiny
    print_table(result)
    out = args.json or cfg.path(Path("reports") / pipe.name / "distill_cost.json")
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
