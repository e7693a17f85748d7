"""Measure model variants side by side: the same machine, backend, input size and image for every one.

Latency is taken in interleaved rounds (variant A, B, C, A, B, C, ...) so that load from other processes on a shared
machine spreads over all variants instead of penalising whichever ran during a busy minute. Each call is the deployed
detector as applications run it (runtime.detector: uint8 image in memory -> detections in image pixels); the
network-only time (`infer`) is kept as well. Accuracy runs the same detectors over the test split with
runtime.evaluate's loop and runtime.metrics.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from benchmarks.results import Row
from runtime.bench import bench_images, latency_stats
from runtime.data import to_coco_dict
from runtime.detector import Detector
from runtime.evaluate import detect_dataset
from runtime.metrics import evaluate_detections
from runtime.postprocess import Detections
from runtime.records import DetectionSet


@dataclass
class Variant:
    """One model file to measure: which role / KD method / precision, from which bundle."""

    name: str
    role: str
    method: str | None
    precision: str
    bundle: Path
    trained: bool = True
    params: int | None = None
    gflops: float | None = None
    note: str = ""


def open_detectors(variants: Sequence[Variant], backend: str, threads: int | None) -> list[Detector]:
    """An activated Detector per variant (bundle hashes verified), batch 1."""
    detectors = []
    for v in variants:
        det = Detector(v.bundle, backend=backend, precision=v.precision, threads=threads, batch_size=1)
        detectors.append(det.open())
    return detectors


def interleaved_latency(detectors: Sequence[Detector], iters: int, warmup: int, seed: int = 0,
                        progress: bool = True) -> list[dict[str, Any]]:
    """End-to-end and network-only latency stats (ms) per detector, timed in interleaved rounds on one image."""
    image = bench_images(detectors[0], None, 1, seed)  # the same random image at the input size for everyone
    for det in detectors:
        for _ in range(warmup):
            det.detect(image)
    totals: list[list[float]] = [[] for _ in detectors]
    infers: list[list[float]] = [[] for _ in detectors]
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("latency (interleaved)", total=iters * len(detectors))
        for _ in range(iters):
            for i, det in enumerate(detectors):
                det.detect(image)
                totals[i].append(det.last_times.total)
                infers[i].append(det.last_times.infer)
                bar.advance(task)
    return [{"end_to_end": latency_stats(t), "infer": latency_stats(n)} for t, n in zip(totals, infers)]


def accuracy(detector: Detector, dataset: DetectionSet) -> tuple[Any, list[dict[str, Any]]]:
    """runtime.metrics EvalResult of a detector on a split, and its COCO results list."""
    results, _ = detect_dataset(detector, dataset, batch=4, tile=False, progress=False)
    return evaluate_detections(to_coco_dict(dataset), results), results


def _metric(value: float | None) -> float | None:
    # COCO reports -1 for an area range without ground truth: that is "not measured", not a score.
    return None if value is None or value < 0 else float(value)


def measure_variants(variants: Sequence[Variant], backend: str, threads: int | None, iters: int, warmup: int,
                     dataset: DetectionSet | None, progress: bool = True) -> tuple[list[Row], list[Detector]]:
    """Rows for every variant (latency, and accuracy when `dataset` is given); the open detectors are returned too
    (for the scene picture) and must be closed by the caller."""
    detectors = open_detectors(variants, backend, threads)
    lat = interleaved_latency(detectors, iters, warmup, progress=progress)
    rows = []
    for v, det, stats in zip(variants, detectors, lat):
        info = det.describe()
        path = det.choice.model_path
        entry = det.bundle.manifest.files.get(path.name)
        e2e = stats["end_to_end"]
        row = Row(name=v.name, role=v.role, method=v.method, precision=v.precision,
                  backend=f"{info['backend']} ({', '.join(info['runner'].get('providers', [])) or 'default'})",
                  trained=v.trained, file=str(path), file_mb=(entry.size if entry else path.stat().st_size) / 2**20,
                  params=v.params, gflops=v.gflops, mean_ms=e2e["mean"], p50_ms=e2e["p50"], p99_ms=e2e["p99"],
                  throughput_ips=1e3 / e2e["mean"], infer_mean_ms=stats["infer"]["mean"],
                  infer_p50_ms=stats["infer"]["p50"], note=v.note)
        if dataset is not None and v.trained:
            result, _ = accuracy(det, dataset)
            row.AP, row.AP50, row.AP_s = _metric(result.coco.AP), _metric(result.coco.AP50), _metric(result.coco.AP_s)
            row.per_class_AP50 = dict(result.voc.per_class_AP50)
        rows.append(row)
    return rows, detectors


def scene_detections(detectors: Sequence[Detector], image: np.ndarray) -> list[Detections]:
    """Each detector's detections on one image (for the scene figure)."""
    return [det.detect([image])[0] for det in detectors]
