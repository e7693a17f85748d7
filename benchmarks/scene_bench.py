"""Seconds per large scene, as remote-sensing users count it: teacher FP32 vs every student INT8, tiled.

    python -m benchmarks.scene_bench [PIPELINE] [--latency-only] [--scene-size 4096] [--tile 1024] [--overlap 200]
                                     [--iters 3] [--warmup 1] [--batch 1] [--threads N] [--json PATH]

One synthetic scene (runtime.data.synthetic's painter at --scene-size px, the pipeline's classes where the painter
knows them) goes through each deployed detector exactly as `python -m runtime.infer BUNDLE SCENE --tile --tile-size
1024 --overlap 200` runs it (runtime.infer.detect_image: tiles cut by runtime.tiling, at least 4 tiles per detect()
call, --batch images per network call, seams cleaned, class-wise NMS across tiles). Models are measured side by side
in interleaved rounds in one process; the image is decoded once beforehand (decoding is not timed). Bundles are the
ones benchmarks.report uses (trained, or with --latency-only randomly initialised networks of the pipeline's exact
architectures, including the sibling pipelines' students), built through deploy.build when missing or stale.
Prints a table and writes JSON (default reports/<pipeline>/<target>[-latency-only]/scene_bench.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from benchmarks.measure import Variant
from runtime.atomic import write_json_atomic
from runtime.cli import add_debug_flag, run_cli
from runtime.config import Pipeline, add_config_args, load_config
from runtime.detector import Detector, StageTimes
from runtime.errors import UserError
from runtime.infer import detect_image
from runtime.machine import machine_facts
from runtime.tiling import tile_grid

MAX_SCENE = 4096  # the largest image runtime.data.synthetic paints
SCENE_OBJECTS = 500  # about DIOR's density (4-40 objects per 800 px image) over 4096 x 4096 px


@dataclass(frozen=True)
class SceneSettings:
    """How the scene is made and cut: its side, the tile side, the overlap, images per network call."""

    scene_size: int = 4096
    tile: int = 1024
    overlap: int = 200
    batch: int = 1
    objects: int = SCENE_OBJECTS
    seed: int = 0

    def check(self) -> None:
        """One UserError naming the option for any impossible setting."""
        if not 64 <= self.scene_size <= MAX_SCENE:
            raise UserError(f"must be in [64, {MAX_SCENE}] px (the painter's range), got {self.scene_size}",
                            where="--scene-size")
        if not 0 < self.tile:
            raise UserError(f"must be positive, got {self.tile}", where="--tile")
        if not 0 <= self.overlap < self.tile:
            raise UserError(f"must be in [0, tile) = [0, {self.tile}), got {self.overlap}", where="--overlap")
        if self.batch < 1:
            raise UserError(f"must be at least 1, got {self.batch}", where="--batch")
        if self.objects < 0:
            raise UserError(f"must be >= 0, got {self.objects}", where="--objects")


def synthetic_scene(pipe: Pipeline, settings: SceneSettings, path: Path) -> tuple[np.ndarray, int]:
    """The benchmark scene (painted once, kept as PNG at `path`); returns the uint8 RGB image and its object count."""
    import cv2

    from benchmarks.latency_only import painted_classes
    from runtime.data.images import write_bytes_atomic
    from runtime.data.synthetic import SyntheticParams, render_image
    from runtime.preprocess import read_image

    params = SyntheticParams(seed=settings.seed, image_size=settings.scene_size, num_train=1, num_val=0, num_test=0,
                             classes=painted_classes(pipe), objects_per_image=(settings.objects, settings.objects))
    marker = path.with_suffix(".json")  # the painter's parameters and object count, next to the PNG
    if path.is_file() and marker.is_file():
        stored = json.loads(marker.read_text())
        if stored.get("params") == params.model_dump(mode="json"):
            return read_image(path), int(stored["objects"])
    image, objects = render_image(params, 0)
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise UserError("could not encode the synthetic scene as PNG", where=str(path))
    write_bytes_atomic(path, png.tobytes())
    write_json_atomic(marker, {"params": params.model_dump(mode="json"), "objects": len(objects)})
    return image, len(objects)


def _delta(after: StageTimes, before: StageTimes) -> dict[str, float]:
    return {k: getattr(after, k) - getattr(before, k) for k in ("preprocess", "infer", "postprocess", "total")}


def time_scenes(detectors: Sequence[Detector], image: np.ndarray, settings: SceneSettings, iters: int,
                warmup: int, progress: bool = True) -> list[dict[str, Any]]:
    """Per detector: seconds per scene (interleaved rounds) and the split into the runtime's stages."""
    run = lambda det: detect_image(det, image, True, settings.tile, settings.overlap, settings.batch)  # noqa: E731
    for det in detectors:
        for _ in range(warmup):
            run(det)
    walls: list[list[float]] = [[] for _ in detectors]
    stages: list[list[dict[str, float]]] = [[] for _ in detectors]
    found = [0] * len(detectors)
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("scenes (interleaved)", total=iters * len(detectors))
        for _ in range(iters):
            for i, det in enumerate(detectors):
                before = StageTimes(**asdict(det.cumulative_times))
                start = time.perf_counter()
                found[i] = len(run(det))
                walls[i].append(time.perf_counter() - start)
                stages[i].append(_delta(det.cumulative_times, before))
                bar.advance(task)
    out = []
    for wall, split, n in zip(walls, stages, found):
        med = {k: float(np.median([s[k] for s in split])) for k in split[0]}
        out.append({"seconds_per_scene": {"median": float(np.median(wall)), "mean": float(np.mean(wall)),
                                          "min": float(np.min(wall)), "max": float(np.max(wall))},
                    "stages_s_median": med | {"tiling_and_merge": float(np.median(wall)) - med["total"]},
                    "detections": n})
    return out


