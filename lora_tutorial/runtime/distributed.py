"""Training on several processes: the helpers ``torchrun`` runs need.

:func:`distributed` joins the process group that ``torchrun`` describes; :func:`dist_info` says
where this process stands (a :class:`DistInfo`); :func:`gather` collects a value from every process.
:func:`lora_tutorial.train.train_classifier` then trains with ``DistributedDataParallel``
(:func:`wrap_model`), each process on its shard of the training set (:func:`shard_loader`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from lora_tutorial.runtime import config


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands among those ``torchrun`` started (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process prints progress and writes files."""
        return self.rank == 0

    def device(self, prefer: str | None = None) -> torch.device:
        """This process's device: its own GPU under ``torchrun``, else ``config.get_device()``."""
        device = config.get_device(prefer)
        if device.type == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device


@contextlib.contextmanager
def distributed() -> Iterator[DistInfo]:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1), leave it at the end.

    Uses the ``nccl`` backend when CUDA is available and ``gloo`` on CPUs. Outside ``torchrun``
    it yields rank 0 of 1 and does nothing else.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or dist.is_initialized():
        yield dist_info()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    try:
        yield dist_info()
    finally:
        dist.destroy_process_group()


def dist_info() -> DistInfo:
    """This process's place among the processes (rank 0 of 1 without a process group)."""
    if not dist.is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def gather(value: object) -> list[object]:
    """``value`` from every process, in rank order (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [value]
    values: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when several processes train, else ``model``."""
    if info.world_size <= 1:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def shard_loader(loader: DataLoader, seed: int) -> tuple[DataLoader, DistributedSampler | None]:
    """The training loader, reseeded; under DDP, the same data sharded with a DistributedSampler.

    Call ``sampler.set_epoch(epoch)`` on the returned sampler (when there is one) every epoch.
    """
    if not dist.is_initialized():
        if loader.generator is not None:
            loader.generator.manual_seed(seed)
        return loader, None
    sampler: DistributedSampler = DistributedSampler(
        loader.dataset, shuffle=True, seed=seed, drop_last=True
    )
    sharded = DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
    )
    return sharded, sampler
