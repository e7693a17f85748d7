"""torchrun / DistributedDataParallel helpers: process group set-up (gloo on CPU, NCCL on CUDA) and collectives.

Launch with ``torchrun --nproc_per_node=N -m distill.run ...``; torchrun's RANK / WORLD_SIZE / LOCAL_RANK
environment variables switch this on. Without them every helper degrades to the single-process behaviour.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from runtime.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world size, local rank (GPU index on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when running as one of several torchrun processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and summaries."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set the distributed environment variables."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and return this rank's info and device.

    Under torchrun every process gets one intra-op thread: N processes sharing the cores must not oversubscribe them.
    """
    if not launched_by_torchrun():
        return DistInfo(), torch.device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    torch.set_num_threads(1)
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                            where="torchrun --nproc_per_node", fix="use at most one process per GPU")
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank), target


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if info.enabled:
        dist.barrier()


def wrap_model(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``module`` when distributed, else ``module`` itself.

    Every loss term of our tasks touches every trainable parameter (even with no positives, the terms stay in the
    graph), so DDP skips the unused-parameter search; a task that may leave some out sets
    ``find_unused_parameters = True`` on itself.
    """
    if not info.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    find_unused = bool(getattr(module, "find_unused_parameters", False))
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def all_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank (all ranks then take the same branch)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def mean_over_ranks(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Average scalar values across ranks (the loss the log reports is the job's, not rank 0's)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: float(v) / info.world_size for k, v in zip(keys, tensor.tolist())}


def gather_to_main(obj: Any, info: DistInfo) -> list[Any] | None:
    """Collect one picklable object per rank on rank 0 (in rank order); other ranks get None."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so all ranks evaluate the model rank 0 saves."""
    if info.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
