"""The one place that knows ranks and process groups: the layout pp × dp × sp × tp of a run.

    mesh = init_mesh(Layout.of(tp=2, pp=2, sp=1, world=8))   # after torchrun / srun set the environment
    mesh.tp_group, mesh.pp_group, mesh.dp_group, mesh.dp_rank, mesh.is_last_stage, ...

Process setup for `torchrun` or `srun`: RANK / WORLD_SIZE / LOCAL_RANK (torchrun) or SLURM_PROCID /
SLURM_NTASKS / SLURM_LOCALID (srun; MASTER_ADDR / MASTER_PORT must then be exported by the sbatch script).
gloo on CPU, NCCL on GPU. When any model-parallel dimension is > 1 the groups come from megatron-core's
`parallel_state.initialize_model_parallel`, whose rank order is tp fastest, then sp (its "context"), then
dp, then pp: rank = tp_rank + tp·(sp_rank + sp·(dp_rank + dp·pp_rank)). Tensor-parallel peers are
neighbours (one node, the fastest links), pipeline stages are the furthest apart. A pure data-parallel run
never imports megatron-core: its one group is the world.

The data is split by dp rank only: every tp / pp / sp rank of one model replica reads the same batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn


class LayoutError(ValueError):
    """A layout that cannot run; the message says what to change, in one line."""


@dataclass(frozen=True)
class Layout:
    """Sizes of the four dimensions; world = tp · sp · dp · pp."""

    tp: int = 1
    pp: int = 1
    sp: int = 1
    dp: int = 1

    @classmethod
    def of(cls, world: int, tp: int = 1, pp: int = 1, sp: int = 1) -> Layout:
        """The layout of `world` processes with the given model-parallel sizes; dp is what remains."""
        for name, size in (("tp", tp), ("pp", pp), ("sp", sp)):
            if size < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {size}")
        if world % (tp * pp * sp):
            raise LayoutError(
                f"world size {world} is not a multiple of tp·pp·sp = {tp}·{pp}·{sp} = {tp * pp * sp}: "
                f"launch a multiple of {tp * pp * sp} processes or change parallel.tp / parallel.pp")
        return cls(tp, pp, sp, world // (tp * pp * sp))

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.sp * self.dp

    @property
    def model_parallel(self) -> bool:
        return self.tp * self.pp * self.sp > 1

    def coordinates(self, rank: int) -> dict[str, int]:
        """(tp, sp, dp, pp) coordinates of a global rank, in megatron-core's order."""
        tp, rest = rank % self.tp, rank // self.tp
        sp, rest = rest % self.sp, rest // self.sp
        dp, pp = rest % self.dp, rest // self.dp
        return {"tp": tp, "sp": sp, "dp": dp, "pp": pp}

    def rank_of(self, tp: int = 0, sp: int = 0, dp: int = 0, pp: int = 0) -> int:
        return tp + self.tp * (sp + self.sp * (dp + self.dp * pp))

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} sp={self.sp} dp={self.dp}"


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or srun's environment; (0, 1, 0) for one process."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return rank, world, local


