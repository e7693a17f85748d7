"""The one entry point every stage uses to read a dataset: `load_dataset(format, root, split, ...)`."""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from runtime.data.classes import DIOR_CLASSES, DOTA_V1_0, class_list
from runtime.data.coco import find_coco_files, load_coco
from runtime.data.dior import load_dior
from runtime.data.dota import ROOT_SPLITS, load_dota
from runtime.data.problems import ProblemReport
from runtime.errors import UserError
from runtime.records import DetectionSet

FORMATS = ("dior", "dota", "coco")
MANIFEST = "manifest.json"
SYNTHETIC_GENERATOR = "runtime.data.synthetic"


class DataProblemWarning(UserWarning):
    """Emitted when a lenient load skipped bad input and the caller passed no ProblemReport to receive it."""


def missing_root_error(root: Path) -> UserError:
    """The error for a dataset root that does not exist: where real data goes, and how to get synthetic data."""
    return UserError(
        f"dataset root {root} does not exist",
        fix="put DIOR at data/DIOR (JPEGImages-trainval/, JPEGImages-test/, Annotations/, ImageSets/Main/) and "
        "DOTA at data/DOTA (train/ and val/ with images/ and labelTxt/), or use synthetic data: `make demo` or "
        "`python -m runtime.data synth data/synthetic/demo`",
    )


def detect_format(path: Path | str) -> str:
    """Guess 'dior', 'dota' or 'coco' from a dataset root (or a COCO json file)."""
    path = Path(path)
    if not path.exists():
        raise missing_root_error(path)
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        raise UserError("cannot tell the dataset format of a file", where=str(path),
                        fix="pass a dataset root or a .json")
    if (path / "ImageSets").is_dir() or (path / "Annotations").is_dir():
        return "dior"
    if (path / "labelTxt").is_dir() or any((p / "labelTxt").is_dir() for p in path.iterdir() if p.is_dir()):
        return "dota"
    if any(path.glob("*.json")) or (path / "annotations").is_dir():
        return "coco"
    raise UserError(
        "cannot tell the dataset format", where=str(path),
        fix="pass --format dior|dota|coco; DIOR has Annotations/ + ImageSets/, DOTA labelTxt/, COCO a .json",
    )


def default_split(fmt: str, root: Path) -> str:
    """The split read when none is given: DIOR 'trainval', DOTA the root itself or its first split, COCO 'trainval'."""
    if fmt == "dota":
        if (root / "labelTxt").is_dir():
            return ""
        subs = sorted(p.name for p in root.iterdir() if (p / "labelTxt").is_dir())
        return "train" if "train" in subs else (subs[0] if subs else "")
    if fmt == "coco" and root.is_dir() and not (root / "trainval.json").is_file():
        jsons = sorted(root.glob("*.json"))
        return jsons[0].stem if jsons else "trainval"
    return "trainval"


def synthetic_classes(root: Path) -> tuple[str, ...] | None:
    """The class list recorded in a synthetic dataset's manifest, or None for a real dataset."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != SYNTHETIC_GENERATOR:
        return None
    names = manifest.get("params", {}).get("classes")
    return tuple(names) if names else None


def load_dataset(
    format: str | None,
    root: Path | str,
    split: str | None = None,
    classes: str | Sequence[str] | None = None,
    strict: bool = False,
    report: ProblemReport | None = None,
    check_images: bool = True,
    image_dir: Path | str | None = None,
) -> DetectionSet:
    """Read one split of a DIOR / DOTA / COCO dataset into a DetectionSet.

    classes=None means the format's own list (DIOR's 20, DOTA v1.0's 15, the json's categories; a synthetic set's
    manifest classes). strict=True raises UserError at the first bad record (and makes a given report strict);
    otherwise bad records are skipped and counted in `report` (or a DataProblemWarning when no report is given).
    COCO: `root` is a folder (<split>.json + JPEGImages-<split>/) or the json itself; `image_dir` overrides where
    its relative file names are resolved. check_images=False skips reading image headers where sizes are known.
    """
    root = Path(root)
    if not root.exists():
        raise missing_root_error(root)
    fmt = detect_format(root) if format in (None, "", "auto") else str(format).lower()
    if fmt not in FORMATS:
        raise UserError(f"unknown dataset format {format!r}", fix=f"use one of {', '.join(FORMATS)}")
    own_report = report is None
    if report is None:
        report = ProblemReport(strict=strict)
    elif strict:
        report.strict = True
    split = default_split(fmt, root) if split is None else split
    names = None if classes is None else class_list(classes)
    if fmt == "dior":
        ds = load_dior(root, split, names or synthetic_classes(root) or DIOR_CLASSES, report, check_images)
    elif fmt == "dota":
        ds = load_dota(root, split, names or DOTA_V1_0, report)
    else:
        json_path, found_dir = find_coco_files(root, split)
        image_dir = Path(image_dir) if image_dir is not None else found_dir
        name = f"{root.name}/{split}" if root.is_dir() else root.stem
        ds = load_coco(json_path, image_dir, names, report, check_images, name=name)
    if not ds.records:
        shown = split if split not in ROOT_SPLITS else "(root)"
        skipped = "; ".join(f"{k}: {n}" for k, n in sorted(report.counts.items()))
        raise UserError(
            f"split {shown!r} has no usable images" + (f" (all skipped — {skipped})" if skipped else ""),
            where=str(root),
            fix="run `python -m runtime.data stats` on it with --strict to see the first problem" if skipped
            else "check that the split's image list / annotation files are not empty",
        )
    if own_report and len(report):
        warnings.warn(DataProblemWarning(f"{ds.name}: skipped bad input — " + "; ".join(report.summary())),
                      stacklevel=2)
    return ds
