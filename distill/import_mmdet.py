"""`python -m distill.import_mmdet CKPT --pipeline NAME [--role teacher|student] [--out PATH]`.

Converts a RetinaNet or Faster R-CNN checkpoint written by MMDetection 3.x (a plain state dict, or an MMEngine runner
checkpoint with meta / state_dict / message_hub) into this project's model checkpoint, without mmdet, mmcv or
mmengine installed and without running anything stored in the file. The converted model follows MMDetection's
anchor, box-coder, RoIAlign and P7 conventions (ModelSpec `mmdet_compat`), so it reproduces MMDetection's outputs.
Use the result like a trained stage: e.g. `python -m distill.run NAME --teacher <out>`.
"""
from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console
from rich.table import Table

from distill.checkpoint import file_sha256, model_payload, save_checkpoint, thresholds_from_config
from distill.mmdet_compat import (InferredSpec, check_against, infer_spec, load_converted, map_state_dict,
                                  read_mmdet_checkpoint, unsupported_settings)
from distill.models import build_detector
from distill.models.mmdet_variant import to_mmdet_variant
from distill.stages import config_hash
from runtime.atomic import write_json_atomic as write_json
from runtime.cli import add_debug_flag, run_cli
from runtime.config import Pipeline, add_config_args, load_config
from runtime.data.classes import class_list
from runtime.errors import UserError

ROLES = ("teacher", "student")
METHOD = "mmdet-import"


@dataclass
class ImportReport:
    """What the conversion did: source facts, the architecture found, and every key not carried over."""

    source: str
    sha256: str
    kind: str
    fp16: bool
    inferred: dict[str, Any]
    mapped: int
    dropped: list[str]
    unmapped: list[str]
    missing: list[str]
    mmengine_version: str | None = None


def _check_spec(found: InferredSpec, spec, role: str, pipeline: str) -> None:
    """The pipeline's model for `role` must be the architecture the checkpoint holds."""
    wanted = {"arch": found.arch, "backbone": found.backbone, "fpn_width": found.fpn_width}
    if found.arch == "retinanet":
        wanted["head_convs"] = found.head_convs
        wanted["head"] = "conv"  # MMDetection's RetinaHead uses full 3x3 convs
    if found.roi_fc_width is not None and hasattr(spec, "roi_fc_width"):
        wanted["roi_fc_width"] = found.roi_fc_width
    diff = {k: v for k, v in wanted.items() if getattr(spec, k) != v}
    if diff:
        said = ", ".join(f"{k}: checkpoint {v!r}, pipeline {getattr(spec, k)!r}" for k, v in diff.items())
        sets = " ".join(f"--set {role}.{k}={v}" for k, v in diff.items())
        raise UserError(f"the checkpoint is not the pipeline's {role} model ({said})", where=f"pipeline {pipeline}",
                        fix=f"choose the matching pipeline/--role, or override it: {sets}")


def _check_classes(checkpoint_classes: tuple[str, ...] | None, classes: tuple[str, ...], found: InferredSpec,
                   pipeline: str) -> None:
    if found.num_classes != len(classes):
        raise UserError(f"the checkpoint predicts {found.num_classes} classes, the pipeline's dataset has "
                        f"{len(classes)}", where=f"pipeline {pipeline}",
                        fix="import into a pipeline of the same dataset")
    if checkpoint_classes and [c.casefold() for c in checkpoint_classes] != [c.casefold() for c in classes]:
        raise UserError(f"class order differs: checkpoint {list(checkpoint_classes)}, pipeline {list(classes)}",
                        where=f"pipeline {pipeline}", fix="use a dataset whose class list has the checkpoint's order")


