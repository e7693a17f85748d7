"""`python -m deploy.verify BUNDLE [--dataset DIR [--backend trt]]`: re-check a bundle; on the device, gate the engine.

Without ``--dataset``: the hashes from manifest.json (and a registered engine against engine.json) are checked, then
both ONNX files run under ONNX Runtime through Polygraphy's Comparator on calibration images listed in the bundle
(or random inputs when those images are not on this machine) and the errors per output are printed; INT8 is expected
to differ, so the table informs rather than fails, unless --atol/--rtol are given.

With ``--dataset DIR``: the device gate. The host's accuracy gate scored ONNX Runtime, not what TensorRT runs, so
this scores the bundle's backend itself (``--backend trt``: the registered engine; default ``auto``) on the same
test images the host scored (listed in accuracy_gate.json, looked up by file name in DIR), with the runtime's
detector loop and metrics, and fails when its AP50 is more than ``deploy.ap50_drop_limit`` points below the FP32
AP50 recorded at build time. Needs only the torch-free runtime (and TensorRT for ``--backend trt``).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import write_json_atomic
from runtime.backends.select import BACKENDS, PRECISIONS
from runtime.cli import add_debug_flag, run_cli
from runtime.errors import UserError
from runtime.manifest import Bundle, load_bundle
from runtime.preprocess import preprocess_batch, read_image

GATE_FILE = "accuracy_gate.json"


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


def compare_int8(bundle: Bundle, images: int, atol: float | None, rtol: float | None) -> None:
    """FP32 vs INT8 ONNX under ONNX Runtime (Polygraphy's Comparator), printed; UserError beyond given tolerances."""
    from rich.console import Console
    from rich.table import Table

    from deploy.fidelity import compare_runners, onnx_runner  # Polygraphy: only this mode needs it

    console = Console()
    fp32 = bundle.path_for_role("onnx-fp32")
    try:
        int8 = bundle.path_for_role("onnx-int8")
    except UserError:
        console.print("no INT8 model in this bundle: nothing to compare", markup=False)
        return
    feeds, source = verification_feeds(bundle.root, bundle.manifest.preprocess, max(1, images))
    strict = atol is not None or rtol is not None
    report = compare_runners(onnx_runner(fp32, "fp32"), onnx_runner(int8, "int8"), feeds,
                             atol=atol if atol is not None else 0.0, rtol=rtol if rtol is not None else 0.0)
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


def gate_record(bundle: Bundle) -> dict[str, Any]:
    """accuracy_gate.json of the bundle: FP32 AP50 measured at build time, the limit, the images scored."""
    path = bundle.root / GATE_FILE
    if GATE_FILE not in bundle.manifest.files or not path.is_file():
        raise UserError(f"bundle has no {GATE_FILE} (the FP32 AP50 measured at build time)", str(bundle.root),
                        "rebuild it with `python -m deploy.build` (every build records it)")
    gate = json.loads(path.read_text(encoding="utf-8"))
    if not gate.get("images"):
        raise UserError(f"{GATE_FILE} lists no test images", str(path), "rebuild the bundle with deploy.build")
    return gate


def gate_dataset(root: Path, fmt: str | None, split: str, classes: Sequence[str], names: Sequence[str]) -> Any:
    """The DetectionSet of the images the host gate scored (by file name, in its order) from the dataset at root."""
    from runtime.data import load_dataset
    from runtime.records import DetectionSet

    dataset = load_dataset(fmt, root, split, classes=list(classes))
    by_name = {r.path.name: r for r in dataset.records}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(f"{len(missing)} of the {len(names)} images the build scored are not in split '{split}' "
                        f"(first: {missing[0]})", str(root),
                        "copy the pipeline's test split to the device and pass its root (and --split/--format)")
    return DetectionSet(dataset.name, dataset.classes, [by_name[n] for n in names])


def device_gate(args: argparse.Namespace) -> dict[str, Any]:
    """Score the bundle's backend on the build's test images; the JSON-ready result (passed or not)."""
    from runtime.data import to_coco_dict
    from runtime.detector import Detector, default_report_path
    from runtime.evaluate import detect_dataset
    from runtime.metrics import evaluate_coco

    bundle = load_bundle(args.bundle, verify=True)
    gate = gate_record(bundle)
    limit = gate["limit"] if args.ap50_drop_limit is None else args.ap50_drop_limit
    split = args.split or gate.get("split") or "test"
    dataset = gate_dataset(args.dataset, args.format, split, bundle.manifest.classes, gate["images"])
    with Detector(bundle, backend=args.backend, precision=args.precision, batch_size=args.batch) as detector:
        results, times = detect_dataset(detector, dataset, args.batch, tile=False, progress=not args.quiet)
        info = detector.describe()
        report_path = args.json or default_report_path(detector, f"device_gate_{split}")
    ap50 = float(evaluate_coco(to_coco_dict(dataset), results).AP50)
    fp32 = float(gate["fp32"]["AP50"])
    drop = 100 * (fp32 - ap50)
    result = {
        "bundle": str(args.bundle), "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "detector": info, "dataset": {"root": str(args.dataset), "split": split, "images": len(dataset)},
        "fp32_ap50_at_build": fp32, "fp32_measured_with": "ONNX Runtime CPU on the build host",
        "ap50": ap50, "drop_ap50": drop, "limit": limit, "passed": drop <= limit,
        "ms_per_image": 1e3 * times.total / max(1, times.images),
    }
    write_json_atomic(report_path, result)
    result["report"] = str(report_path)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Verify one bundle; exit 0 when the hashes hold and (with tolerances / --dataset) the checks pass."""
    parser = argparse.ArgumentParser(prog="python -m deploy.verify", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="bundle directory, e.g. artifacts/demo_retina/jetson")
    parser.add_argument("--images", type=int, default=4, help="how many images to compare (default 4)")
    parser.add_argument("--atol", type=float, default=None, help="fail when INT8 differs beyond atol and rtol")
    parser.add_argument("--rtol", type=float, default=None)
    gate = parser.add_argument_group("device gate (with --dataset)")
    gate.add_argument("--dataset", type=Path, default=None,
                      help="dataset root holding the test images the build scored (accuracy_gate.json)")
    gate.add_argument("--format", default=None, help="dataset format (default: detected)")
    gate.add_argument("--split", default=None, help="split (default: the one the build scored)")
    gate.add_argument("--backend", default="auto", choices=BACKENDS, help="trt: the registered TensorRT engine; auto: the best that "
                      "runs here (warns when an engine cannot); ort-cpu / ort-cuda / ort-trt")
    gate.add_argument("--precision", default="auto", choices=PRECISIONS,
                      help="which ONNX model for ONNX Runtime backends")
    gate.add_argument("--batch", type=int, default=1, help="images per backend call (default 1)")
    gate.add_argument("--ap50-drop-limit", type=float, default=None,
                      help="AP50 points the backend may lose against FP32 (default: the build's "
                           "deploy.ap50_drop_limit)")
    gate.add_argument("--json", type=Path, default=None,
                      help="report path (default: reports/<pipeline>/<target>/device_gate_<split>_<backend>_<precision>"
                           ".json)")
    gate.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.dataset is not None:
        result = device_gate(args)
        det = result["detector"]
        verdict = "PASS" if result["passed"] else "FAIL"
        print(f"{verdict}: {det['backend']} {det['precision']} ({det['model_file']}) AP50 {100 * result['ap50']:.2f} "
              f"on {result['dataset']['images']} images vs FP32 {100 * result['fp32_ap50_at_build']:.2f} at build "
              f"time: drop {result['drop_ap50']:.2f} points (limit {result['limit']:g}); wrote {result['report']}")
        if not result["passed"]:
            raise UserError(f"{det['backend']} AP50 is {result['drop_ap50']:.2f} points below the FP32 AP50 "
                            f"recorded at build time (limit {result['limit']:g})", str(args.bundle),
                            "rebuild with a higher deploy.ap50_drop_limit, more calibration images, or "
                            "--precision fp16")
        return 0
    bundle = load_bundle(args.bundle, verify=True)
    registered = f"; engine {bundle.engine.engine.file} matches engine.json" if bundle.engine else ""
    print(f"{len(bundle.manifest.files)} files match their sha256 in {args.bundle / 'manifest.json'}{registered}")
    compare_int8(bundle, args.images, args.atol, args.rtol)
    return 0


if __name__ == "__main__":
    run_cli(main)