@dataclass
class Mesh:
    """This process's place in the layout, its groups (None where a dimension has size 1 and no group is
    needed), and the few collectives the training loop uses."""

    layout: Layout = Layout()
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    model_parallel_group: Any = None  # tp × pp: the ranks that together hold one copy of the parameters
    sp_group: Any = None  # the ranks holding the shards of the same sequences
    embedding_group: Any = None  # first and last pipeline stage of a replica (a tied embedding's two copies)

    def __post_init__(self) -> None:
        coords = self.layout.coordinates(self.rank)
        self.tp_rank, self.sp_rank, self.dp_rank, self.pp_rank = (coords[k] for k in ("tp", "sp", "dp", "pp"))

    # -- where this rank sits --------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.layout.world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def reports_loss(self) -> bool:
        """One rank per data-parallel replica holds the replica's loss: tp rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0 and self.sp_rank == 0

    def sp_neighbour(self, offset: int) -> int | None:
        """Global rank of the sp rank `offset` away (same tp, dp, pp), None past either end."""
        sp = self.sp_rank + offset
        if not 0 <= sp < self.layout.sp:
            return None
        return self.layout.rank_of(tp=self.tp_rank, sp=sp, dp=self.dp_rank, pp=self.pp_rank)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.layout.tp}, "
                f"pp {self.pp_rank}/{self.layout.pp}, sp {self.sp_rank}/{self.layout.sp}, "
                f"dp {self.dp_rank}/{self.layout.dp}, device {self.device}")

    # -- wrappers and collectives ------------------------------------------------------------------

    def wrap(self, module: nn.Module) -> nn.Module:
        """Data-parallel wrapper when dp > 1: gradients averaged over the data-parallel group."""
        if self.layout.dp == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, process_group=self.dp_group)

    def no_sync(self, model: nn.Module, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if not last and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor, group: Any = None) -> None:
        if self.active:
            buf = tensor.to(self.device)
            torch_dist.all_reduce(buf, group=group)
            tensor.copy_(buf)

    def replica_mean(self, value: torch.Tensor | float) -> float:
        """The mean over data-parallel replicas of a value that the replica's `reports_loss` rank holds
        (e.g. the loss, known on the last pipeline stage only); every rank gets it."""
        value = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(1).clone()
        if not self.reports_loss:
            value.zero_()
        self.all_reduce_sum(value)
        return (value / self.layout.dp).item()

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

    def problems(self, problem: str | None) -> list[str]:
        """Every rank's problem (None where it has none), in rank order: all ranks raise on any rank's, so
        none is left waiting in a collective for one that stopped."""
        return [p for p in self.gather_objects(problem) if p]

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    def close(self) -> None:
        """Leave the process group once every rank is here: no rank tears its connections down while a
        peer is still in a collective, and rank 0 (which hosts the rendezvous store) cannot leave first."""
        self.barrier()
        if self.layout.model_parallel:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_mesh(tp: int = 1, pp: int = 1, sp: int = 1, timeout_s: float = 600) -> Mesh:
    """Join the process group the environment describes and build the layout's groups.

    A layout that does not fit the world size fails here, before any work, on every rank alike. A
    collective waiting more than `timeout_s` raises instead of hanging."""
    rank, world, local = launch_environment()
    layout = Layout.of(world, tp, pp, sp)
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
        torch_dist.init_process_group(backend, rank=rank, world_size=world,
                                      timeout=datetime.timedelta(seconds=timeout_s))
    if not layout.model_parallel:
        return Mesh(layout, rank, local, device, dp_group=torch_dist.group.WORLD if world > 1 else None)
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
    ) != (tp, pp, sp):  # another layout in the same processes (tests run several jobs per launch)
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp, context_parallel_size=sp,
                                                 create_gloo_process_groups=False)
    mesh = Mesh(layout, rank, local, device,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
                pp_group=parallel_state.get_pipeline_model_parallel_group(),
                dp_group=parallel_state.get_data_parallel_group(),
                model_parallel_group=parallel_state.get_model_parallel_group(),
                sp_group=parallel_state.get_context_parallel_group() if sp > 1 else None,
                embedding_group=parallel_state.get_embedding_group()
                if pp > 1 and parallel_state.is_rank_in_embedding_group() else None)
    expected = {"tp": parallel_state.get_tensor_model_parallel_rank(),
                "pp": parallel_state.get_pipeline_model_parallel_rank(),
                "dp": parallel_state.get_data_parallel_rank()}
    got = {"tp": mesh.tp_rank, "pp": mesh.pp_rank, "dp": mesh.dp_rank}
    if expected != got:  # our rank arithmetic must be megatron-core's
        raise RuntimeError(f"rank {rank}: megatron-core placed this rank at {expected}, the layout at {got}")
    return mesh
