"""COCO detection json: read into a DetectionSet, and build / write one from a DetectionSet.

The DS2D2 reference trains from `trainval.json` + `JPEGImages-trainval/` (and `test.json` + `JPEGImages-test/`).
Ids written by `to_coco_dict` are stable, because the metrics compare against them: image ids are 1..N in record
order, category_id = label + 1, bbox is xywh, area = w * h, iscrowd = 0, and difficult objects carry
"ignore": 1 and "difficult": 1 (COCO evaluation then neither rewards nor penalises detections on them).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.boxes import xyxy_to_xywh
from runtime.data.images import ImageError, probe_image_size, write_bytes_atomic
from runtime.data.objects import RawObjects, build_record
from runtime.data.problems import (
    DUPLICATE_IMAGE,
    MALFORMED_ANNOTATION,
    MISSING_IMAGE,
    SIZE_MISMATCH,
    UNKNOWN_CLASS,
    ProblemReport,
)
from runtime.errors import UserError
from runtime.records import DetectionSet, ImageRecord


def to_coco_dict(dataset: DetectionSet, image_root: Path | None = None) -> dict[str, Any]:
    """COCO ground-truth dict of a DetectionSet; file_name is relative to `image_root` when the image lies under it."""
    images, annotations = [], []
    for image_id, rec in enumerate(dataset.records, start=1):
        images.append({"id": image_id, "file_name": _file_name(rec.path, image_root),
                       "width": int(rec.width), "height": int(rec.height)})
        xywh = xyxy_to_xywh(rec.boxes)
        for box, label, diff in zip(xywh, rec.labels, rec.difficult):
            x, y, w, h = (float(v) for v in box)
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                   "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            if diff:
                ann.update(ignore=1, difficult=1)
            annotations.append(ann)
    categories = [{"id": i + 1, "name": name, "supercategory": "none"} for i, name in enumerate(dataset.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(dataset: DetectionSet, json_path: Path, image_root: Path | None = None) -> Path:
    """Write the COCO json of a DetectionSet atomically; file names are relative to `image_root` (default: json dir)."""
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    data = json.dumps(to_coco_dict(dataset, root), indent=None, separators=(",", ":"))
    write_bytes_atomic(json_path, data.encode("utf-8"))
    return json_path


def _file_name(path: Path, image_root: Path | None) -> str:
    if image_root is None:
        return str(path)
    full, root = Path(path).resolve(), Path(image_root).resolve()
    return full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)


def find_coco_files(root: Path, split: str) -> tuple[Path, Path]:
    """(json, image dir) for a split: root/<split>.json + root/JPEGImages-<split>/, or COCO's own layout."""
    if root.is_file():
        json_path = root
        stem = root.stem.removeprefix("instances_")
        base = root.parent.parent if root.parent.name == "annotations" else root.parent
    else:
        candidates = [root / f"{split}.json", root / "annotations" / f"instances_{split}.json",
                      root / "annotations" / f"{split}.json"]
        json_path = next((c for c in candidates if c.is_file()), None)  # type: ignore[assignment]
        if json_path is None:
            have = sorted(p.name for p in root.glob("*.json"))
            raise UserError(f"no COCO json for split {split!r}", where=str(candidates[0]),
                            fix=f"use one of: {', '.join(have)}" if have else "pass the json file itself as the path")
        stem, base = split, root
    for d in (base / f"JPEGImages-{stem}", base / stem, base / "JPEGImages", base / "images"):
        if d.is_dir():
            return json_path, d
    return json_path, json_path.parent


def load_coco(
    json_path: Path, image_dir: Path, classes: Sequence[str] | None, report: ProblemReport,
    check_images: bool = True, name: str | None = None,
) -> DetectionSet:
    """Read a COCO detection json; classes=None takes the json's categories in id order."""
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"COCO json does not parse ({exc.msg})", where=f"{json_path}:{exc.lineno}",
                        fix="fix or regenerate the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError("not a COCO detection json (no 'images' list)", where=str(json_path))
    cats = {}
    for c in data.get("categories", []):
        if isinstance(c, dict) and "id" in c and "name" in c:
            cats[c["id"]] = str(c["name"])
    if classes is None:
        classes = tuple(cats[k] for k in sorted(cats))
    per_image: dict[Any, RawObjects] = {}
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"{json_path}: annotations[{i}]"
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            image_id, cat = ann["image_id"], ann["category_id"]
            hash((image_id, cat))  # a list or dict id would break the lookups below
        except (KeyError, TypeError, ValueError):
            report.add(MALFORMED_ANNOTATION, "needs image_id, category_id and a 4-number bbox", where)
            continue
        if cat not in cats:
            report.add(UNKNOWN_CLASS, f"category_id {cat} is not among the json's categories", where)
            continue
        difficult = bool(ann.get("iscrowd", 0) or ann.get("ignore", 0) or ann.get("difficult", 0))
        per_image.setdefault(image_id, RawObjects()).add((x, y, x + w, y + h), cats[cat], difficult, where)
    records: list[ImageRecord] = []
    seen: set[Any] = set()
    for i, img in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        try:
            image_id, file_name = img["id"], str(img["file_name"])
            hash(image_id)
            size = (int(img.get("width", 0)), int(img.get("height", 0)))
        except (KeyError, TypeError, ValueError):
            report.add(MALFORMED_ANNOTATION, "needs id, file_name, width and height", where)
            continue
        if image_id in seen:
            report.add(DUPLICATE_IMAGE, f"image id {image_id} appears twice", where)
            continue
        seen.add(image_id)
        path = Path(file_name) if Path(file_name).is_absolute() else Path(image_dir) / file_name
        if not path.is_file():
            report.add(MISSING_IMAGE, f"image {file_name} not found", str(path))
            continue
        if check_images or min(size) <= 0:
            try:
                real = probe_image_size(path)
            except ImageError as exc:
                report.add(exc.kind, exc.what, str(path))
                continue
            if min(size) > 0 and real != size:
                report.add(SIZE_MISMATCH, f"json says {size[0]}x{size[1]}, the image is {real[0]}x{real[1]}", where)
            size = real
        raw = per_image.pop(image_id, RawObjects())
        records.append(build_record(path, size[0], size[1], raw, classes, report))
    listed = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    for image_id, raw in per_image.items():
        for where in raw.wheres if image_id not in listed else []:
            report.add(MALFORMED_ANNOTATION, f"image_id {image_id} refers to no entry of 'images'", where)
    return DetectionSet(name=name or Path(json_path).stem, classes=tuple(classes), records=records)

