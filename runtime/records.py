"""The one record type every data format yields, and the dataset that holds them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image: boxes are float32 (N, 4) xyxy in pixels, labels int64 indices into the class list."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))

    @property
    def image_id(self) -> str:
        """The file stem, as DIOR / DOTA name their images."""
        return self.path.stem

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DetectionSet:
    """A split of a dataset: class names (index = label) and its records."""

    name: str
    classes: tuple[str, ...]
    records: list[ImageRecord]

    def __len__(self) -> int:
        return len(self.records)
