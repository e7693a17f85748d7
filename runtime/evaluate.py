"""`python -m runtime.evaluate BUNDLE [--dataset ROOT] [--split test] [--tile] [--limit N] [--json PATH]`: accuracy.

Runs the deployed bundle over a dataset split and computes the project's metrics (runtime.metrics: COCO AP / AP50
and DIOR/VOC per-class AP50) exactly as training-time evaluation does, so the numbers compare with the PyTorch
model's. The dataset defaults to the one of the bundle's pipeline in pipelines.yaml (its test split; a synthetic
set is generated first if missing).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runtime.cli import add_debug_flag, run_cli
from runtime.config import load_config
from runtime.data import FORMATS, load_dataset, to_coco_dict
from runtime.data.images import write_bytes_atomic
from runtime.detector import Detector, StageTimes, add_detector_args, default_report_path, detector_from_args
from runtime.errors import UserError
from runtime.manifest import Manifest
from runtime.metrics import EvalResult, evaluate_detections
from runtime.preprocess import read_image
from runtime.records import DetectionSet
from runtime.tiling import TILE_BATCH, tiled_detect


@dataclass(frozen=True)
class DatasetChoice:
    """Where the evaluation data comes from and why."""

    format: str | None
    root: Path
    split: str
    source: str


def resolve_dataset(manifest: Manifest, dataset: Path | None, fmt: str | None, split: str | None,
                    config: Path | None) -> DatasetChoice:
    """The dataset to evaluate on: ``--dataset`` if given, else the bundle pipeline's dataset in pipelines.yaml."""
    try:
        cfg = load_config(config)
    except UserError:
        if dataset is None:
            raise  # the config is the only source of the dataset: its problem is the one to report
        cfg = None  # e.g. a device with the runtime but without the repository's pipelines.yaml
    pipe = cfg.pipeline(manifest.pipeline) if cfg is not None and manifest.pipeline in cfg.pipelines else None
    if dataset is None and pipe is None:
        raise UserError(f"the bundle's pipeline '{manifest.pipeline}' is not in {config or 'pipelines.yaml'}, so "
                        "there is no default dataset", "--dataset", "pass --dataset ROOT (and --format, --split)")
    if dataset is not None:
        test_split = pipe.dataset.test_split if pipe is not None else "test"
        return DatasetChoice(fmt, dataset, split or test_split, "--dataset")
    assert pipe is not None
    if pipe.dataset.synthetic is not None:
        from runtime.data.synthetic import SyntheticParams, generate  # noqa: PLC0415 - only synthetic sets need it

        generate(SyntheticParams(**pipe.dataset.synthetic), pipe.dataset_root, overwrite=True)  # no-op when unchanged
    return DatasetChoice(fmt or pipe.dataset.format, pipe.dataset_root, split or pipe.dataset.test_split,
                         f"pipelines.yaml: pipelines.{pipe.name}.dataset")


def detect_dataset(detector: Detector, dataset: DetectionSet, batch: int, tile: bool,
                   progress: bool = True) -> tuple[list[dict[str, Any]], StageTimes]:
    """COCO results (image_id = record index + 1, as to_coco_dict numbers them) and the summed stage times."""
    from rich.progress import Progress

    results: list[dict[str, Any]] = []
    before = replace(detector.cumulative_times)
    records = dataset.records
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("evaluating", total=len(records))
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            images = [read_image(r.path) for r in chunk]
            if tile:
                dets = [tiled_detect(detector, image, batch_size=max(batch, TILE_BATCH)) for image in images]
            else:
                dets = detector.detect(images)
            for offset, d in enumerate(dets):
                results.extend(d.to_coco_results(start + offset + 1))
            bar.advance(task, len(chunk))
    after = detector.cumulative_times
    spent = StageTimes(*(getattr(after, k) - getattr(before, k) for k in ("preprocess", "infer", "postprocess",
                                                                          "total")), images=len(records))
    return results, spent


def build_report(args: argparse.Namespace, detector: Detector, choice: DatasetChoice, dataset: DetectionSet,
                 result: EvalResult, times: StageTimes, num_detections: int) -> dict[str, Any]:
    """The JSON report: what was evaluated on what, the metrics and the time per image."""
    per_image = {k: 1e3 * getattr(times, k) / max(1, times.images)
                 for k in ("preprocess", "infer", "postprocess", "total")}
    manifest = detector.bundle.manifest
    return {
        "bundle": str(args.bundle),
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "pipeline": manifest.pipeline, "model_role": manifest.model_role, "target": manifest.target,
        "dataset": {"format": choice.format or "auto", "root": str(choice.root), "split": choice.split,
                    "source": choice.source, "images": len(dataset), "classes": list(dataset.classes),
                    "limit": args.limit},
        "detector": detector.describe(),
        "tiled": bool(args.tile),
        "detections": num_detections,
        "summary": {"AP": result.coco.AP, "AP50": result.coco.AP50, "AP75": result.coco.AP75,
                    "voc_mAP50": result.voc.mAP},
        "metrics": result.as_dict(),
        "ms_per_image": per_image,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate a bundle on a dataset split; print the metric tables and write the JSON report."""
    parser = argparse.ArgumentParser(prog="python -m runtime.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detector_args(parser)
    parser.add_argument("--dataset", type=Path, default=None,
                        help="dataset root (default: the bundle pipeline's dataset in pipelines.yaml)")
    parser.add_argument("--format", default=None, choices=FORMATS, help="dataset format (default: detected)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the pipeline's test split)")
    parser.add_argument("--tile", action="store_true", help="tiled inference (scenes larger than the input)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--json", type=Path, default=None,
                        help="report path (default: reports/<pipeline>/<target>/eval_<split>_<backend>_"
                             "<precision>.json)")
    parser.add_argument("--config", type=Path, default=None, help="pipelines.yaml (default: the repository's)")
    parser.set_defaults(batch=4)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"must be at least 1, got {args.limit}", "--limit")

    if args.tile:
        args.batch = max(args.batch, TILE_BATCH)  # tiles reach the backend in the tiler's batches
    with detector_from_args(args) as detector:
        manifest = detector.bundle.manifest
        choice = resolve_dataset(manifest, args.dataset, args.format, args.split, args.config)
        dataset = load_dataset(choice.format, choice.root, choice.split, classes=list(manifest.classes))
        if args.limit is not None:
            dataset = DetectionSet(dataset.name, dataset.classes, dataset.records[: args.limit])
        results, times = detect_dataset(detector, dataset, args.batch, args.tile)
        result = evaluate_detections(to_coco_dict(dataset), results)
        report = build_report(args, detector, choice, dataset, result, times, len(results))

    from runtime.metrics.__main__ import print_tables  # noqa: PLC0415 - the same tables as `python -m runtime.metrics`

    print_tables(result)
    info = report["detector"]
    tiled = "_tiled" if args.tile else ""
    path = args.json or default_report_path(detector, f"eval_{choice.split}{tiled}")
    write_bytes_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
    voc = "-" if result.voc.mAP is None else f"{100 * result.voc.mAP:.2f}"
    print(f"{len(dataset)} images of {choice.root} [{choice.split}] with {info['backend']} {info['precision']}: "
          f"AP50 {100 * result.coco.AP50:.2f}, VOC mAP50 {voc}; "
          f"{report['ms_per_image']['total']:.1f} ms/image; wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
