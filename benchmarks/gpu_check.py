"""One prepared check for a lent GPU (about 5 minutes at most): the paper's pair on CUDA.

    python -m benchmarks.gpu_check [PIPELINE] [--json PATH] [--budget-s 270]

Measures, on one machine in one run: PyTorch CUDA latency of the teacher and student networks (backbone + FPN + head,
the graph deploy exports) in FP32 and FP16 at the pipeline's input size; a plain student training step and a DS2D2
step, each in FP32 and with AMP; and ONNX Runtime's CUDA execution provider on the same networks when it is
installed. Weights are random (latency does not depend on them). Writes JSON. Without a GPU it says so and exits 0;
`--device cpu --tiny` runs every section on tiny models as a smoke test.

On a lent machine whose image lacks them, carry wheels for pydantic (+ pydantic-core, annotated-types,
typing-inspection), pytorch-wavelets (+ PyWavelets) and polygraphy.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.distill_cost import step_fn
from runtime.atomic import write_json_atomic
from benchmarks.timing import measure
from benchmarks.workload import NO_DOWNLOAD, TINY_OVERRIDES, Workload, build_workload, optimizer_for, student_task
from deploy.export import ExportOnnx, deploy_network
from runtime.cli import add_debug_flag, run_cli
from runtime.config import add_config_args, load_config
from runtime.errors import UserError


def half_dtype(device: str) -> torch.dtype:
    """FP16 on CUDA; bfloat16 on a CPU (its reduced-precision type with fast kernels)."""
    return torch.float16 if device.startswith("cuda") else torch.bfloat16


def inference_section(work: Workload, iters: int, warmup: int) -> dict[str, Any]:
    """Latency of teacher and student networks, batch 1, in FP32 and FP16 (bf16 on CPU)."""
    out: dict[str, Any] = {}
    image = torch.randn(1, 3, work.input_size, work.input_size, device=work.device)
    for role, model in (("teacher", work.teacher), ("student", work.student)):
        for precision, dtype in (("fp32", torch.float32), ("fp16", half_dtype(work.device))):
            net = deploy_network(model, work.input_size).module.to(dtype)
            x = image.to(dtype)
            with torch.inference_mode():
                t = measure(lambda: net(x), iters, warmup, work.device)
            out[f"{role}_{precision}"] = t.as_dict() | {"dtype": str(dtype), "images_per_s": 1e3 / t.mean_ms}
            net.float()
    for precision in ("fp32", "fp16"):
        out[f"speedup_{precision}"] = out[f"teacher_{precision}"]["mean_ms"] / out[f"student_{precision}"]["mean_ms"]
    return out


def amp_step_fn(task, optimizer, work: Workload) -> Callable[[], None]:
    """One optimiser step under autocast (FP16 + GradScaler on CUDA, bf16 without scaling on CPU)."""
    cuda = work.device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    def step() -> None:
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=half_dtype(work.device)):
            losses = task(work.images, work.targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def training_section(work: Workload, iters: int, warmup: int) -> dict[str, Any]:
    """Plain student step and DS2D2 step, FP32 and AMP, on the same batch."""
    out: dict[str, Any] = {}
    for method, label in (("none", "plain"), ("ds2d2", "ds2d2")):
        task = student_task(work, method)
        opt = optimizer_for(task, work.pipeline)
        for mode, make in (("fp32", step_fn), ("amp", amp_step_fn)):
            try:
                t = measure(make(task, opt, work), iters, warmup, work.device)
            except Exception as exc:  # e.g. an op without AMP support: keep the other three numbers
                out[f"{label}_{mode}"] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            out[f"{label}_{mode}"] = t.as_dict() | {"images_per_s": 1e3 * len(work.images) / t.mean_ms}
    for mode in ("fp32", "amp"):
        plain, ds2d2 = out[f"plain_{mode}"], out[f"ds2d2_{mode}"]
        if "mean_ms" in plain and "mean_ms" in ds2d2:
            out[f"ds2d2_over_plain_{mode}"] = ds2d2["mean_ms"] / plain["mean_ms"]
    out["batch"] = len(work.images)
    return out


def ort_section(work: Workload, iters: int, warmup: int) -> dict[str, Any]:
    """ONNX Runtime CUDA EP latency of both networks (FP32 ONNX exported by deploy.export), batch 1."""
    import numpy as np
    import onnxruntime as ort

    providers = ort.get_available_providers()
    wanted = "CUDAExecutionProvider" if work.device.startswith("cuda") else "CPUExecutionProvider"
    if wanted not in providers:
        return {"skipped": f"{wanted} not available (providers: {providers})"}
    out: dict[str, Any] = {"provider": wanted, "onnxruntime": ort.__version__}
    feed = np.random.default_rng(0).standard_normal((1, 3, work.input_size, work.input_size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for role, model in (("teacher", work.teacher), ("student", work.student)):
            path = Path(tmp) / f"{role}.onnx"
            ExportOnnx(deploy_network(model.float().cpu(), work.input_size), path, work.input_size)()
            model.to(work.device)
            session = ort.InferenceSession(str(path), providers=[wanted])
            t = measure(lambda: session.run(None, {"images": feed}), iters, warmup, "cpu")
            out[f"{role}_fp32"] = t.as_dict() | {"images_per_s": 1e3 / t.mean_ms,
                                                 "providers_used": session.get_providers()}
    out["speedup_fp32"] = out["teacher_fp32"]["mean_ms"] / out["student_fp32"]["mean_ms"]
    return out


def environment(device: str) -> dict[str, Any]:
    """Versions and the device name."""
    env: dict[str, Any] = {"torch": torch.__version__, "device": device, "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}
    try:
        from runtime.machine import machine_facts

        facts = machine_facts()
        env["machine"] = facts.as_dict() if hasattr(facts, "as_dict") else dict(facts)
    except Exception as exc:  # machine facts are a nicety here; the GPU numbers must still come back
        env["machine"] = {"error": repr(exc)}
    return env


def run_sections(work: Workload, sections: dict[str, Callable[..., dict]], iters: dict[str, tuple[int, int]],
                 budget_s: float) -> dict[str, Any]:
    """Run each section unless the time budget is spent; an exception is recorded and the next section runs."""
    start, results = time.monotonic(), {}
    for name, fn in sections.items():
        if time.monotonic() - start > budget_s:
            results[name] = {"skipped": f"time budget of {budget_s:.0f} s spent"}
            continue
        t0 = time.monotonic()
        try:
            results[name] = fn(work, *iters[name])
        except Exception as exc:  # one broken section (a missing package, an OOM) must not lose the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
        results[name]["wall_s"] = round(time.monotonic() - t0, 1)
        print(f"[gpu_check] {name}: {results[name].get('error') or results[name].get('skipped') or 'done'} "
              f"({results[name]['wall_s']} s)", flush=True)
    return results


def print_summary(result: dict[str, Any]) -> None:
    """One table of every timing that came back (mean ms, images/s)."""
    from rich.console import Console
    from rich.table import Table

    env = result.get("environment", {})
    table = Table(title=f"gpu_check — {result['pipeline']}, {result['input_size']} px, "
                        f"{env.get('gpu', env.get('device', '?'))}, {result['date']}")
    for col in ("section", "measurement", "mean ms", "median ms", "images/s"):
        table.add_column(col, justify="left" if col in ("section", "measurement") else "right")
    for section in ("inference", "training", "onnxruntime"):
        for name, value in result.get(section, {}).items():
            if isinstance(value, dict) and "mean_ms" in value:
                table.add_row(section, name, f"{value['mean_ms']:.2f}", f"{value['median_ms']:.2f}",
                              f"{value.get('images_per_s', 0):.1f}")
            elif isinstance(value, dict) and "error" in value:
                table.add_row(section, name, "error", "", "")
            elif isinstance(value, float) and name.startswith(("speedup", "ds2d2_over")):
                table.add_row(section, name, f"{value:.2f}x", "", "")
            elif name in ("error", "skipped"):
                table.add_row(section, name, str(value)[:60], "", "")
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--batch", type=int, default=2,
                        help="training batch (default 2: the reference's per-GPU batch)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="skip the remaining sections after this many seconds (default 270)")
    parser.add_argument("--tiny", action="store_true", help="64 px tiny models, 2 iterations: a smoke run")
    parser.add_argument("--json", type=Path, default=None,
                        help="output JSON (default reports/<pipeline>/gpu_check.json)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, NO_DOWNLOAD + (TINY_OVERRIDES if args.tiny else []) + list(args.overrides),
                      args.pipeline or "dior_retina")
    pipe = cfg.pipeline(args.pipeline or "dior_retina")  # default: the paper's pair, R101 vs R18 at 800 px
    out = args.json or cfg.path(Path("reports") / pipe.name / "gpu_check.json")
    result: dict[str, Any] = {"pipeline": pipe.name, "input_size": pipe.input_size, "tiny": args.tiny,
                              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "weights": "random (latency does not depend on weights)"}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible here — nothing to measure. Run it on a machine with a GPU "
              "(or `--device cpu --tiny` for a smoke run).")
        write_json_atomic(out, result | {"cuda_available": False})
        return 0
    if pipe.teacher.arch != "retinanet":
        raise UserError(f"gpu_check times RetinaNet networks; pipeline {pipe.name!r} is {pipe.teacher.arch}",
                        where="pipeline", fix="use dior_retina, dota_retina or demo_retina")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    result |= {"cuda_available": torch.cuda.is_available(), "environment": environment(args.device)}
    work = build_workload(pipe, args.device, args.batch)
    n = (2, 1) if args.tiny else None
    iters = {"inference": n or (50, 10), "training": n or (10, 3), "onnxruntime": n or (30, 5)}
    sections = {"inference": inference_section, "training": training_section, "onnxruntime": ort_section}
    result |= run_sections(work, sections, iters, args.budget_s)
    write_json_atomic(out, result)
    print_summary(result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
