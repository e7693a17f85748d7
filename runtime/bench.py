"""`python -m runtime.bench BUNDLE [--backend B] [--warmup N] [--iters N] [--batch N] [--json PATH]`: latency.

Times the detector as applications run it, from decoded uint8 images to detections in image pixels: end-to-end,
and its pre-processing / inference / post-processing split (mean, p50, p90, p99 in ms), throughput, peak memory,
and the machine it ran on; on a Jetson beside every figure also JetPack / L4T, TensorRT, nvpmodel mode, jetson_clocks
state, GPU and EMC clocks, temperatures and power (tegrastats while the figure was measured). When the bundle's
``bench_engine.sh`` has timed its registered engine with trtexec (engine_timing.json), those engine-only figures
are shown beside the end-to-end ones, with the device's state while trtexec ran. Prints a table and writes the same
numbers as JSON (default: under reports/<pipeline>/<target>/).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from runtime.cli import add_debug_flag, run_cli
from runtime.data.images import write_bytes_atomic
from runtime.detector import Detector, StageTimes, add_detector_args, default_report_path, detector_from_args
from runtime.errors import UserError
from runtime.engine_record import CONDITIONS_LOG, TEGRASTATS_LOG, TIMING_NAME
from runtime.machine import (UNAVAILABLE, TegrastatsSampler, gpu_memory_used_mib, jetson_clocks_show, machine_facts,
                             nvpmodel_mode, summarize_tegrastats)
from runtime.manifest import Bundle
from runtime.preprocess import read_image

STAGES = ("end_to_end", "preprocess", "infer", "postprocess")


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """mean / std / min / p50 / p90 / p99 / max of durations, in milliseconds."""
    ms = np.asarray(seconds, np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "std": float(ms.std()), "min": float(ms.min()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(ms.max())}


def _peak_rss_mib() -> float:
    # ru_maxrss is the kernel's high-water mark of the process (kB on Linux, bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def bench_images(detector: Detector, image: Path | None, batch: int, seed: int = 0) -> list[np.ndarray]:
    """``batch`` copies of the given image, or of a random image of the network's input size."""
    if image is not None:
        picture = read_image(image)
    else:
        height, width = detector.input_size
        picture = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return [picture.copy() for _ in range(batch)]


def run_benchmark(detector: Detector, images: list[np.ndarray], warmup: int, iters: int) -> dict[str, Any]:
    """Time ``iters`` detect() calls after ``warmup`` untimed ones; latency per call, throughput, memory."""
    process = psutil.Process()
    for _ in range(warmup):
        detector.detect(images)
    samples: list[StageTimes] = []
    rss_peak = process.memory_info().rss
    with TegrastatsSampler() as power:
        start = time.perf_counter()
        for _ in range(iters):
            detector.detect(images)
            samples.append(detector.last_times)
            rss_peak = max(rss_peak, process.memory_info().rss)
        wall = time.perf_counter() - start
    latency = {
        "end_to_end": latency_stats([s.total for s in samples]),
        "preprocess": latency_stats([s.preprocess for s in samples]),
        "infer": latency_stats([s.infer for s in samples]),
        "postprocess": latency_stats([s.postprocess for s in samples]),
    }
    batch = len(images)
    return {
        "latency_ms": latency,
        "throughput_images_per_s": batch * iters / wall,
        "infer_only_images_per_s": batch * 1e3 / latency["infer"]["mean"],
        "end_to_end_over_infer": latency["end_to_end"]["mean"] / latency["infer"]["mean"],
        "memory": {"rss_peak_mib": process_mib(rss_peak), "rss_high_water_mib": round(_peak_rss_mib(), 1),
                   "gpu_mib": gpu_memory_used_mib(os.getpid())},
        "power": power.summary(),
        "wall_s": wall,
    }


def engine_only_figures(bundle: Bundle) -> dict[str, Any] | None:
    """bench_engine.sh's trtexec figures of the registered engine (engine_timing.json) with the device's state while
    they were measured; None when the engine was never timed, a note when the timing is of another engine."""
    path = bundle.root / TIMING_NAME
    if bundle.engine is None or not path.is_file():
        return None
    try:
        timing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"stale": True, "note": f"{TIMING_NAME} is unreadable: run ./bench_engine.sh again"}
    if timing.get("engine_sha256") != bundle.engine.engine.sha256:
        return {"stale": True, "note": f"{TIMING_NAME} times another engine: run ./bench_engine.sh again"}
    conditions: dict[str, Any] = {}
    captured = bundle.root / CONDITIONS_LOG
    if captured.is_file():
        text = captured.read_text(encoding="utf-8", errors="replace")
        clocks = jetson_clocks_show(text)
        conditions.update(nvpmodel=nvpmodel_mode(text),
                          jetson_clocks=clocks["state"] if isinstance(clocks, dict) else UNAVAILABLE,
                          clocks=clocks)
    sampled = bundle.root / TEGRASTATS_LOG
    if sampled.is_file():
        conditions["during"] = summarize_tegrastats(sampled.read_text(encoding="utf-8", errors="replace").splitlines())
    return {**timing, "conditions": conditions or UNAVAILABLE}


