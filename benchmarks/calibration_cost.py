"""What INT8 calibration costs: peak memory (RSS) and wall time against the number of calibration images.

    python -m benchmarks.calibration_cost [--model r18_retina] [--size 800] [--counts 8 32 256]
                                          [--configs ort-u8s8:minmax ...] [--per-node] [--estimate] [--json PATH]

Configurations: ONNX Runtime u8s8 with MinMax, entropy and percentile ranges, the symmetric TensorRT-shaped fallback,
and modelopt (Q/DQ placement by modelopt, ranges from deploy.ranges; --per-node adds modelopt's own per-node
calibration). Each measurement is one quantization as deploy.build runs it (deploy.quantize.QuantizeOnnx:
calibration, then Q/DQ insertion with the head outputs in float) in a fresh subprocess, so peaks never carry over;
the peak is the larger of the worker's own ru_maxrss and the parent's psutil polling of the worker's process tree,
and the worker's CPU time is recorded too. The network is the pipelines.yaml model (untrained, no pretrained
download: memory and time do not depend on the weights) exported at --size px; the images are synthetic scenes
(runtime.data.synthetic) drawn at that size. Smallest counts run first; after the first two counts the remaining
time is extrapolated per configuration and printed. --estimate measures 1 and 3 images per configuration and
prints what the whole sweep would take without running it: at the current load, and at most on an idle machine
(from CPU time, which other processes cannot stretch).

Targets (issue 13): peak < 6 GB at 256 images and < 20 % growth from 32 to 256 images, for every quantizer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from runtime.atomic import write_json_atomic
from runtime.cli import add_debug_flag, run_cli
from runtime.errors import UserError

CONFIGS = ("ort-u8s8:minmax", "ort-u8s8:entropy", "ort-u8s8:percentile", "ort-symmetric:entropy", "modelopt:entropy")
# 128 is left out by default: on 2 cores each 800 px image costs seconds per configuration (--counts adds it).
DEFAULT_COUNTS = (8, 32, 256)
PEAK_LIMIT_MIB = 6 * 1024
GROWTH_LIMIT = 0.20
DIOR_CLASSES = 20


def prepare(work: Path, model_name: str, size: int, num_classes: int, images: int, config: Path | None,
            say: Any) -> tuple[Path, Path]:
    """The FP32 ONNX network and ``images`` synthetic scenes at ``size`` px under ``work`` (reused when present)."""
    import cv2

    from runtime.data.synthetic import SyntheticParams, render_image

    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f"{model_name}_{size}_fp32.onnx"
    if not onnx_path.is_file():
        import torch

        from deploy.export import ExportOnnx, SimplifyOnnx, deploy_network
        from distill.models import build_detector
        from runtime.config import load_config

        cfg = load_config(config)
        if model_name not in cfg.models:
            raise UserError(f"no model '{model_name}' in pipelines.yaml", "--model", f"use one of {sorted(cfg.models)}")
        spec = cfg.models[model_name].model_copy(update={"pretrained_backbone": False})  # offline: no download
        torch.manual_seed(0)
        model = build_detector(spec, num_classes, size)
        say(f"exporting {model_name} at {size} px -> {onnx_path}")
        SimplifyOnnx(ExportOnnx(deploy_network(model, size), onnx_path, size))()
    image_dir = work / f"scenes_{size}"
    image_dir.mkdir(parents=True, exist_ok=True)
    params = SyntheticParams(seed=0, image_size=size, num_train=images, num_val=0, num_test=0)
    missing = [i for i in range(images) if not (image_dir / f"{i:05d}.jpg").is_file()]
    if missing:
        say(f"drawing {len(missing)} synthetic {size} px scenes into {image_dir}")
    for i in missing:
        image, _ = render_image(params, i)
        cv2.imwrite(str(image_dir / f"{i:05d}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return onnx_path, image_dir


def worker(onnx_path: Path, image_dir: Path, count: int, quantizer: str, method: str, per_node: bool,
           size: int, result: Path) -> None:
    """One quantization (in this fresh process); writes wall time and this process's peak RSS to ``result``."""
    from deploy.calibration import CalibrationSet, preprocess_spec
    from deploy.quantize import QuantizeOnnx
    from runtime.records import ImageRecord

    records = [ImageRecord(p, size, size) for p in sorted(image_dir.glob("*.jpg"))[:count]]
    if len(records) < count:
        raise UserError(f"{len(records)} images in {image_dir}, {count} wanted", "--count")
    calib = CalibrationSet(records, preprocess_spec(size), "train", str(image_dir), method, 0, per_node=per_node)
    with tempfile.TemporaryDirectory(prefix="calib-cost.") as tmp:
        start = time.perf_counter()
        out = QuantizeOnnx(onnx_path, Path(tmp) / "int8.onnx", calib, quantizer)()
        wall = time.perf_counter() - start
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    write_json_atomic(result, {"wall_s": wall, "peak_rss_mib_self": max(u.ru_maxrss for u in usage) / 1024,  # KiB
                               "cpu_s": sum(u.ru_utime + u.ru_stime for u in usage),
                               "calibration": out.calibration, "quantizer_used": out.quantizer})


