"""`python -m deploy.verify BUNDLE`: re-check a bundle's hashes, then compare FP32 and INT8 on a few images.

The hashes come from manifest.json (runtime.manifest.load_bundle refuses a missing or changed file with one line).
The comparison runs both ONNX files under ONNX Runtime through Polygraphy's Comparator on calibration images listed
in the bundle (or random inputs when those images are not on this machine) and prints the errors per output; INT8
is expected to differ, so the table informs rather than fails, unless --atol/--rtol are given.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from deploy.fidelity import compare_runners, onnx_runner
from runtime.cli import add_debug_flag, run_cli
from runtime.errors import UserError
from runtime.manifest import load_bundle
from runtime.preprocess import preprocess_batch, read_image


def verification_feeds(bundle_root: Path, preprocess, count: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """Up to `count` preprocessed calibration images of the bundle (else seeded random inputs), and their source."""
    listing = bundle_root / "calibration.json"
    paths: list[Path] = []
    if listing.is_file():
        images = json.loads(listing.read_text(encoding="utf-8")).get("images", [])
        paths = [Path(item["path"]) for item in images if Path(item["path"]).is_file()][:count]
    if paths:
        return [{"images": preprocess_batch([read_image(p)], preprocess)[0]} for p in paths], "calibration images"
    height, width = preprocess.input_size
    rng = np.random.default_rng(0)
    return ([{"images": rng.standard_normal((1, 3, height, width), dtype=np.float32)} for _ in range(count)],
            "random inputs (the calibration images are not on this machine)")


def main(argv: Sequence[str] | None = None) -> int:
    """Verify one bundle; exit 0 when the hashes hold (and, with tolerances, FP32 and INT8 agree)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.verify", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="bundle directory, e.g. artifacts/demo_retina/jetson")
    parser.add_argument("--images", type=int, default=4, help="how many images to compare (default 4)")
    parser.add_argument("--atol", type=float, default=None, help="fail when INT8 differs beyond atol and rtol")
    parser.add_argument("--rtol", type=float, default=None)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    console = Console()
    bundle = load_bundle(args.bundle, verify=True)
    manifest = bundle.manifest
    console.print(f"{len(manifest.files)} files match their sha256 in {args.bundle / 'manifest.json'}",
                  markup=False, highlight=False)
    fp32 = bundle.path_for_role("onnx-fp32")
    try:
        int8 = bundle.path_for_role("onnx-int8")
    except UserError:
        console.print("no INT8 model in this bundle: nothing to compare", markup=False)
        return 0
    feeds, source = verification_feeds(bundle.root, manifest.preprocess, max(1, args.images))
    strict = args.atol is not None or args.rtol is not None
    report = compare_runners(onnx_runner(fp32, "fp32"), onnx_runner(int8, "int8"), feeds,
                             atol=args.atol if args.atol is not None else 0.0,
                             rtol=args.rtol if args.rtol is not None else 0.0)
    table = Table(title=f"FP32 vs INT8 on {len(feeds)} {source}")
    for col in ("output", "max |diff|", "mean |diff|", "max rel", *(("within tolerance",) if strict else ())):
        table.add_column(col)
    for out in report.outputs:
        cells = [out.name, f"{out.max_abs:.4g}", f"{out.mean_abs:.4g}", f"{out.max_rel:.4g}"]
        table.add_row(*cells, *(("yes" if out.passed else "NO"),) if strict else ())
    console.print(table)
    if strict and not report.passed:
        raise UserError(f"INT8 differs from FP32 beyond tolerance ({report.worst()})", where=str(int8),
                        fix="loosen --atol/--rtol, or rebuild with more calibration images")
    return 0


if __name__ == "__main__":
    run_cli(main)