def import_checkpoint(path: str | Path, pipe: Pipeline, role: str = "student") -> tuple[dict[str, Any], ImportReport]:
    """Convert an MMDetection checkpoint for `pipe`'s `role` model: (our checkpoint payload, report)."""
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}", where="--role", fix=f"use one of {', '.join(ROLES)}")
    source = read_mmdet_checkpoint(path)
    unsupported = unsupported_settings(source.meta)
    if unsupported:
        raise UserError(f"the checkpoint's config uses settings the conversion cannot reproduce: "
                        f"{'; '.join(unsupported)}", where=str(path),
                        fix="convert a model trained with the DS2D2 reference settings (pytorch-style ResNet, RGB)")
    found = infer_spec(source.state_dict)
    spec = getattr(pipe, role)
    _check_spec(found, spec, role, pipe.name)
    classes = class_list(pipe.dataset.classes)
    _check_classes(source.classes, classes, found, pipe.name)

    model_spec = spec.model_dump(mode="json") | {"pretrained_backbone": False, "mmdet_compat": True}
    if found.roi_fc_width is not None:
        model_spec["roi_fc_width"] = found.roi_fc_width
    config = pipe.as_dict()
    model = build_detector(SimpleNamespace(**model_spec), found.num_classes, pipe.input_size,
                           **thresholds_from_config(config))
    to_mmdet_variant(model)  # RetinaNet's builder does not read mmdet_compat
    conversion = check_against(map_state_dict(source.state_dict, found.arch), model)
    load_converted(conversion, model, str(path))

    sha = file_sha256(path)
    report = ImportReport(str(Path(path).resolve()), sha, source.kind, source.half_precision, asdict(found),
                          len(conversion.state_dict), conversion.dropped, conversion.unmapped, conversion.missing,
                          source.meta.get("mmengine_version"))
    meta = {"role": role, "method": None if role == "teacher" else METHOD, "model_spec": model_spec,
            "num_classes": found.num_classes, "classes": list(classes), "input_size": pipe.input_size,
            "config": config, "config_hash": config_hash({"import": sha, "role": role, "model_spec": model_spec}),
            "inputs": {"mmdet_checkpoint": sha}}
    payload = model_payload(meta, model, metrics={}, finished=True,
                            source={"path": report.source, "sha256": sha, "kind": source.kind,
                                    "fp16": source.half_precision, "dropped": len(conversion.dropped)})
    return payload, report


def _summary(report: ImportReport, out: Path) -> Table:
    table = Table(title="MMDetection checkpoint imported", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value", overflow="fold")
    found = report.inferred
    model = f"{found['arch']} {found['backbone']} FPN {found['fpn_width']}, {found['num_classes']} classes"
    by_prefix = Counter(k.split(".", 1)[0] for k in report.dropped)
    rows = [("source", f"{report.source} ({report.kind}{', fp16' if report.fp16 else ''})"), ("model", model),
            ("tensors mapped", str(report.mapped)),
            ("dropped (training leftovers)", ", ".join(f"{p}.* x{n}" for p, n in by_prefix.items()) or "none"),
            ("unmapped / missing", f"{len(report.unmapped)} / {len(report.missing)}"), ("written", str(out))]
    for row in rows:
        table.add_row(*row)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Convert one checkpoint, write it (and a JSON report beside it), print a summary."""
    parser = argparse.ArgumentParser(prog="python -m distill.import_mmdet", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint", type=Path, help="MMDetection .pth (state dict or runner checkpoint)")
    parser.add_argument("--pipeline", default=None, help="pipeline whose dataset, input size and model it is for")
    parser.add_argument("--role", choices=ROLES, default="student",
                        help="which model of the pipeline it is (default: student)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output checkpoint (default <work_dir>/<pipeline>/imported/<role>.pt)")
    add_config_args(parser, with_pipeline=False)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    project = load_config(args.config, args.overrides, pipeline=args.pipeline)
    pipe = project.pipeline(args.pipeline)
    payload, report = import_checkpoint(args.checkpoint, pipe, args.role)
    out = args.out or pipe.work_dir / "imported" / f"{args.role}.pt"
    save_checkpoint(out, payload)
    write_json(out.with_suffix(".import.json"),
               asdict(report) | {"output": str(out), "output_sha256": file_sha256(out)})
    Console().print(_summary(report, out))
    return 0


if __name__ == "__main__":
    run_cli(main)
