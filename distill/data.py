"""Training and evaluation data: a torch Dataset over a DetectionSet, batches, and reproducible epoch orders.

Images go through runtime.preprocess exactly as at deployment (uint8 RGB, stretched to S x S with INTER_LINEAR),
then become float32 [0, 1] CHW; the detector's own transform normalises them. Randomness is a pure function of
(seed, epoch, index) — the epoch's sample order and each image's flips — so a run resumed mid-epoch sees the same
batches as an uninterrupted one, whatever the number of loader workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from distill.distributed import DistInfo
from runtime.preprocess import PreprocessSpec, Transform, read_image, resize_image, to_training_array
from runtime.records import DetectionSet


@dataclass
class Sample:
    """One image ready for the detector, with what is needed to map its detections back and to name it."""

    image: Tensor  # (3, S, S) float32 in [0, 1]
    target: dict[str, Tensor]  # boxes (N, 4) float32 xyxy in input pixels, labels (N,) int64
    path: Path
    transform: Transform
    index: int


@dataclass
class Batch:
    """A collated batch: stacked images plus per-image targets, paths, resize transforms and dataset indices."""

    images: Tensor  # (B, 3, S, S)
    targets: list[dict[str, Tensor]]
    paths: list[Path]
    transforms: list[Transform]
    indices: list[int]

    def to(self, device: torch.device) -> Batch:
        """The batch with images and targets on ``device``."""
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in self.targets]
        return Batch(self.images.to(device, non_blocking=True), targets, self.paths, self.transforms, self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DetectionDataset(Dataset):
    """Images of a DetectionSet stretched to ``input_size``, boxes scaled alike, optional random h/v flips.

    Difficult objects are left out of training targets (the reference ignores them); evaluation uses the COCO dict
    of the split, where they are ignore regions.
    """

    def __init__(self, records: DetectionSet, input_size: int, augment_flip: bool = False, seed: int = 0):
        self.set = records
        self.spec = PreprocessSpec(input_size=(input_size, input_size), resize="stretch")
        self.augment_flip, self.seed, self.epoch = augment_flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips __getitem__ draws (call before creating the epoch's loader iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.set.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.set.records[index]
        resized, transform = resize_image(read_image(record.path), self.spec)
        keep = ~np.asarray(record.difficult, bool) if len(record.difficult) else np.ones(len(record), bool)
        boxes = transform.boxes_to_input(record.boxes[keep])
        labels = np.asarray(record.labels, np.int64)[keep]
        if self.augment_flip:
            resized, boxes = self._flip(resized, boxes, index)
        target = {"boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)).reshape(-1, 4),
                  "labels": torch.from_numpy(labels.copy())}
        return Sample(torch.from_numpy(to_training_array(resized)), target, record.path, transform, index)

    def _flip(self, image: np.ndarray, boxes: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        # Seeded by (seed, epoch, index): the same image gets the same flips in a resumed run.
        horizontal, vertical = np.random.default_rng((self.seed, self.epoch, index)).random(2) < 0.5
        height, width = image.shape[:2]
        boxes = boxes.copy()
        if horizontal:
            image = image[:, ::-1]
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        if vertical:
            image = image[::-1]
            boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
        return np.ascontiguousarray(image), boxes


def collate(samples: list[Sample]) -> Batch:
    """Stack same-size images into one tensor; keep targets and metadata as per-image lists."""
    return Batch(torch.stack([s.image for s in samples]), [s.target for s in samples], [s.path for s in samples],
                 [s.transform for s in samples], [s.index for s in samples])


def epoch_batches(num_samples: int, batch_size: int, epoch: int, seed: int, info: DistInfo = DistInfo(),
                  shuffle: bool = True) -> list[list[int]]:
    """This rank's batches of one training epoch, in order: DistributedSampler (permutation seeded by seed + epoch,
    padded so every rank runs the same number of steps) + BatchSampler dropping an incomplete last batch unless it
    would be the only one."""
    sampler = DistributedSampler(range(num_samples), num_replicas=info.world_size, rank=info.rank, shuffle=shuffle,
                                 seed=seed)
    sampler.set_epoch(epoch)
    return list(BatchSampler(sampler, batch_size, drop_last=len(sampler) >= batch_size))


def iterations_per_epoch(num_samples: int, batch_size: int, info: DistInfo = DistInfo()) -> int:
    """How many optimiser steps one epoch has on each rank."""
    return len(epoch_batches(num_samples, batch_size, 0, 0, info, shuffle=False))


def make_loader(dataset: DetectionDataset, batches: list[list[int]], workers: int) -> DataLoader:
    """A DataLoader over explicit batches; its own generator keeps the global RNG (used by the model) untouched."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator(), persistent_workers=False, pin_memory=False)


def eval_batches(num_samples: int, batch_size: int, info: DistInfo = DistInfo()) -> list[list[int]]:
    """This rank's share of an evaluation pass: every image exactly once over all ranks (no padding duplicates)."""
    mine = list(range(num_samples))[info.rank::info.world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def ensure_dataset(root: Path, synthetic: dict | None) -> bool:
    """Generate the synthetic dataset at ``root`` when the config has ``synthetic:`` (True if files were written).

    runtime.data.synthetic.generate writes atomically, does nothing when ``root`` already holds the same set and
    refuses (UserError) when it holds a set made with other parameters, so a stale set is never trained on.
    """
    if synthetic is None:
        return False
    from runtime.data.synthetic import SyntheticParams, generate

    # pipelines.yaml is the source of truth: a set generated with other parameters is regenerated (atomically)
    return generate(SyntheticParams(**synthetic), Path(root), overwrite=True).written