def _tree_rss_mib(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except psutil.Error:
        return 0.0


def measure(onnx_path: Path, image_dir: Path, count: int, config: str, per_node: bool, size: int) -> dict[str, Any]:
    """Run one worker subprocess; its wall time and peak RSS (max of its own report and polling)."""
    quantizer, method = config.split(":")
    with tempfile.TemporaryDirectory(prefix="calib-cost.") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.calibration_cost", "--worker", "--onnx", str(onnx_path),
               "--images", str(image_dir), "--count", str(count), "--pair", config, "--size", str(size),
               "--result", str(result), *(["--per-node"] if per_node else [])]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[1])
        polled = [0.0]

        def poll() -> None:
            while proc.poll() is None:
                polled[0] = max(polled[0], _tree_rss_mib(proc.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=poll, daemon=True)
        sampler.start()
        _, err = proc.communicate()
        sampler.join()
        elapsed = time.perf_counter() - start
        if proc.returncode != 0 or not result.is_file():
            tail = (err or "").strip().splitlines()[-3:]
            raise UserError(f"{config} with {count} images failed: {' | '.join(tail)}", "calibration worker")
        data = json.loads(result.read_text())
    return {"config": config + (":per-node" if per_node else ""), "quantizer": quantizer, "method": method,
            "per_node": per_node, "images": count, "wall_s": round(data["wall_s"], 2),
            "process_s": round(elapsed, 2), "cpu_s": round(data["cpu_s"], 2),
            "peak_rss_mib": round(max(data["peak_rss_mib_self"], polled[0]), 1),
            "peak_rss_mib_polled": round(polled[0], 1), "calibration": data["calibration"],
            "quantizer_used": data["quantizer_used"]}


def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed seconds, seconds per image) through the measured points (least squares; one point: all per-image)."""
    if len(points) == 1:
        return 0.0, points[0][1] / max(points[0][0], 1)
    xs, ys = zip(*points)
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / max(sum((x - mean_x) ** 2 for x in xs), 1e-9)
    slope = max(slope, 0.0)
    return max(mean_y - slope * mean_x, 0.0), slope


def estimate_s(rows: list[dict[str, Any]], configs: Sequence[str], counts: Sequence[int],
               key: str = "process_s") -> float:
    """Seconds the not-yet-measured (config, count) pairs should take, extrapolated per configuration from
    ``key``: process_s (wall time as measured) or cpu_s (CPU time: an idle machine's wall time is at most that)."""
    total = 0.0
    for config in configs:
        points = [(r["images"], r[key]) for r in rows if r["config"] == config]
        if not points:
            continue
        fixed, per_image = linear_fit(points)
        done = {n for n, _ in points}
        total += sum(fixed + per_image * n for n in counts if n not in done)
    return total


def summarize(rows: list[dict[str, Any]], counts: Sequence[int]) -> list[dict[str, Any]]:
    """Per configuration: peak at the largest count, growth from 32 (or the second count) to it, pass/fail."""
    out = []
    low = 32 if 32 in counts else (sorted(counts)[1] if len(counts) > 1 else counts[0])
    high = max(counts)
    for config in dict.fromkeys(r["config"] for r in rows):
        by_count = {r["images"]: r for r in rows if r["config"] == config}
        if high not in by_count:
            continue
        peak = by_count[high]["peak_rss_mib"]
        growth = (peak / by_count[low]["peak_rss_mib"] - 1) if low in by_count and low != high else None
        out.append({"config": config, "peak_rss_mib_at_max": peak, "images_max": high, "growth_from": low,
                    "growth": None if growth is None else round(growth, 4),
                    "peak_ok": peak < PEAK_LIMIT_MIB, "growth_ok": None if growth is None else growth < GROWTH_LIMIT})
    return out


def print_table(result: dict[str, Any], console: Console) -> None:
    """Rows by configuration and count, then the target check."""
    m = result["machine"]
    table = Table(title=f"INT8 calibration cost — {result['model']} at {result['size']} px, ONNX Runtime CPU "
                        f"({m.get('cpu_model', '?')}, {m.get('cpus_usable', '?')} CPUs), {result['date']}")
    for col in ("quantizer", "method", "images", "wall s", "s / image", "peak RSS MiB", "tensors"):
        table.add_column(col, justify="left" if col in ("quantizer", "method") else "right")
    for r in result["rows"]:
        method = r["method"] + (" (per node)" if r["per_node"] else "")
        table.add_row(r["quantizer"], method, str(r["images"]), f"{r['wall_s']:.1f}",
                      f"{r['wall_s'] / r['images']:.2f}", f"{r['peak_rss_mib']:.0f}",
                      str(r["calibration"].get("tensors", "-")))
    console.print(table)
    if result["summary"]:
        check = Table(title=f"targets: peak < {PEAK_LIMIT_MIB} MiB at the largest count, growth < "
                            f"{100 * GROWTH_LIMIT:.0f} %")
        for col in ("config", "images", "peak MiB", "growth", "peak ok", "growth ok"):
            check.add_column(col)
        for s in result["summary"]:
            growth = "-" if s["growth"] is None else f"{100 * s['growth']:+.1f} % (from {s['growth_from']})"
            check.add_row(s["config"], str(s["images_max"]), f"{s['peak_rss_mib_at_max']:.0f}", growth,
                          "yes" if s["peak_ok"] else "NO", "-" if s["growth_ok"] is None else
                          ("yes" if s["growth_ok"] else "NO"))
        console.print(check)


def _parse_configs(values: Sequence[str]) -> list[str]:
    for value in values:
        quantizer, _, method = value.partition(":")
        if quantizer not in ("ort-u8s8", "ort-symmetric", "modelopt") or not method:
            raise UserError(f"bad configuration {value!r}", "--configs",
                            "write QUANTIZER:METHOD, e.g. ort-u8s8:entropy or modelopt:max")
    return list(values)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (the parent sweep, or with --worker one measurement)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="r18_retina", help="a model of pipelines.yaml (default r18_retina)")
    parser.add_argument("--size", type=int, default=800, help="input size in px (default 800)")
    parser.add_argument("--classes", type=int, default=DIOR_CLASSES, help="number of classes (default 20, DIOR)")
    parser.add_argument("--counts", type=int, nargs="+", default=list(DEFAULT_COUNTS),
                        help=f"calibration image counts (default {' '.join(map(str, DEFAULT_COUNTS))})")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="QUANTIZER:METHOD pairs (default: all "
                        f"of {', '.join(CONFIGS)})")
    parser.add_argument("--per-node", action="store_true",
                        help="also measure modelopt's own per-node calibration (max)")
    parser.add_argument("--estimate", action="store_true",
                        help="measure 1 and 3 images per configuration and print the sweep's expected time only")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/calibration_cost"),
                        help="where the exported network and the scenes are kept (default runs/calibration_cost)")
    parser.add_argument("--config", type=Path, default=None, help="pipelines.yaml to use (default: the project's)")
    parser.add_argument("--json", type=Path, default=Path("reports/calibration_cost.json"))
    # the worker's own options
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.worker:
        quantizer, method = args.pair.split(":")
        worker(args.onnx, args.images, args.count, quantizer, method, args.per_node, args.size, args.result)
        return 0
    if min(args.counts) < 1 or args.size % 32:
        raise UserError("counts must be >= 1 and the size a multiple of 32", "command line")
    configs = _parse_configs(args.configs) + (["modelopt:max:per-node"] if args.per_node else [])
    counts = sorted(set(args.counts))
    console = Console(stderr=True)
    say = lambda msg: console.print(msg, markup=False, highlight=False)  # noqa: E731
    probe_counts = [1, 3] if args.estimate else counts
    onnx_path, image_dir = prepare(args.work_dir, args.model, args.size, args.classes, max(probe_counts),
                                   args.config, say)
    from runtime.machine import machine_facts

    rows: list[dict[str, Any]] = []
    for index, count in enumerate(probe_counts):
        for config in configs:
            per_node = config.endswith(":per-node")
            row = measure(onnx_path, image_dir, count, config.removesuffix(":per-node"), per_node, args.size)
            rows.append(row)
            say(f"{row['config']:<28} {count:>4} images: {row['wall_s']:8.1f} s, peak {row['peak_rss_mib']:7.0f} MiB")
        if index == 1 and not args.estimate and len(probe_counts) > 2:
            say(f"estimated time for the remaining counts: {estimate_s(rows, configs, counts) / 60:.0f} min")
    if args.estimate:
        say(f"estimated sweep over {counts} images x {len(configs)} configurations at {args.size} px: "
            f"{estimate_s(rows, configs, counts) / 60:.0f} min at this machine's current load (load average "
            f"{os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs); at most "
            f"{estimate_s(rows, configs, counts, 'cpu_s') / 60:.0f} min when it is idle (the CPU time it needs)")
    result = {"benchmark": "calibration_cost", "model": args.model, "size": args.size, "classes": args.classes,
              "counts": probe_counts, "estimate_only": args.estimate, "load_average_at_end": os.getloadavg(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_facts(),
              "backend": "ONNX Runtime CPU (calibration sessions)", "precision": "INT8 Q/DQ", "rows": rows,
              "summary": [] if args.estimate else summarize(rows, counts),
              "estimated_sweep_s": round(estimate_s(rows, configs, counts), 1) if args.estimate else None,
              "estimated_sweep_cpu_s": round(estimate_s(rows, configs, counts, "cpu_s"), 1) if args.estimate else None,
              "targets": {"peak_rss_mib": PEAK_LIMIT_MIB, "growth": GROWTH_LIMIT}}
    print_table(result, Console())
    write_json_atomic(args.json, result)
    say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
