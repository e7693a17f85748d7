"""The three DS2D2 stages (teacher -> amplifier -> student) for one pipeline, with reuse of finished stages.

Each stage writes into ``<work_dir>/<pipeline>/{teacher,amplifier,student-<method>[-seed<N>]}/``. A stage is skipped
when its ``model.pt`` is finished and carries the hash of everything that affects that stage: the relevant config
sections, the version of the stage's recipe, plus the sha256 of the upstream checkpoints it was trained from (so a
retrained teacher retrains what depends on it). Nothing here depends on the detector architecture: models come from
build_detector, tasks from build_task.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distill.checkpoint import file_sha256, load_checkpoint, load_detector, thresholds_from_config
from distill.data import DetectionDataset, ensure_dataset
from distill.distributed import DistInfo, barrier
from distill.trainer import StageTrainer, seed_everything
from runtime.config import DISTILL_METHODS, Pipeline
from runtime.errors import UserError
from runtime.records import DetectionSet

STAGES = ("teacher", "amplifier", "student")
METHODS = DISTILL_METHODS  # ds2d2, none, fitnet, pkd, fgd
# Bumped when what a stage computes changes for the same config, so finished stages of the old recipe are retrained.
# 2: model.pt selected on the val split or the final epoch, never on test; the Faster R-CNN amplifier trains RPN +
# RoI head on hf(F); DISW over the inclusive cell range; the Faster R-CNN KL term summed over the sampled RoIs.
RECIPE = {"teacher": 2, "amplifier": 2, "student": 2}
# The part of the distill section each student method depends on.
METHOD_CONFIG = {"ds2d2": ("weights", "explicit_norm", "adapter", "temperature"),
                 "fitnet": ("fitnet", "explicit_norm", "adapter"), "pkd": ("pkd", "adapter"), "fgd": ("fgd", "adapter"),
                 "none": ()}


def stage_dir(pipe: Pipeline, stage: str, method: str | None = None, work_dir: Path | str | None = None,
              seed: int | None = None) -> Path:
    """``<work_dir>/<pipeline>/teacher``, ``.../amplifier``, ``.../student-<method>``, or
    ``.../student-<method>-seed<N>`` for one of several student seeds (the one place for this layout)."""
    base = (Path(work_dir) / pipe.name) if work_dir else pipe.work_dir
    if stage != "student":
        return base / stage
    return base / (f"student-{method}" + (f"-seed{seed}" if seed is not None else ""))


def stage_config(config: dict[str, Any], stage: str, method: str, upstream: dict[str, str]) -> dict[str, Any]:
    """The parts of the resolved pipeline (``Pipeline.as_dict()``) that affect ``stage``, plus upstream sha256s."""
    part = {key: config[key] for key in ("dataset", "input_size", "test")} | {"stage": stage}
    part["schedule"] = config["schedule"][stage]
    part["recipe"] = RECIPE[stage]
    if stage == "teacher":
        return part | {"model": config["teacher"]}
    if stage == "amplifier":
        return part | {"amplifier": config["amplifier"], "teacher": upstream["teacher"]}
    part |= {"model": config["student"], "method": method, **upstream}
    if method != "none":
        part["distill"] = {k: config["distill"][k] for k in METHOD_CONFIG[method]}
    return part


def config_hash(data: dict[str, Any]) -> str:
    """Stable short hash (sha256 of canonical JSON, 16 hex digits) of a stage's config."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def finished_hash(path: Path) -> str | None:
    """The config hash of a finished model checkpoint, or None if it is missing, unfinished or unreadable."""
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path, mmap=True)  # mmap: the weights are not read
    except UserError:
        return None
    return ckpt.get("config_hash") if ckpt.get("finished") else None


def plan(stage: str, method: str, teacher_path: Path | None) -> list[str]:
    """Stages to run for ``--stage`` (all: teacher unless given, amplifier only for ds2d2, then student)."""
    if stage == "all":
        steps = ([] if teacher_path else ["teacher"]) + (["amplifier"] if method == "ds2d2" else []) + ["student"]
        return steps
    if stage == "teacher" and teacher_path:
        raise UserError("--teacher replaces the teacher stage", where="--stage teacher", fix="drop one of them")
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}", where="--stage", fix=f"use one of {', '.join(STAGES)}, all")
    return [stage]


