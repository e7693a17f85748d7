"""The stage trainer: optimiser, warm-up + step schedule, epochs, model selection, last/best checkpoints, exact resume.

Any stage (teacher, amplifier, student; RetinaNet or Faster R-CNN) is trained the same way: the task module returns
its weighted loss terms, `task.model` is the network the stage produces. Files in the stage directory:
`last.pt` (model checkpoint + full resume state, every quarter epoch and at each epoch end), `best.pt` (only with a
val split: best val AP50 so far), `model.pt` (the finished checkpoint), `log.jsonl`, `metrics.json`.

Selection protocol: the split that scores model.pt (test) never selects it. With a val split, model.pt is the epoch
with the best val AP50 (evaluated every `eval_every` epochs and at the end); without one it is the final epoch, as
the DS2D2 reference reports epoch_24. The test split is evaluated once, after model.pt is fixed. metrics.json says
which split selected (`selection`) and which scored (`metrics.split`).

Exact resume: the sample order and flips depend only on (seed, epoch, index) and every RNG state is saved, so a run
killed mid-epoch and resumed with `--resume` skips the batches already done and ends with the same weights.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from distill.checkpoint import file_sha256, load_checkpoint, model_payload, save_checkpoint
from distill.data import Batch, DetectionDataset, epoch_batches, eval_batches, iterations_per_epoch, make_loader
from distill.distributed import DistInfo, barrier, broadcast_buffers, wrap_model
from distill.engine import evaluate, train_one_epoch
from runtime.config import StageSchedule
from runtime.atomic import write_json_atomic
from runtime.errors import UserError

BEST_METRIC = "AP50"  # the paper's headline number selects best.pt on the val split
CHECKPOINTS_PER_EPOCH = 4  # last.pt every max(1, iterations_per_epoch // 4) iterations, and at every epoch end


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so model initialisation is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state as primitives and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]][: torch.cuda.device_count()])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def build_optimizer(params: list[nn.Parameter], schedule: StageSchedule) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over ``params`` with the schedule's lr and weight decay."""
    if not params:
        raise UserError("the task has no trainable parameters", where="trainer", fix="check which modules are frozen")
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    return torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)


def lr_factor(step: int, schedule: StageSchedule, iters_per_epoch: int) -> float:
    """LR multiplier after ``step`` optimiser steps: linear warm-up from warmup_factor, x gamma per passed milestone."""
    warmup = 1.0
    if step < schedule.warmup_iters:
        alpha = step / schedule.warmup_iters
        warmup = schedule.warmup_factor * (1 - alpha) + alpha
    epoch = step // iters_per_epoch
    return warmup * schedule.gamma ** sum(1 for m in schedule.milestones if epoch >= m)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: StageSchedule, iters_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LambdaLR of lr_factor (milestones are epochs, warm-up is iterations, like the reference)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule, iters_per_epoch))


class JsonlLog:
    """Append-only JSON-lines log (rank 0 only); on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it (a killed run keeps everything logged so far)."""
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def restart(self, keep_until_step: int | None) -> None:
        """Start a fresh log (None) or keep only records up to ``keep_until_step`` (resume)."""
        if not self.enabled:
            return
        kept = []
        if keep_until_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if record.get("step", 0) <= keep_until_step:
                    kept.append(line + "\n")
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)


@dataclass
class TrainState:
    """Position in the schedule and the best evaluation so far."""

    epoch: int = 0  # epochs fully done
    iteration: int = 0  # batches done within the current epoch
    step: int = 0  # optimiser steps done in total
    best_score: float = float("-inf")  # COCO reports -1 for a split without ground truth; that still counts
    best_epoch: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0


@dataclass
class StageResult:
    """What a finished stage reports: test metrics of model.pt and how it was obtained."""

    stage_dir: Path
    metrics: dict[str, Any]  # COCO metrics of model.pt on the test split (+ 'split')
    run: dict[str, Any]  # params, gflops, wall_time_s, device, epochs, best_epoch, selection split...


