"""`python -m runtime.metrics GT.json DETECTIONS.json [--json] [--voc07]`: COCO + DIOR/VOC metrics from files."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.cli import add_debug_flag, run_cli
from runtime.errors import UserError
from runtime.metrics import EvalResult, check_coco_gt, check_detections, evaluate_detections


def _load_json(path: Path, what: str) -> Any:
    """Read a JSON file, turning a missing or malformed file into a UserError."""
    if not path.is_file():
        raise UserError(f"{what} file not found", str(path), "give the path of an existing JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise UserError(f"{what} is not valid JSON ({exc})", f"{path}{line}", "fix or regenerate the file") from None


def _fmt(value: float | None) -> str:
    return "-" if value is None or value < 0 else f"{100 * value:.2f}"


def print_tables(result: EvalResult) -> None:
    """Print the COCO summary and the per-class AP50 table with rich."""
    from rich.console import Console
    from rich.table import Table

    coco, voc = result.coco, result.voc
    summary = Table(title=f"COCO bbox ({coco.backend})", caption="'-': no ground truth in that range")
    keys = ("AP", "AP50", "AP75", "AP_s", "AP_m", "AP_l", "AR100")
    for key in keys:
        summary.add_column(key, justify="right")
    summary.add_row(*(_fmt(getattr(coco, k)) for k in keys))
    per_class = Table(title=f"Per-class AP50 (VOC: {voc.metric})",
                      caption=f"VOC: IoU >= {voc.iou_thr}, difficult objects ignored; COCO: pycocotools rules")
    for col in ("class", "GT", "difficult", "VOC AP50", "COCO AP50", "COCO AP"):
        per_class.add_column(col, justify="left" if col == "class" else "right")
    for name, ap in voc.per_class_AP50.items():
        per_class.add_row(name, str(voc.num_gt[name]), str(voc.num_difficult.get(name, 0)), _fmt(ap),
                          _fmt(coco.per_class_AP50.get(name)), _fmt(coco.per_class_AP.get(name)))
    per_class.add_section()
    per_class.add_row("mean", str(sum(voc.num_gt.values())), str(sum(voc.num_difficult.values())), _fmt(voc.mAP),
                      _fmt(coco.AP50), _fmt(coco.AP))
    console = Console()
    console.print(summary)
    console.print(per_class)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate COCO-results detections against COCO ground truth; print tables or one JSON object."""
    parser = argparse.ArgumentParser(prog="python -m runtime.metrics", description=__doc__)
    parser.add_argument("gt", type=Path, help="COCO ground-truth JSON (images, annotations, categories)")
    parser.add_argument("detections", type=Path, help="COCO results JSON: [{image_id, category_id, bbox, score}]")
    parser.add_argument("--json", action="store_true", help="print one JSON object {coco, voc} instead of tables")
    parser.add_argument("--voc07", action="store_true", help="VOC07 11-point AP instead of all-point area")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    gt = _load_json(args.gt, "ground truth")
    detections = _load_json(args.detections, "detections")
    # Validate here first so that errors name the files rather than "ground truth" / "detections".
    checked_gt = check_coco_gt(gt, where=str(args.gt))
    check_detections(detections, checked_gt, where=str(args.detections))
    result = evaluate_detections(gt, detections, use_07_metric=args.voc07)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    run_cli(main)