def device_line(machine: dict[str, Any], during: dict[str, Any] | str, captured: dict[str, Any] | None = None) -> str:
    """One line of the state a figure was measured in: JetPack / L4T, TensorRT, power mode and clock state (as
    ``captured`` then, else now), GPU / EMC clocks, temperature and power (what tegrastats saw during it)."""
    jet = {**machine["jetson"], **{k: v for k, v in (captured or {}).items() if k in ("nvpmodel", "jetson_clocks")}}
    parts = [f"JetPack {jet['jetpack']} (L4T {jet['l4t']})", f"TensorRT {machine['versions']['tensorrt']}",
             f"nvpmodel {jet['nvpmodel']}", f"jetson_clocks {jet['jetson_clocks']}"]
    if isinstance(during, dict):
        for key, label in (("gpu_mhz", "GPU"), ("emc_mhz", "EMC")):
            if isinstance(during.get(key), dict):
                parts.append(f"{label} {during[key]['mean']:.0f} MHz")
        temps = during.get("temperature_max_c")
        if isinstance(temps, dict) and temps:
            hottest = max(temps, key=temps.get)
            parts.append(f"max {hottest} {temps[hottest]:.1f} C")
        if during.get("total_input_mw") not in (None, UNAVAILABLE):
            parts.append(f"input power {during['total_input_mw']:.0f} mW")
    return ", ".join(parts)


def process_mib(nbytes: int) -> float:
    """Bytes as MiB, one decimal."""
    return round(nbytes / 2**20, 1)


def print_report(report: dict[str, Any]) -> None:
    """The latency table and the facts that qualify it."""
    from rich.console import Console
    from rich.table import Table

    res = report["results"]
    det = report["detector"]
    table = Table(title=f"{det['backend']} {det['precision']} ({det['model_file']}), batch {report['batch']}, "
                        f"{report['iters']} iterations", caption="milliseconds per call")
    for col in ("stage", "mean", "p50", "p90", "p99", "min", "max"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage in STAGES:
        stats = res["latency_ms"][stage]
        cells = (f"{stats[k]:.2f}" for k in ("mean", "p50", "p90", "p99", "min", "max"))
        table.add_row(stage.replace("_", "-"), *cells)
    engine = report.get("engine_only")
    if engine and not engine.get("stale"):
        for key, label in (("gpu_compute_ms", "engine only: GPU compute"), ("latency_ms", "engine only: latency")):
            stats = engine[key]
            table.add_row(f"{label} (trtexec)", *(f"{stats[k]:.2f}" for k in ("mean", "median", "p90", "p99", "min",
                                                                              "max")))
    console = Console()
    console.print(table)
    if engine and engine.get("stale"):
        console.print(f"engine-only figures: {engine['note']}", markup=False)
    elif engine:
        conditions = engine["conditions"] if isinstance(engine["conditions"], dict) else {}
        then = device_line(report["machine"], conditions.get("during", UNAVAILABLE), conditions)
        console.print(f"engine-only rows: trtexec {' '.join(engine['command'][1:])} ({engine['inferences']} "
                      f"inferences, {engine['measured_at']}); device then: {then}", markup=False, soft_wrap=True)
    machine = report["machine"]
    power = res["power"]
    console.print(
        f"throughput {res['throughput_images_per_s']:.1f} img/s (infer only {res['infer_only_images_per_s']:.1f}); "
        f"end-to-end / infer {res['end_to_end_over_infer']:.3f}; peak RSS {res['memory']['rss_peak_mib']} MiB; "
        f"GPU memory {res['memory']['gpu_mib']}; power "
        f"{power if power == UNAVAILABLE else str(power['total_input_mw']) + ' mW'}\n"
        f"{machine['cpu_model']}, {machine['cpu_cores_logical']} logical cores, threads "
        f"{det['runner'].get('intra_op_threads', UNAVAILABLE)}; onnxruntime {machine['versions']['onnxruntime']}, "
        f"TensorRT {machine['versions']['tensorrt']}; L4T {machine['jetson']['l4t']}, nvpmodel "
        f"{machine['jetson']['nvpmodel']}, jetson_clocks {machine['jetson']['jetson_clocks']}")
    if machine["jetson"]["l4t"] != UNAVAILABLE:
        console.print(f"end-to-end rows measured with: {device_line(machine, power)}", markup=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Benchmark a bundle; print the table and write the JSON report."""
    parser = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detector_args(parser)
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    parser.add_argument("--iters", type=int, default=100, help="timed calls (default 100)")
    parser.add_argument("--image", type=Path, default=None,
                        help="image to time on (default: random pixels at the network's input size)")
    parser.add_argument("--json", type=Path, default=None,
                        help="report path (default: reports/<pipeline>/<target>/bench_b<batch>_<backend>_"
                             "<precision>.json)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        raise UserError(f"need --iters >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}", "--iters")
    with detector_from_args(args) as detector:
        images = bench_images(detector, args.image, args.batch)
        results = run_benchmark(detector, images, args.warmup, args.iters)
        info = detector.describe()
        # trtexec's figures are of the engine: shown only beside a run of that engine
        engine_only = engine_only_figures(detector.bundle) if detector.choice.backend == "trt" else None
    report = {
        "bundle": str(args.bundle),
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "batch": args.batch, "warmup": args.warmup, "iters": args.iters,
        "image": str(args.image) if args.image else f"random uint8 {images[0].shape[1]}x{images[0].shape[0]}",
        "measured": "uint8 RGB images in memory -> detections in image pixels (image decoding excluded)",
        "detector": info,
        "results": results,
        "machine": machine_facts(),
        "engine_only": engine_only,
    }
    path = args.json or default_report_path(detector, f"bench_b{args.batch}")
    write_bytes_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
    print_report(report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
