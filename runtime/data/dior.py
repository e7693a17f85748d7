"""DIOR as it ships: VOC-style XML per image, ImageSets/Main split lists, trainval / test image folders.

Layout (root = e.g. data/DIOR):
    JPEGImages-trainval/00001.jpg ...   JPEGImages-test/11726.jpg ...   (a single JPEGImages/ also works)
    Annotations/Horizontal Bounding Boxes/00001.xml   (or flat Annotations/00001.xml)
    ImageSets/Main/train.txt val.txt test.txt          ('trainval' = train + val unless trainval.txt exists)
Box coordinates are read as written (no VOC "-1" shift), as mmrotate's DIOR loader does.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from runtime.data.images import ImageError, probe_image_size
from runtime.data.objects import RawObjects, build_record
from runtime.data.problems import (
    DUPLICATE_IMAGE,
    MALFORMED_ANNOTATION,
    MISSING_ANNOTATION,
    MISSING_IMAGE,
    SIZE_MISMATCH,
    ProblemReport,
)
from runtime.errors import UserError
from runtime.records import DetectionSet, ImageRecord

HBB_DIR = Path("Annotations") / "Horizontal Bounding Boxes"


def annotation_dir(root: Path) -> Path:
    """The folder holding the horizontal-box XML files (DIOR's nested one, else flat Annotations/)."""
    nested = root / HBB_DIR
    return nested if nested.is_dir() else root / "Annotations"


def image_dirs(root: Path, split: str) -> list[Path]:
    """Image folders to search, the one matching the split first."""
    names = ["JPEGImages-trainval", "JPEGImages-test"]
    if split == "test":
        names.reverse()
    return [root / n for n in [*names, "JPEGImages"] if (root / n).is_dir()]


def split_ids(root: Path, split: str) -> tuple[list[str], list[Path]]:
    """Image ids listed for a split (trainval = train + val), in file order, and the list files read."""
    main = root / "ImageSets" / "Main"
    if (main / f"{split}.txt").is_file():
        files = [main / f"{split}.txt"]
    elif split == "trainval" and (main / "train.txt").is_file() and (main / "val.txt").is_file():
        files = [main / "train.txt", main / "val.txt"]
    else:
        have = sorted(p.stem for p in main.glob("*.txt")) if main.is_dir() else []
        if {"train", "val"} <= set(have) and "trainval" not in have:
            have = sorted([*have, "trainval"])
        raise UserError(
            f"no image list for split {split!r}",
            where=str(main / f"{split}.txt"),
            fix=f"use one of the splits found there ({', '.join(have) or 'none'})" if have
            else "DIOR ships ImageSets/Main/{train,val,test}.txt next to Annotations/",
        )
    ids: list[str] = []
    for f in files:
        ids.extend(line.strip().split()[0] for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    return ids, files


def load_dior(
    root: Path, split: str, classes: Sequence[str], report: ProblemReport, check_images: bool = True
) -> DetectionSet:
    """Read one split of a DIOR-layout dataset; bad records and objects go to `report`."""
    ids, list_files = split_ids(root, split)
    ann_dir = annotation_dir(root)
    dirs = image_dirs(root, split)
    records: list[ImageRecord] = []
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            report.add(DUPLICATE_IMAGE, f"image id {image_id} listed twice", ", ".join(map(str, list_files)))
            continue
        seen.add(image_id)
        record = _read_one(image_id, ann_dir, dirs, root, classes, report, check_images)
        if record is not None:
            records.append(record)
    return DetectionSet(name=f"{root.name}/{split}", classes=tuple(classes), records=records)


def _read_one(
    image_id: str, ann_dir: Path, dirs: list[Path], root: Path, classes: Sequence[str], report: ProblemReport,
    check_images: bool,
) -> ImageRecord | None:
    xml_path = ann_dir / f"{image_id}.xml"
    if not xml_path.is_file():
        report.add(MISSING_ANNOTATION, "annotation file not found", str(xml_path))
        return None
    parsed = parse_dior_xml(xml_path, report)
    if parsed is None:
        return None
    filename, size, raw = parsed
    names = [f"{image_id}.jpg"] + ([filename] if filename and filename != f"{image_id}.jpg" else [])
    image_path = next((d / n for d in dirs for n in names if (d / n).is_file()), None)
    if image_path is None:
        expected = (dirs[0] if dirs else root / "JPEGImages-trainval") / names[0]
        report.add(MISSING_IMAGE, f"image for {xml_path.name} not found", str(expected))
        return None
    width, height = size if size else (0, 0)
    if check_images or not size:
        try:
            real = probe_image_size(image_path)
        except ImageError as exc:
            report.add(exc.kind, exc.what, str(image_path))
            return None
        if size and real != size:
            report.add(SIZE_MISMATCH, f"XML says {size[0]}x{size[1]}, the image is {real[0]}x{real[1]}", str(xml_path))
        width, height = real
    return build_record(image_path, width, height, raw, classes, report)


def parse_dior_xml(path: Path, report: ProblemReport) -> tuple[str | None, tuple[int, int] | None, RawObjects] | None:
    """Parse one VOC-style XML: (filename, (width, height) or None, objects); None if the file is unusable."""
    text = path.read_bytes()
    try:
        tree = ET.fromstring(text)
    except ET.ParseError as exc:
        line = exc.position[0] if exc.position else 0
        report.add(MALFORMED_ANNOTATION, f"XML does not parse ({exc})",
                   f"{path}:{line}")
        return None
    # ElementTree keeps no line numbers; the n-th <object> tag in the text is the n-th object element.
    decoded = text.decode("utf-8", errors="replace")
    obj_lines = [decoded.count("\n", 0, m.start()) + 1 for m in re.finditer(r"<object\b", decoded)]
    size = None
    size_el = tree.find("size")
    if size_el is not None:
        try:
            size = (int(float(size_el.findtext("width", ""))), int(float(size_el.findtext("height", ""))))
        except ValueError:
            size = None
        if size is not None and (size[0] <= 0 or size[1] <= 0):
            size = None
    raw = RawObjects()
    for n, obj in enumerate(tree.iter("object")):
        where = f"{path}:{obj_lines[n] if n < len(obj_lines) else 0}"
        name = (obj.findtext("name") or "").strip()
        bnd = obj.find("bndbox")
        try:
            if not name or bnd is None:
                raise ValueError("needs <name> and <bndbox>")
            box = [float(bnd.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax")]
            difficult = int(float(obj.findtext("difficult") or 0)) != 0
        except ValueError as exc:
            msg = str(exc) if "needs" in str(exc) else "<bndbox> needs numeric xmin, ymin, xmax, ymax"
            report.add(MALFORMED_ANNOTATION, f"object {n + 1}: {msg}", where)
            continue
        raw.add(box, name, difficult, where)
    return tree.findtext("filename"), size, raw


def dior_xml_bytes(
    filename: str, width: int, height: int, objects: Sequence[tuple[str, Sequence[float], bool]]
) -> bytes:
    """Bytes of a DIOR-style XML annotation for (class name, xyxy box, difficult) objects."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = filename
    src = ET.SubElement(ann, "source")
    ET.SubElement(src, "database").text = "DIOR"
    size = ET.SubElement(ann, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    for name, box, difficult in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "1" if difficult else "0"
        bnd = ET.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bnd, key).text = f"{value:g}"
    ET.indent(ann, space="\t")
    return ET.tostring(ann, encoding="utf-8") + b"\n"