def scene_variants(variants: Sequence[Variant]) -> list[Variant]:
    """Teacher FP32 and each student's INT8 (its FP32 where the bundle holds no INT8), teacher first."""
    picked = [v for v in variants if v.role == "teacher" and v.precision == "fp32"]
    for name in dict.fromkeys(v.name.rsplit(" ", 1)[0] for v in variants if v.role == "student"):
        mine = [v for v in variants if v.role == "student" and v.name.rsplit(" ", 1)[0] == name]
        picked += [v for v in mine if v.precision == "int8"][:1] or mine[:1]
    return picked


def run(opts: Any, settings: SceneSettings, out_json: Path | None = None, console: Console | None = None
        ) -> tuple[dict[str, Any], Path]:
    """Build or reuse the bundles, paint the scene, time every model on it; returns the result and the JSON path.

    `opts` is a benchmarks.report.ReportOptions (pipeline, target, latency_only, out, iters, warmup, threads, ...).
    """
    from benchmarks.report import report_models, variants_of

    console = console or Console()
    settings.check()
    if opts.iters < 1 or opts.warmup < 0:
        raise UserError(f"need --iters >= 1 and --warmup >= 0, got {opts.iters} and {opts.warmup}", where="--iters")
    cfg = load_config(opts.config, opts.overrides, opts.pipeline)
    pipe = cfg.pipeline(opts.pipeline)
    target = cfg.target(opts.target)
    out_dir, models, notes = report_models(opts, cfg, pipe)
    variants = scene_variants(variants_of(models))
    image, objects = synthetic_scene(pipe, settings, out_dir / f"scene_{settings.scene_size}.png")
    tiles = len(tile_grid(image.shape[1], image.shape[0], settings.tile, settings.overlap))
    backend = opts.backend or ("ort-cpu" if target.runtime == "onnxruntime" else "auto")  # as benchmarks.report
    detectors = [Detector(v.bundle, backend=backend, precision=v.precision, threads=opts.threads,
                          batch_size=settings.batch).open() for v in variants]
    try:
        console.print(f"timing {len(detectors)} models on a {settings.scene_size} px scene ({tiles} tiles of "
                      f"{settings.tile} px, overlap {settings.overlap}), {opts.iters} interleaved rounds")
        timed = time_scenes(detectors, image, settings, opts.iters, opts.warmup, opts.progress)
        info = [det.describe() for det in detectors]
    finally:
        for det in detectors:
            det.close()
    teacher_s = timed[0]["seconds_per_scene"]["median"] if variants[0].role == "teacher" else None
    rows = []
    for v, t, d in zip(variants, timed, info):
        s = t["seconds_per_scene"]["median"]
        rows.append({"name": f"{v.name}", "role": v.role, "precision": v.precision, "trained": v.trained,
                     "params": v.params, "gflops": v.gflops, "input_size": d["input_size"],
                     "backend": f"{d['backend']} ({', '.join(d['runner'].get('providers', [])) or 'default'})",
                     "threads": d["runner"].get("intra_op_threads"), **t, "tiles_per_s": tiles / s,
                     "speedup_vs_teacher": teacher_s / s if teacher_s else None})
    result = {
        "pipeline": pipe.name, "target": opts.target, "latency_only": opts.latency_only,
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(), "machine": machine_facts(),
        "scene": {"size": [settings.scene_size, settings.scene_size], "generator": "runtime.data.synthetic",
                  "seed": settings.seed, "objects": objects,
                  "file": str(out_dir / f"scene_{settings.scene_size}.png")},
        "tiling": {"tile": settings.tile, "overlap": settings.overlap, "tiles": tiles,
                   "tiles_per_detect_call": max(settings.batch, 4), "images_per_network_call": settings.batch,
                   "as": f"python -m runtime.infer BUNDLE SCENE --tile --tile-size {settings.tile} --overlap "
                         f"{settings.overlap} --batch {settings.batch}"},
        "measured": ("seconds per scene from the decoded uint8 image to merged detections in scene pixels "
                     f"(median of {opts.iters} interleaved rounds after {opts.warmup} warm-up scene(s) per model); "
                     "stages_s_median splits one scene into the runtime's pre-processing, network and "
                     "post-processing summed over its tiles, plus tiling and the cross-tile merge"),
        "iters": opts.iters, "warmup": opts.warmup, "notes": notes, "rows": rows,
    }
    path = out_json or out_dir / "scene_bench.json"
    write_json_atomic(path, result)
    return result, path


