"""A training workload for torch-side benchmarks: teacher, amplifier and student from a pipeline, one fixed batch.

Weights are random (costs do not depend on them) and backbones are never downloaded. `TINY_OVERRIDES` shrinks any
pipeline to a 64 px, two-image configuration that runs in seconds on a CPU (tests and smoke runs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.models.build import build_detector
from distill.tasks import DetectorTask, build_amplifier, build_task
from runtime.config import Pipeline
from runtime.data.classes import class_list

# Relative --set overrides: never download ImageNet weights for timing.
NO_DOWNLOAD = ["teacher.pretrained_backbone=false", "student.pretrained_backbone=false"]
TINY_OVERRIDES = NO_DOWNLOAD + [
    "input_size=64", "schedule.student.batch_size=2",
    "teacher.backbone=resnet18", "teacher.fpn_width=32", "teacher.head_convs=1",
    "student.backbone=resnet18", "student.fpn_width=16", "student.head_convs=1",
]


@dataclass
class Workload:
    """Models of one pipeline (random weights) on `device`, and one batch of images in [0,1] with targets."""

    pipeline: Pipeline
    teacher: nn.Module
    amplifier: nn.Module
    student: nn.Module
    images: Tensor
    targets: list[dict[str, Tensor]]
    device: str

    @property
    def input_size(self) -> int:
        """Square input side in pixels."""
        return int(self.images.shape[-1])


def random_batch(batch: int, size: int, num_classes: int, boxes_per_image: int, seed: int = 0,
                 device: str = "cpu") -> tuple[Tensor, list[dict[str, Tensor]]]:
    """`batch` random images (B,3,S,S) in [0,1] and random xyxy boxes (sides 4..S/2 px) with labels in [0,C)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=gen)
    targets = []
    for _ in range(batch):
        wh = 4 + torch.rand(boxes_per_image, 2, generator=gen) * (size / 2 - 4)
        xy = torch.rand(boxes_per_image, 2, generator=gen) * (size - wh)
        labels = torch.randint(0, num_classes, (boxes_per_image,), generator=gen)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": labels.to(device)})
    return images.to(device), targets


def build_workload(pipe: Pipeline, device: str = "cpu", batch_size: int | None = None, boxes_per_image: int = 8,
                   seed: int = 0) -> Workload:
    """Teacher, amplifier (stage-2 detector) and student of `pipe` with random weights, and one random batch."""
    torch.manual_seed(seed)
    num_classes = len(class_list(pipe.dataset.classes))
    size = pipe.input_size
    thresholds = dict(score_thresh=pipe.test.score_thresh, nms_thresh=pipe.test.nms_iou,
                      detections_per_img=pipe.test.max_detections, topk_candidates=pipe.test.topk_candidates)
    teacher = build_detector(pipe.teacher, num_classes, size, **thresholds).to(device)
    student = build_detector(pipe.student, num_classes, size, **thresholds).to(device)
    amplifier = build_amplifier(teacher).to(device)
    images, targets = random_batch(batch_size or pipe.schedule.student.batch_size, size, num_classes,
                                   boxes_per_image, seed, device)
    return Workload(pipe, teacher, amplifier, student, images, targets, device)


def student_task(work: Workload, method: str) -> DetectorTask:
    """The stage-3 task of `method` ('none' = plain detection training) with the pipeline's loss weights."""
    task = build_task("student", model=work.student, teacher=work.teacher, amplifier=work.amplifier, method=method,
                      weights=work.pipeline.distill.weights, adapter=work.pipeline.distill.adapter)
    return task.to(work.device).train()


def optimizer_for(task: DetectorTask, pipe: Pipeline) -> torch.optim.Optimizer:
    """The student stage's optimiser type (SGD or AdamW) over the task's trainable parameters."""
    sched = pipe.schedule.student
    params = task.trainable_parameters()
    if sched.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=sched.lr, weight_decay=sched.weight_decay)
    return torch.optim.SGD(params, lr=sched.lr, momentum=sched.momentum, weight_decay=sched.weight_decay)