@dataclass
class StageOutcome:
    """One stage of this invocation: trained or skipped, and where its model.pt is."""

    stage: str
    method: str | None
    directory: Path
    status: str  # 'trained' | 'skipped'


class PipelineRunner:
    """Runs the stages of one pipeline on one device (one rank of a torchrun job)."""

    def __init__(self, pipe: Pipeline, device: torch.device, info: DistInfo = DistInfo(), resume: bool = False,
                 teacher_path: Path | None = None, console: Console | None = None, per_seed_students: bool = False):
        """`per_seed_students`: students go to ``student-<method>-seed<N>`` (N = schedule.student.seed), so runs of
        several seeds sit side by side (benchmarks.kd_compare); teacher and amplifier are shared."""
        self.pipe, self.device, self.info, self.resume = pipe, device, info, resume
        self.per_seed_students = per_seed_students
        self.teacher_path = Path(teacher_path) if teacher_path else None
        self.config = pipe.as_dict()
        self.console = console or Console(stderr=True, quiet=not info.is_main)
        self._splits: dict[str, DetectionSet] = {}

    # -- data -------------------------------------------------------------------------------------------------
    def split(self, name: str) -> DetectionSet:
        """A split of the pipeline's dataset (generated first when synthetic and missing), read once."""
        if name not in self._splits:
            from runtime.data import load_dataset

            cfg, root = self.pipe.dataset, self.pipe.dataset_root
            if self.info.is_main:
                ensure_dataset(root, cfg.synthetic)
            barrier(self.info)
            self._splits[name] = load_dataset(cfg.format, root, name, classes=cfg.classes)
        return self._splits[name]

    def datasets(self, stage: str) -> tuple[DetectionDataset, DetectionDataset | None, DetectionDataset]:
        """(train with flips, the val split that selects model.pt or None, the test split that scores it).

        Without a val split the final epoch is the model (the reference's protocol); the test split never selects.
        """
        cfg, size, sched = self.pipe.dataset, self.pipe.input_size, self.pipe.schedule
        seed = getattr(sched, stage).seed
        train = DetectionDataset(self.split(cfg.train_split), size, getattr(sched, stage).augment_flip, seed)
        select = DetectionDataset(self.split(cfg.val_split), size) if cfg.val_split else None
        return train, select, DetectionDataset(self.split(cfg.test_split), size)

    # -- paths and hashes -------------------------------------------------------------------------------------
    def teacher_checkpoint(self) -> Path:
        """The teacher model.pt the later stages use (--teacher, or this pipeline's teacher stage)."""
        return self.teacher_path or stage_dir(self.pipe, "teacher") / "model.pt"

    def upstream(self, stage: str, method: str) -> dict[str, str]:
        """sha256 of the checkpoints ``stage`` is trained from (missing ones raise UserError naming their command)."""
        needs = {"teacher": [], "amplifier": ["teacher"],
                 "student": {"none": [], "ds2d2": ["teacher", "amplifier"]}.get(method, ["teacher"])}[stage]
        paths = {"teacher": self.teacher_checkpoint(), "amplifier": stage_dir(self.pipe, "amplifier") / "model.pt"}
        out = {}
        for name in needs:
            ckpt = load_checkpoint(paths[name], pipeline=self.pipe.name, mmap=True)  # clear error when missing
            if not ckpt.get("finished"):
                raise UserError(f"the {name} checkpoint is unfinished", where=str(paths[name]),
                                fix=f"finish it: python -m distill.run {self.pipe.name} --stage {name} --resume")
            out[name] = file_sha256(paths[name])
        return out

    def meta(self, stage: str, method: str | None, spec: dict, num_classes: int, classes: list[str],
             upstream: dict[str, str], chash: str) -> dict[str, Any]:
        """The checkpoint metadata of a stage (everything but weights and metrics)."""
        return {"role": stage, "method": method, "model_spec": spec, "num_classes": num_classes,
                "classes": list(classes), "input_size": self.pipe.input_size, "config": self.config,
                "config_hash": chash, "inputs": upstream}

    # -- stages -----------------------------------------------------------------------------------------------
    def run(self, stages: list[str], method: str) -> list[StageOutcome]:
        """Run (or skip) each stage in order."""
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}", where="--method", fix=f"use one of {', '.join(METHODS)}")
        return [self.run_stage(stage, method) for stage in stages]

    def student_dir(self, method: str) -> Path:
        """Where this runner's student of ``method`` goes."""
        seed = self.pipe.schedule.student.seed if self.per_seed_students else None
        return stage_dir(self.pipe, "student", method, seed=seed)

    def run_stage(self, stage: str, method: str) -> StageOutcome:
        """Train one stage unless its finished model.pt has the same config hash."""
        directory = self.student_dir(method) if stage == "student" else stage_dir(self.pipe, stage)
        upstream = self.upstream(stage, method)
        chash = config_hash(stage_config(self.config, stage, method, upstream))
        label = f"student ({method})" if stage == "student" else stage
        if finished_hash(directory / "model.pt") == chash:
            self.console.print(f"[green]{label}[/]: up to date ({directory / 'model.pt'}), skipped")
            return StageOutcome(stage, method if stage == "student" else None, directory, "skipped")
        self.console.print(f"[bold]{label}[/]: training -> {directory}")
        getattr(self, f"_train_{stage}")(directory, method, upstream, chash)
        barrier(self.info)
        return StageOutcome(stage, method if stage == "student" else None, directory, "trained")

    def _classes(self) -> list[str]:
        return list(self.split(self.pipe.dataset.train_split).classes)

    def _load_teacher(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        teacher, meta = load_detector(self.teacher_checkpoint(), map_location=self.device)
        if list(meta.get("classes") or []) != self._classes():
            raise UserError(f"the teacher was trained on classes {meta.get('classes')}, this dataset has "
                            f"{self._classes()}", where=str(self.teacher_checkpoint()),
                            fix="use a teacher of the same dataset and class list")
        return teacher, meta

    def _fit(self, task, stage: str, directory: Path, meta: dict[str, Any]) -> None:
        train, select, test = self.datasets(stage)
        trainer = StageTrainer(task, getattr(self.pipe.schedule, stage), directory, meta, self.device, self.info,
                               self.pipe.input_size)
        trainer.fit(train, select, test, resume=self.resume)

    def _train_teacher(self, directory: Path, method: str, upstream: dict, chash: str) -> None:
        from distill.models import build_detector
        from distill.tasks import build_task

        classes = self._classes()
        seed_everything(self.pipe.schedule.teacher.seed)
        model = build_detector(self.pipe.teacher, len(classes), self.pipe.input_size,
                               **thresholds_from_config(self.config))
        meta = self.meta("teacher", None, self.pipe.teacher.model_dump(mode="json"), len(classes), classes, upstream,
                         chash)
        self._fit(build_task("teacher", model=model), "teacher", directory, meta)

    def _train_amplifier(self, directory: Path, method: str, upstream: dict, chash: str) -> None:
        from distill.tasks import build_task

        teacher, tmeta = self._load_teacher()
        seed_everything(self.pipe.schedule.amplifier.seed)
        task = build_task("amplifier", teacher=teacher)
        meta = self.meta("amplifier", None, tmeta["model_spec"], tmeta["num_classes"], tmeta["classes"], upstream,
                         chash)
        self._fit(task, "amplifier", directory, meta)

    def _train_student(self, directory: Path, method: str, upstream: dict, chash: str) -> None:
        from distill.models import build_detector
        from distill.tasks import build_task

        classes = self._classes()
        teacher = amplifier = None
        if method != "none":
            teacher, _ = self._load_teacher()
        if method == "ds2d2":
            amp_path = stage_dir(self.pipe, "amplifier") / "model.pt"
            amplifier, ameta = load_detector(amp_path, map_location=self.device)
            if ameta.get("inputs", {}).get("teacher") != upstream["teacher"]:
                raise UserError("the amplifier was trained from a different teacher", where=str(amp_path),
                                fix=f"retrain it: python -m distill.run {self.pipe.name} --stage amplifier")
        seed_everything(self.pipe.schedule.student.seed)
        student = build_detector(self.pipe.student, len(classes), self.pipe.input_size,
                                 **thresholds_from_config(self.config))
        task = build_task("student", model=student, teacher=teacher, amplifier=amplifier, method=method,
                          distill=self.pipe.distill)
        meta = self.meta("student", method, self.pipe.student.model_dump(mode="json"), len(classes), classes,
                         upstream, chash)
        self._fit(task, "student", directory, meta)
