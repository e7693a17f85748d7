"""INT8 calibration data: images from the *training* split, preprocessed by runtime.preprocess.

The deployed model sees tensors made by runtime.preprocess (torch-free), so calibration uses exactly that code:
quantization ranges are measured on the distribution the engine will get. The test split is never used (the
accuracy gate evaluates on it). Images are read lazily, batch by batch, so a 500 x 1024 px set does not sit in
memory (deploy.ranges calibrates one batch at a time); the chosen list and the preprocessing go into a calibration
manifest inside the bundle. Images are drawn at the deployed input size (the target's), not the training size.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UserError
from runtime.manifest import file_sha256
from runtime.preprocess import PreprocessSpec, preprocess_batch, read_image
from runtime.records import DetectionSet, ImageRecord

INPUT_NAME = "images"
DEFAULT_IMAGES = 500  # what INT8 guides ask for; a split with fewer gives all it has unless a count is set


def preprocess_spec(input_size: int) -> PreprocessSpec:
    """The deployment pre-processing of a square S x S network: stretch resize, ImageNet mean/std, NCHW float32."""
    return PreprocessSpec(input_size=(input_size, input_size))


def load_split(pipe: Any, split: str) -> DetectionSet:
    """One split of the pipeline's dataset through runtime.data (the one loader every stage uses)."""
    from distill.data import ensure_dataset
    from runtime.data import load_dataset

    ds = pipe.dataset
    ensure_dataset(pipe.dataset_root, ds.synthetic)  # a synthetic set is generated on first use, like distill.run
    return load_dataset(ds.format, pipe.dataset_root, split, ds.classes)


def choose_records(records: list[ImageRecord], count: int, seed: int, where: str) -> list[ImageRecord]:
    """`count` records drawn without replacement with a seeded generator, in dataset order; too few is a UserError."""
    if not records:
        raise UserError("the calibration split has no images", where=where,
                        fix="point calibration.split at the training split of a dataset that has images")
    if len(records) < count:
        raise UserError(
            f"too few calibration images: found {len(records)}, {count} requested", where=where,
            fix=f"pass --calib-images {len(records)} (or fewer), set calibration.images, or add training images")
    picked = np.sort(np.random.default_rng(seed).choice(len(records), size=count, replace=False))
    return [records[i] for i in picked]


@dataclass
class CalibrationSet:
    """Chosen calibration images plus the preprocessing that turns them into network inputs."""

    records: list[ImageRecord]
    spec: PreprocessSpec
    split: str
    dataset_root: str
    method: str
    seed: int
    batch_size: int = 1
    per_node: bool = False  # modelopt: calibrate node by node (least memory)

    def __len__(self) -> int:
        return len(self.records)

    def num_batches(self, limit: int | None = None) -> int:
        """How many batches batches() yields."""
        count = min(limit, len(self.records)) if limit else len(self.records)
        return -(-count // self.batch_size)

    def batches(self, limit: int | None = None) -> Iterator[np.ndarray]:
        """Normalised (B, 3, S, S) float32 batches, read from disk on demand."""
        records = self.records[:limit] if limit else self.records
        for start in range(0, len(records), self.batch_size):
            images = [read_image(r.path) for r in records[start:start + self.batch_size]]
            yield preprocess_batch(images, self.spec)[0]

    def feeds_iter(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts {'images': batch}, one at a time (what calibration streams through)."""
        return ({INPUT_NAME: b} for b in self.batches(limit))

    def feeds(self, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        """Feed dicts {'images': batch} (Polygraphy data loader / Comparator input); materialised, so keep it small."""
        return list(self.feeds_iter(limit))

    def reader(self, limit: int | None = None) -> Any:
        """An onnxruntime CalibrationDataReader over the batches (ORT and modelopt, which also calls get_first)."""
        from onnxruntime.quantization import CalibrationDataReader

        calib = self

        class _Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = calib.batches(limit)

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch = next(self._it, None)
                return None if batch is None else {INPUT_NAME: batch}

            def rewind(self) -> None:
                self._it = calib.batches(limit)

            def get_first(self) -> dict[str, np.ndarray]:
                """The first batch without advancing (modelopt probes the graph with it)."""
                return {INPUT_NAME: next(calib.batches(limit=1))}

        return _Reader()

    def manifest(self) -> dict[str, Any]:
        """What was used, for the bundle: split, seed, method, preprocessing and every image with its sha256."""
        return {
            "split": self.split,
            "dataset_root": self.dataset_root,
            "method": self.method,
            "seed": self.seed,
            "count": len(self.records),
            "preprocess": self.spec.model_dump(mode="json"),
            "preprocess_code": "runtime.preprocess.preprocess_batch",
            "images": [{"path": str(r.path), "width": int(r.width), "height": int(r.height),
                        "sha256": file_sha256(Path(r.path))} for r in self.records],
        }


def calibration_set(pipe: Any, input_size: int, count: int | None = None) -> CalibrationSet:
    """The pipeline's calibration set: `count` training images at the deployed S x S.

    Without `count`, calibration.images when the pipeline sets it (too few images is then an error), else
    DEFAULT_IMAGES or the whole split when it has fewer.
    """
    cal = pipe.calibration
    explicit = count is not None or "images" in getattr(cal, "model_fields_set", {"images"})
    count = count if count is not None else cal.images
    if count < 1:
        raise UserError(f"--calib-images must be at least 1, got {count}", where="--calib-images")
    if cal.split == pipe.dataset.test_split:
        raise UserError(f"calibration split '{cal.split}' is the dataset's test split", where="calibration.split",
                        fix=f"use the training split '{pipe.dataset.train_split}'")
    split = load_split(pipe, cal.split)
    if not explicit and split.records:
        count = min(count, len(split.records))
    records = choose_records(split.records, count, cal.seed, where=f"{pipe.dataset_root} split '{cal.split}'")
    return CalibrationSet(records, preprocess_spec(input_size), cal.split, str(pipe.dataset_root), cal.method,
                          cal.seed, per_node=bool(getattr(cal, "per_node", False)))
