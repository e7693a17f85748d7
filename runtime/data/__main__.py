"""`python -m runtime.data {stats,synth,split-dota}`: dataset statistics, synthetic data, DOTA patch splitting."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from runtime.cli import add_debug_flag, run_cli
from runtime.data.loader import FORMATS, load_dataset
from runtime.data.problems import ProblemReport
from runtime.errors import UserError


def _print_problems(report: ProblemReport) -> None:
    # stderr, so that `--json` output on stdout stays one clean JSON object
    if report.counts or report.notes:
        print(f"problems skipped: {len(report)}" if report.counts else "no problems skipped", file=sys.stderr)
        for line in report.summary():
            print(f"  {line}", file=sys.stderr)


def _anchor_setting(args: argparse.Namespace):
    """(AnchorSpec, input size, fg IoU) from --pipeline's model, else the reference RetinaNet anchors."""
    from runtime.anchors import anchor_spec_for

    if args.pipeline is None:
        return anchor_spec_for("retinanet"), args.input_size, args.fg_iou or 0.5
    from runtime.config import load_config

    pipe = load_config(args.config, pipeline=args.pipeline).pipeline(args.pipeline)
    model = getattr(pipe, args.model)
    reference_fg = 0.5 if model.arch == "retinanet" else 0.7  # the RPN's foreground threshold
    fg = args.fg_iou or (model.assign.fg_iou if model.assign is not None else reference_fg)
    return anchor_spec_for(model.arch, model.anchors, model.fpn_levels), args.input_size or pipe.input_size, fg


def cmd_stats(args: argparse.Namespace) -> int:
    """Print images, per-class objects, small (< 32² px area) and difficult counts of a dataset split, object sizes
    per class and how the detector's anchors cover them (with a better-fitting suggestion)."""
    from runtime.data.anchor_fit import anchor_report
    from runtime.data.stats import dataset_stats, print_anchor_report, print_stats

    report = ProblemReport(strict=args.strict)
    ds = load_dataset(args.format, args.path, args.split, classes=args.classes, strict=args.strict, report=report)
    stats = dataset_stats(ds)
    stats.problems = report.to_dict()
    spec, input_size, fg_iou = _anchor_setting(args)
    anchors = anchor_report(ds, input_size, spec, fg_iou, max_images=args.anchor_images)
    if args.json:
        print(json.dumps(stats.to_dict() | {"anchors": anchors.to_dict()}))
    else:
        console = Console()
        print_stats(stats, console, per_image=args.per_image or stats.images <= 20)
        print_anchor_report(anchors, console)
    _print_problems(report)
    return 0


def _parse_sets(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def cmd_synth(args: argparse.Namespace) -> int:
    """Generate (or confirm up to date) the synthetic DIOR-layout dataset."""
    from runtime.data.synthetic import SyntheticParams, generate

    fields = {k: v for k, v in (("seed", args.seed), ("image_size", args.image_size), ("num_train", args.num_train),
                                ("num_val", args.num_val), ("num_test", args.num_test)) if v is not None}
    if args.classes:
        fields["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    fields.update(_parse_sets(args.set))
    try:
        params = SyntheticParams(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"bad synthetic parameter {'.'.join(map(str, err['loc']))}: {err['msg']}",
                        fix="see `python -m runtime.data synth --help`") from None
    result = generate(params, args.root, overwrite=args.overwrite, progress=not args.json)
    summary = {"root": str(result.root), "written": result.written, "images": result.images,
               "objects": result.objects, "per_class": result.per_class, "seconds": round(result.seconds, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        state = "generated" if result.written else "already up to date (same parameters), nothing written"
        print(f"{result.root}: {state}; images {result.images}, {result.objects} objects {result.per_class}")
    return 0


def cmd_split_dota(args: argparse.Namespace) -> int:
    """Cut a DOTA dataset into overlapping patches (devkit style) written as a new DOTA dataset."""
    from runtime.data.dota_split import split_dota

    result = split_dota(args.src, args.dst, patch=args.patch, overlap=args.overlap, keep_thresh=args.keep_thresh,
                        split=args.split, classes=args.classes, below_thresh=args.below_thresh, strict=args.strict,
                        progress=True)
    print(f"{result.dst}: {result.images} images -> {result.patches} patches; {result.objects_in} objects -> "
          f"{result.objects_written} object-in-patch entries, {result.fragments_dropped} fragments under "
          f"{args.keep_thresh:.0%} dropped, {result.objects_in_no_patch} objects in no patch")
    _print_problems(result.report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of the three subcommands."""
    parser = argparse.ArgumentParser(prog="python -m runtime.data", description=__doc__)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="image / object / class counts of a dataset split")
    p.add_argument("path", type=Path, help="dataset root (DIOR, DOTA) or COCO json / root")
    p.add_argument("--format", choices=FORMATS, help="dataset format (default: detected)")
    p.add_argument("--split", help="split name (DIOR: train/val/trainval/test; DOTA: subfolder; COCO: json stem)")
    p.add_argument("--classes", help="class list: dior, dota1.0, dota1.5 or comma-separated names")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (file and line)")
    p.add_argument("--per-image", action="store_true", help="also list every image (default when <= 20 images)")
    p.add_argument("--pipeline", help="judge the anchors of this pipeline's model (and its input size) from "
                   "pipelines.yaml; default: the reference RetinaNet anchors")
    p.add_argument("--model", choices=("teacher", "student"), default="teacher", help="which model of --pipeline")
    p.add_argument("--config", help="pipelines.yaml to read --pipeline from (default: the repository's)")
    p.add_argument("--input-size", type=int, help="network input size the images are stretched to (default: the "
                   "pipeline's, else the images' own size)")
    p.add_argument("--fg-iou", type=float, help="foreground IoU of the assigner (default: the model's)")
    p.add_argument("--anchor-images", type=int, default=200, help="images sampled for the anchor coverage")
    add_debug_flag(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("synth", help="generate the synthetic DIOR-layout dataset")
    p.add_argument("root", type=Path, help="output directory, e.g. data/synthetic/demo")
    p.add_argument("--seed", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-train", type=int)
    p.add_argument("--num-val", type=int)
    p.add_argument("--num-test", type=int)
    p.add_argument("--classes", help="comma-separated DIOR names (vehicle,storagetank,airplane,ship,tenniscourt,...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any SyntheticParams field, value in JSON (e.g. objects_per_image=[2,20])")
    p.add_argument("--overwrite", action="store_true", help="replace a set made with other parameters")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_debug_flag(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("split-dota", help="cut DOTA images into overlapping patches (DOTA devkit style)")
    p.add_argument("src", type=Path, help="DOTA root (images/ + labelTxt/, or train/ val/ holding them)")
    p.add_argument("dst", type=Path, help="output root (same layout)")
    p.add_argument("--patch", type=int, default=1024)
    p.add_argument("--overlap", type=int, default=200)
    p.add_argument("--keep-thresh", type=float, default=0.7, help="min fraction of an object's area inside a patch")
    p.add_argument("--below-thresh", choices=("drop", "difficult"), default="drop",
                   help="what to do with smaller fragments: drop, or write with difficult flag 2 like the devkit")
    p.add_argument("--split", help="only this split subfolder (default: all, or the root itself)")
    p.add_argument("--classes", help="validate class names against dota1.0 / dota1.5 / a list (default: keep all)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    add_debug_flag(p)
    p.set_defaults(func=cmd_split_dota)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m runtime.data`."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run_cli(main)