def print_table(result: dict[str, Any], console: Console | None = None) -> None:
    """Seconds per scene, the stage split and the speed-up over the FP32 teacher."""
    # Piped output (| tee log) would get rich's 80-column default and truncate every cell.
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    m, sc, tl = result["machine"], result["scene"], result["tiling"]
    title = (f"{result['pipeline']}: seconds per {sc['size'][0]} x {sc['size'][1]} px scene, {tl['tiles']} tiles of "
             f"{tl['tile']} px (overlap {tl['overlap']}), {result['target']}")
    caption = (f"{m.get('cpu_model', '?')}, {m.get('cpus_usable', '?')} usable cores; median of {result['iters']} "
               f"rounds; {result['date']}" + ("; untrained weights (latency only)" if result["latency_only"] else ""))
    table = Table(title=title, caption=caption)
    for col in ("model", "backend", "input px", "s / scene", "pre s", "network s", "post s", "merge s", "tiles/s",
                "speed-up"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for r in result["rows"]:
        st = r["stages_s_median"]
        table.add_row(r["name"], r["backend"], str(r["input_size"][0]), f"{r['seconds_per_scene']['median']:.2f}",
                      f"{st['preprocess']:.2f}", f"{st['infer']:.2f}", f"{st['postprocess']:.2f}",
                      f"{st['tiling_and_merge']:.2f}", f"{r['tiles_per_s']:.1f}",
                      f"{r['speedup_vs_teacher']:.1f}x" if r["speedup_vs_teacher"] else "")
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    from benchmarks.report import ReportOptions

    parser = argparse.ArgumentParser(prog="python -m benchmarks.scene_bench", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--target", default="cpu", help="deploy target whose bundles are timed (default cpu)")
    parser.add_argument("--latency-only", action="store_true",
                        help="time randomly initialised networks of the pipeline and its sibling pipelines' students")
    parser.add_argument("--scene-size", type=int, default=4096, help="scene side in px (default 4096)")
    parser.add_argument("--tile", type=int, default=1024, help="tile side in px (default 1024)")
    parser.add_argument("--overlap", type=int, default=200, help="tile overlap in px (default 200)")
    parser.add_argument("--objects", type=int, default=SCENE_OBJECTS,
                        help=f"objects painted into the scene (default {SCENE_OBJECTS})")
    parser.add_argument("--batch", type=int, default=1, help="images per network call, as runtime.infer --batch")
    parser.add_argument("--iters", type=int, default=3, help="timed scenes per model (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed scenes per model first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default all cores)")
    parser.add_argument("--calib-images", type=int, default=8, help="calibration images with --latency-only")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory of the bundles and the scene (default: the latency report's, "
                             "reports/<pipeline>/<target>[-latency-only])")
    parser.add_argument("--json", type=Path, default=None, help="output JSON (default OUT/scene_bench.json)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    opts = ReportOptions(pipeline=args.pipeline, target=args.target, latency_only=args.latency_only, out=args.out,
                         iters=args.iters, warmup=args.warmup, threads=args.threads, calib_images=args.calib_images,
                         config=args.config, overrides=list(args.overrides))
    settings = SceneSettings(args.scene_size, args.tile, args.overlap, args.batch, args.objects)
    result, path = run(opts, settings, args.json)
    print_table(result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
