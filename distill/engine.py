"""One training epoch and one evaluation pass, in plain PyTorch (the shape of torchvision's detection engine).

`train_one_epoch` runs forward (AMP on CUDA), checks the loss is finite on every rank, backward through the
GradScaler, checks the unscaled gradients are finite on every rank, clips, steps optimiser and per-iteration scheduler,
and hands each step's loss terms (and the gradient norm) to a callback (logging, checkpointing). `evaluate` runs the
detector in eval mode and scores its detections, mapped back to the original image pixels, with runtime.metrics
against runtime.data.coco.to_coco_dict of the split.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from distill.data import Batch
from distill.distributed import DistInfo, all_true, gather_to_main, mean_over_ranks
from runtime.data.coco import to_coco_dict
from runtime.errors import UserError
from runtime.metrics import CocoMetrics, evaluate_coco
from runtime.records import DetectionSet

# (iteration index within the epoch, 1-based; loss terms averaged over ranks; batch) -> None
StepCallback = Callable[[int, dict[str, float], Batch], None]
# Under AMP an overflowing loss scale gives inf gradients now and then; GradScaler skips those steps and halves the
# scale. After this many skips in a row (the scale is then ~2^-34) the gradients are non-finite for real: stop.
MAX_SKIPPED_STEPS = 50


def _short(name: str) -> str:
    """A compact name for the progress bar (the log keeps full names)."""
    return name.replace("loss_", "").replace("kd_implicit_", "imp_").replace("kd_explicit_", "exp_").replace("kd_", "")


def non_finite_error(losses: dict[str, float], batch: Batch) -> UserError:
    """The error that stops a run whose loss is NaN/inf, naming the terms and the batch's image files."""
    bad = ", ".join(f"{k}={v}" for k, v in losses.items() if not math.isfinite(v))
    files = ", ".join(str(p) for p in batch.paths)
    what = f"loss is not finite ({bad}) on the batch of {files}" if bad else \
        f"loss is not finite on another rank (this rank's batch: {files})"
    return UserError(what, where="training",
                     fix="lower the learning rate or set clip_grad (--set schedule.<stage>.lr=... / clip_grad=...), "
                     "and check these images' boxes; last.pt still holds the last good state (--resume)")


def non_finite_grad_error(norm: float, losses: dict[str, float], batch: Batch) -> UserError:
    """The error that stops a run whose loss is finite but whose gradients are not (clipping would spread NaN)."""
    files = ", ".join(str(p) for p in batch.paths)
    terms = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
    return UserError(f"gradients are not finite (norm {norm}) although the loss is ({terms}), on the batch of {files}",
                     where="training", fix="a loss term has an infinite slope here (e.g. sqrt or log at 0): lower the "
                     "learning rate or the KD weights; last.pt still holds the last good state (--resume)")


def train_one_epoch(task: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    batches: Iterable[Batch], device: torch.device, *, scaler: torch.amp.GradScaler,
                    amp: bool = False, clip_grad: float | None = None, start_iteration: int = 0, total: int | None = None,
                    info: DistInfo = DistInfo(), on_step: StepCallback | None = None, desc: str = "train") -> None:
    """Train ``task`` (a module returning a dict of weighted loss terms) for the given batches.

    ``start_iteration`` batches of this epoch were already done (resume); numbering continues from there.
    A non-finite total loss, or a finite loss with non-finite gradients, on any rank stops every rank with a UserError
    before the weights change (under AMP, GradScaler's occasional overflow skips are allowed, up to
    MAX_SKIPPED_STEPS in a row).
    """
    skipped = 0
    task.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(batches, total=total, initial=start_iteration, desc=desc, leave=False, dynamic_ncols=True,
               disable=None if info.is_main else True)
    for iteration, batch in enumerate(bar, start=start_iteration + 1):
        batch = batch.to(device)
        with torch.autocast(device_type=device.type, enabled=amp):
            loss_terms = task(batch.images, batch.targets)
        loss = sum(loss_terms.values())
        local = {k: float(v.detach()) for k, v in loss_terms.items()} | {"loss": float(loss.detach())}
        # Every rank must agree before backward, or the finite ranks would hang in DDP's gradient all-reduce.
        if not all_true(math.isfinite(local["loss"]), info, device):
            raise non_finite_error(local, batch)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # check and clip the true gradients, not the loss-scaled ones (no-op without AMP)
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
        # DDP has all-reduced the gradients, but a rank may still differ (e.g. a task computing its own): all agree.
        if all_true(bool(torch.isfinite(norm)), info, device):
            skipped = 0
            if clip_grad is not None:
                torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
        elif scaler.is_enabled() and skipped < MAX_SKIPPED_STEPS:
            skipped += 1  # scaler.step() below sees the inf and skips the update, scaler.update() lowers the scale
        else:
            raise non_finite_grad_error(float(norm), local, batch)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        logged = mean_over_ranks(local | {"grad_norm": float(norm)}, info, device)
        bar.set_postfix({_short(k): f"{v:.3f}" for k, v in logged.items()}, refresh=False)
        if on_step is not None:
            on_step(iteration, logged, batch)
    bar.close()


def detections_to_coco(outputs: list[dict[str, torch.Tensor]], batch: Batch) -> list[dict[str, Any]]:
    """COCO results (image_id = dataset index + 1, category_id = label + 1, xywh in original-image pixels)."""
    results = []
    for out, transform, index in zip(outputs, batch.transforms, batch.indices):
        boxes = transform.boxes_to_original(out["boxes"].detach().float().cpu().numpy())
        for box, label, score in zip(boxes.tolist(), out["labels"].tolist(), out["scores"].tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": index + 1, "category_id": int(label) + 1,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return results


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], split: DetectionSet, device: torch.device, *,
             amp: bool = False, info: DistInfo = DistInfo(), desc: str = "eval") -> CocoMetrics | None:
    """COCO metrics of ``model`` (eval mode) on ``split``; each rank runs its share, rank 0 scores (others: None)."""
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    try:
        for batch in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=None if info.is_main else True):
            images = batch.images.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, enabled=amp):
                outputs = model(list(images))
            results.extend(detections_to_coco(outputs, batch))
    finally:
        model.train(was_training)
    gathered = gather_to_main(results, info)
    if gathered is None:
        return None
    return evaluate_coco(to_coco_dict(split), [det for part in gathered for det in part])
