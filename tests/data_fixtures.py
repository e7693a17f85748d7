"""Builders for tiny on-disk datasets (DIOR, DOTA) used by the data-layer tests."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from runtime.data.dior import HBB_DIR, dior_xml_bytes

DOTA_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "dota_samples"
if not DOTA_SAMPLES.is_dir():  # the checkout may live elsewhere; the samples sit at a fixed place on this machine
    DOTA_SAMPLES = Path("/work/shared/data/dota_samples")


def write_image(path: Path, width: int = 64, height: int = 48, value: int = 128) -> Path:
    """A small solid-grey image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((height, width, 3), value, np.uint8)
    img[::7] = 30  # some structure, so encoders do not special-case it
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def make_dior(
    root: Path,
    images: dict[str, Sequence[tuple[str, Sequence[float]]]],
    splits: dict[str, Sequence[str]],
    size: tuple[int, int] = (64, 48),
    nested: bool = True,
) -> Path:
    """A DIOR-layout dataset: {id: [(class, xyxy), ...]}, {split: [ids]}; test ids go to JPEGImages-test."""
    test_ids = set(splits.get("test", ()))
    ann_dir = root / (HBB_DIR if nested else Path("Annotations"))
    ann_dir.mkdir(parents=True, exist_ok=True)
    for image_id, objects in images.items():
        folder = "JPEGImages-test" if image_id in test_ids else "JPEGImages-trainval"
        write_image(root / folder / f"{image_id}.jpg", *size)
        xml = dior_xml_bytes(f"{image_id}.jpg", size[0], size[1], [(n, b, False) for n, b in objects])
        (ann_dir / f"{image_id}.xml").write_bytes(xml)
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def make_dota(root: Path, labels: dict[str, str], size: tuple[int, int] = (100, 80), crlf: bool = True) -> Path:
    """A DOTA-layout dataset: {stem: labelTxt text with \\n line ends}; CRLF line endings by default."""
    for stem, text in labels.items():
        write_image(root / "images" / f"{stem}.png", *size)
        (root / "labelTxt").mkdir(parents=True, exist_ok=True)
        data = text.replace("\n", "\r\n") if crlf else text
        (root / "labelTxt" / f"{stem}.txt").write_bytes(data.encode())
    return root


def simple_dior(root: Path) -> Path:
    """Three images (two trainval, one test) with a few valid objects."""
    return make_dior(
        root,
        {
            "00001": [("vehicle", (2, 3, 12, 9)), ("airplane", (20, 10, 50, 40))],
            "00002": [("Expressway-Service-area", (5, 5, 30, 30))],
            "00003": [("storagetank", (10, 10, 20, 20)), ("vehicle", (30, 30, 40, 36))],
        },
        {"train": ["00001"], "val": ["00002"], "test": ["00003"]},
    )