class StageTrainer:
    """Trains one stage's task and writes its checkpoints and logs into ``stage_dir``."""

    def __init__(self, task: nn.Module, schedule: StageSchedule, stage_dir: Path, meta: dict[str, Any],
                 device: torch.device, info: DistInfo = DistInfo(), input_size: int | None = None):
        self.task, self.schedule, self.dir, self.meta = task.to(device), schedule, Path(stage_dir), dict(meta)
        self.device, self.info = device, info
        self.input_size = input_size or int(meta["input_size"])
        self.amp = bool(schedule.amp and device.type == "cuda")  # AMP on CUDA only
        self.name = str(meta.get("role", "stage")) + (f"-{meta['method']}" if meta.get("role") == "student" else "")
        self.log = JsonlLog(self.dir / "log.jsonl", info.is_main)
        self.state = TrainState()

    # -- checkpoint files -------------------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        modules = getattr(self.task, "checkpoint_modules", None)
        return modules() if modules is not None else {"model": self.task.model}

    def _save_last(self, optimizer, scheduler, scaler) -> None:
        if not self.info.is_main:
            return
        self.state.elapsed_s = self._elapsed()
        resume = {"modules": {k: m.state_dict() for k, m in self._modules().items() if k != "model"},
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict(), "rng": rng_state(), "state": asdict(self.state),
                  "iters_per_epoch": self.iters_per_epoch, "world_size": self.info.world_size}
        metrics = self.state.best_metrics
        save_checkpoint(self.dir / "last.pt", model_payload(self.meta, self.task.model, metrics, False, resume=resume))

    def _restore(self, optimizer, scheduler, scaler) -> None:
        # On the CPU: load_state_dict moves weights and optimizer state to the parameters' device, and the RNG
        # states must stay CPU tensors.
        ckpt = load_checkpoint(self.dir / "last.pt", map_location="cpu")
        if ckpt.get("config_hash") != self.meta["config_hash"]:
            raise UserError("last.pt was written with a different configuration", where=str(self.dir / "last.pt"),
                            fix="restore the settings it was trained with, or run without --resume to start over")
        resume = ckpt.get("resume")
        if resume is None:
            raise UserError("last.pt holds no resume state", where=str(self.dir / "last.pt"), fix="run without --resume")
        if resume["iters_per_epoch"] != self.iters_per_epoch:
            raise UserError(f"cannot resume: an epoch had {resume['iters_per_epoch']} steps, now "
                            f"{self.iters_per_epoch} (world size {resume['world_size']} -> {self.info.world_size}?)",
                            where=str(self.dir / "last.pt"), fix="resume with the same number of processes")
        self.task.model.load_state_dict(ckpt["state_dict"])
        for name, module in self._modules().items():
            if name != "model":
                module.load_state_dict(resume["modules"][name])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume["scaler"] and scaler.is_enabled():  # empty when saved without AMP (e.g. resumed on another device)
            scaler.load_state_dict(resume["scaler"])
        self.state = TrainState(**resume["state"])
        set_rng_state(resume["rng"])

    def _elapsed(self) -> float:
        return self._elapsed_before + (time.monotonic() - self._started)

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self, train: DetectionDataset, select: DetectionDataset | None, test: DetectionDataset,
            resume: bool = False) -> StageResult:
        """Train for the schedule's epochs (continuing from last.pt when ``resume``), select on ``select`` (the val
        split; None: the final epoch), score the selected model once on ``test``, write model.pt."""
        if select is not None and select.set.name == test.set.name:
            raise UserError(f"the split {test.set.name!r} would both select and score the model", where="dataset",
                            fix="set a val_split different from test_split, or none (the final epoch is then kept)")
        sched, info = self.schedule, self.info
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        if info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.iters_per_epoch = iterations_per_epoch(len(train), sched.batch_size, info)
        self.checkpoint_every = max(1, self.iters_per_epoch // CHECKPOINTS_PER_EPOCH)
        optimizer = build_optimizer(list(self.task.trainable_parameters()), sched)
        scheduler = build_scheduler(optimizer, sched, self.iters_per_epoch)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)

        resuming = resume and (self.dir / "last.pt").is_file()
        if resuming:
            self._restore(optimizer, scheduler, scaler)
            self.log.restart(keep_until_step=self.state.step)
        elif info.is_main:
            if (self.dir / "last.pt").is_file():
                tqdm.write(f"{self.name}: starting over (an earlier run's last.pt is replaced; --resume continues it)")
            for stale in ("best.pt", "model.pt", "metrics.json", "last.pt"):
                (self.dir / stale).unlink(missing_ok=True)
            self.log.restart(keep_until_step=None)
        barrier(info)
        self._elapsed_before, self._started = self.state.elapsed_s, time.monotonic()
        self.log.write({"event": "resume" if resuming else "start", "step": self.state.step, "epoch": self.state.epoch,
                        "iteration": self.state.iteration, "world_size": info.world_size, "device": str(self.device)})

        model = wrap_model(self.task, info, self.device)
        try:
            for epoch in range(self.state.epoch, sched.epochs):
                self._train_epoch(model, train, epoch, optimizer, scheduler, scaler)
                self.state.epoch, self.state.iteration = epoch + 1, 0
                if select is not None and ((epoch + 1) % sched.eval_every == 0 or epoch + 1 == sched.epochs):
                    self._evaluate_epoch(select, epoch + 1)
                self._save_last(optimizer, scheduler, scaler)
        except UserError as exc:
            self.log.write({"event": "error", "step": self.state.step, "message": exc.line()})
            raise
        return self._finish(select, test)

    def _train_epoch(self, model, train: DetectionDataset, epoch: int, optimizer, scheduler, scaler) -> None:
        sched = self.schedule
        train.set_epoch(epoch)
        skip = self.state.iteration
        batches = epoch_batches(len(train), sched.batch_size, epoch, sched.seed, self.info)[skip:]

        totals: dict[str, float] = {}

        def on_step(iteration: int, losses: dict[str, float], batch: Batch) -> None:
            self.state.iteration, self.state.step = iteration, self.state.step + 1
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value
            self.log.write({"event": "train", "epoch": epoch + 1, "iteration": iteration, "step": self.state.step,
                            "lr": optimizer.param_groups[0]["lr"], **losses})
            if iteration % self.checkpoint_every == 0 and iteration < self.iters_per_epoch:
                self._save_last(optimizer, scheduler, scaler)

        train_one_epoch(model, optimizer, scheduler, make_loader(train, batches, sched.workers), self.device,
                        scaler=scaler, amp=self.amp, clip_grad=sched.clip_grad, start_iteration=skip,
                        total=self.iters_per_epoch, info=self.info, on_step=on_step,
                        desc=f"{self.name} {epoch + 1}/{sched.epochs}")
        if self.info.is_main and totals:
            done = self.iters_per_epoch - skip
            terms = " ".join(f"{k} {v / done:.4f}" for k, v in totals.items())
            tqdm.write(f"{self.name} epoch {epoch + 1}/{sched.epochs} mean over {done} steps: {terms}")

    def _run_eval(self, dataset: DetectionDataset, desc: str) -> dict[str, Any] | None:
        broadcast_buffers(self.task.model, self.info)
        batches = eval_batches(len(dataset), self.schedule.batch_size, self.info)
        metrics = evaluate(self.task.model, make_loader(dataset, batches, self.schedule.workers), dataset.set,
                           self.device, amp=self.amp, info=self.info, desc=desc)
        return None if metrics is None else metrics.as_dict()

    def _evaluate_epoch(self, evalset: DetectionDataset, epoch: int) -> None:
        metrics = self._run_eval(evalset, f"{self.name} eval")
        if metrics is None:  # not rank 0
            return
        score = metrics[BEST_METRIC]
        self.log.write({"event": "eval", "epoch": epoch, "step": self.state.step, "split": evalset.set.name,
                        **{k: v for k, v in metrics.items() if isinstance(v, float)}})
        tqdm.write(f"{self.name} epoch {epoch}/{self.schedule.epochs}: {evalset.set.name} AP {metrics['AP']:.4f} "
                   f"AP50 {metrics['AP50']:.4f}")
        if score >= self.state.best_score:  # on a tie the later, longer-trained weights win
            self.state.best_score, self.state.best_epoch = score, epoch
            self.state.best_metrics = {"eval": metrics, "eval_split": evalset.set.name, "epoch": epoch}
            save_checkpoint(self.dir / "best.pt", model_payload(self.meta, self.task.model, self.state.best_metrics,
                                                                False, epoch=epoch))

    def _finish(self, select: DetectionDataset | None, test: DetectionDataset) -> StageResult:
        """Fix model.pt (best on val, else the final epoch), score it once on the test split, write model.pt and
        metrics.json."""
        from distill.models import count_parameters, gflops

        barrier(self.info)  # best.pt is written by rank 0
        if select is not None:
            best = load_checkpoint(self.dir / "best.pt", map_location=self.device)
            self.task.model.load_state_dict(best["state_dict"])
            selection = {"rule": f"best {BEST_METRIC} on {select.set.name}", "split": select.set.name,
                         "metric": BEST_METRIC, "epoch": int(best.get("epoch", 0))}
        else:
            selection = {"rule": "final epoch", "split": None, "metric": None, "epoch": self.schedule.epochs}
        metrics = self._run_eval(test, f"{self.name} test")
        elapsed = self._elapsed()
        if not self.info.is_main:
            barrier(self.info)
            return StageResult(self.dir, {}, {})
        run = {"params": count_parameters(self.task.model), "gflops": gflops(self.task.model, self.input_size),
               "wall_time_s": round(elapsed, 2), "device": device_name(self.device),
               "threads": torch.get_num_threads(), "world_size": self.info.world_size, "seed": self.schedule.seed,
               "epochs": self.schedule.epochs, "steps": self.state.step, "best_epoch": selection["epoch"],
               "selected_on": selection["split"], "scored_on": test.set.name}
        flat = {k: v for k, v in metrics.items() if isinstance(v, float)} | {"split": test.set.name}
        full = {**flat, "per_class_AP50": metrics.get("per_class_AP50", {}), "selection": selection,
                "eval": self.state.best_metrics}
        model_pt = save_checkpoint(self.dir / "model.pt", model_payload(self.meta, self.task.model, full, True, run=run))
        record = {"stage": self.meta.get("role"), "method": self.meta.get("method"),
                  "pipeline": self.meta.get("config", {}).get("name"), "config_hash": self.meta["config_hash"],
                  "checkpoint": {"file": model_pt.name, "sha256": file_sha256(model_pt)},
                  "metrics": flat, "selection": selection, "run": run, "eval": self.state.best_metrics}
        write_json_atomic(self.dir / "metrics.json", record)
        self.log.write({"event": "finished", "step": self.state.step, **flat})
        barrier(self.info)
        return StageResult(self.dir, flat, run)


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else 'cpu'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
