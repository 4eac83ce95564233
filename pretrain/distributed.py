"""Process setup for `torchrun` or `srun`: rank, world size, device, and the few collectives the loop uses.

Reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun) or SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (srun;
MASTER_ADDR / MASTER_PORT must then be exported by the sbatch script). gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """Data-parallel wrapper when there are several processes (gradients averaged over ranks)."""
        if not self.active:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: nn.Module, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if self.active and not last and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if self.active:
            buf = tensor.to(self.device)
            torch_dist.all_reduce(buf)
            tensor.copy_(buf)

    def mean(self, value: torch.Tensor) -> float:
        value = value.detach().double().reshape(1).clone()
        self.all_reduce_sum(value)
        return (value / self.world_size).item()

    def any_flag(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        self.all_reduce_sum(value)
        return value.item() > 0

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order (used for per-rank data positions and RNG states)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    def close(self) -> None:
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_distributed() -> Distributed:
    """Join the process group described by the environment (or run as a single process)."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"rank {rank}: {name} is not set; launch with torchrun, or export it in "
                                   "the sbatch script")
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, rank=rank, world_size=world)
    return Distributed(rank, world, local, device)
