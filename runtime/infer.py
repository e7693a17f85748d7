"""`python -m runtime.infer BUNDLE IMAGES... [--tile] [--out DIR]`: detections of a deployed bundle on image files.

Writes OUT/detections.json (COCO results: image_id, category_id = label + 1, bbox xywh, score), OUT/images.json (the
id, file, size and class names those results refer to) and one PNG per image with labelled boxes.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from runtime.cli import add_debug_flag, run_cli
from runtime.data.images import IMAGE_SUFFIXES, write_bytes_atomic
from runtime.detector import Detector, add_detector_args, detector_from_args
from runtime.draw import draw_detections, save_png
from runtime.errors import UserError
from runtime.postprocess import Detections
from runtime.preprocess import read_image
from runtime.tiling import TILE_BATCH, tiled_detect


def collect_images(items: Sequence[Path]) -> list[Path]:
    """Image files from the arguments: files as given, directories expanded to their images (sorted)."""
    paths: list[Path] = []
    for item in items:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError("directory holds no images", str(item), f"expected files ending in {IMAGE_SUFFIXES}")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError("image not found", str(item), "give image files or directories of images")
    return paths


def png_names(paths: Sequence[Path]) -> list[str]:
    """One PNG name per image: its stem, prefixed by its index where two images share a stem."""
    stems = [p.stem for p in paths]
    return [f"{stem}.png" if stems.count(stem) == 1 else f"{i:04d}_{stem}.png" for i, stem in enumerate(stems)]


def detect_image(detector: Detector, image, tile: bool = False, tile_size: int | None = None,
                 overlap: int | None = None, batch: int = 1) -> Detections:
    """One image's detections as this CLI computes them: whole, or tiled with at least TILE_BATCH tiles per
    detect() call."""
    if tile:
        return tiled_detect(detector, image, tile=tile_size, overlap=overlap, batch_size=max(batch, TILE_BATCH))
    return detector.detect([image])[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run a bundle on images; write COCO-results JSON and PNGs with labelled boxes."""
    parser = argparse.ArgumentParser(prog="python -m runtime.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detector_args(parser)
    parser.add_argument("images", type=Path, nargs="+", help="image files or directories of images")
    parser.add_argument("--out", type=Path, default=Path("infer_out"), help="output directory (default: infer_out)")
    parser.add_argument("--tile", action="store_true", help="tiled inference for scenes larger than the input")
    parser.add_argument("--tile-size", type=int, default=None, help="tile side in px (default: the model input)")
    parser.add_argument("--overlap", type=int, default=None, help="tile overlap in px (default: a quarter tile)")
    parser.add_argument("--draw-thresh", type=float, default=0.3, help="minimum score drawn in the PNGs")
    parser.add_argument("--no-png", action="store_true", help="write only the JSON files")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.tile_size is not None and args.tile_size < 1:
        raise UserError(f"must be positive, got {args.tile_size}", "--tile-size")
    paths = collect_images(args.images)
    if args.tile:
        args.batch = max(args.batch, TILE_BATCH)  # tiles reach the backend in the tiler's batches

    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    console = Console(stderr=True)
    results, images_info, rows = [], [], []
    with detector_from_args(args) as detector:
        tile = args.tile_size or min(detector.input_size)
        if args.overlap is not None and not 0 <= args.overlap < tile:
            raise UserError(f"must be at least 0 and smaller than the tile ({tile} px), got {args.overlap}",
                            "--overlap")
        names = png_names(paths)
        for image_id, (path, png) in enumerate(track(list(zip(paths, names)), description="detecting",
                                                    console=console, transient=True), start=1):
            image = read_image(path)
            height, width = image.shape[:2]
            dets = detect_image(detector, image, args.tile, args.tile_size, args.overlap, args.batch)
            results.extend(dets.to_coco_results(image_id))
            images_info.append({"id": image_id, "file_name": str(path), "width": width, "height": height})
            if not args.no_png:
                save_png(args.out / png, draw_detections(image, dets, detector.classes, args.draw_thresh))
            rows.append((path.name, f"{width}x{height}", len(dets), int((dets.scores >= args.draw_thresh).sum())))
            if not args.tile and max(height, width) > 2 * max(detector.input_size):
                console.print(f"hint: {path.name} is {width}x{height}, squeezed into {detector.input_size[1]}x"
                              f"{detector.input_size[0]}; --tile keeps small objects visible")
        info = detector.describe()
    write_bytes_atomic(args.out / "detections.json", json.dumps(results).encode())
    meta = {"images": images_info, "classes": list(detector.classes), "category_id": "label + 1",
            "detector": info, "tiled": bool(args.tile)}
    write_bytes_atomic(args.out / "images.json", json.dumps(meta, indent=1).encode())

    table = Table(title=f"{len(paths)} image(s), {info['backend']} {info['precision']}")
    for col in ("image", "size", "detections", f"score >= {args.draw_thresh}"):
        table.add_column(col, justify="left" if col == "image" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    Console().print(table)
    print(f"wrote {args.out / 'detections.json'}" + ("" if args.no_png else f" and {len(paths)} PNG(s) in {args.out}"))
    return 0


if __name__ == "__main__":
    run_cli(main)
