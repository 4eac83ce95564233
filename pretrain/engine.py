"""The training step under any layout: the one object the loop talks to.

    engine = build_engine(cfg, mesh, precision)   # model pieces → parallelize → optimizer, wrapped
    for micro-batch i of k:  loss = engine.forward_backward(batch, scale=1 / k, last=i == k - 1)
    grad_norm = engine.step(cfg.train.grad_clip, apply=loss_is_finite)
    engine.eval_loss(batch); engine.save(staging_dir) / engine.load(checkpoint_dir)

The engine is picked by the layout alone:
- `ReplicaEngine` (pp = 1): the model (whole, or split over tp) with its loss, DDP over the dp group;
  ZeRO-1 with tp > 1 shards AdamW's state over the dp group (torch's ZeroRedundancyOptimizer).
- `FsdpEngine` (pp = sp = 1, parallel.fsdp): the same, with parameters, gradients and AdamW's state
  sharded over the dp group by torch's FSDP2 (parallel/fsdp.py), tp or not; `FsdpPipelineEngine` the
  pipeline's, each stage sharded so; `FsdpSequenceEngine` sequence parallelism's.
- `PipelineEngine` (pp > 1): this rank's stages under a pipeline schedule (parallel/pipeline.py); the
  gradients are averaged over the dp group once per step, ZeRO-1 as above.
- `SequenceEngine` (sp > 1, pp = 1): this rank's shard of every sequence, the memory state relayed
  between sp ranks (parallel/sequence.py); under pp > 1 the pipeline engines run relayed stages.
- `DeepSpeedEngine` (tp = pp = 1, ZeRO 1–3): DeepSpeed's engine over all ranks (parallel/zero.py).

Why ZeRO-1 with tp / pp is torch's and not DeepSpeed's: DeepSpeed's ZeRO optimizer reduces and
partitions the gradients inside its own `engine.backward`, while a pipeline schedule runs the backward
itself, micro-batch by micro-batch; DeepSpeed's own pipeline engine has no interleaved schedule.
ZeroRedundancyOptimizer only shards the optimizer step (DDP has already averaged the gradients), so it
composes with any schedule; it is ZeRO stage 1 exactly. ZeRO-2/3 need DeepSpeed and run pure dp only.

Losses: only the last pipeline stage knows the loss; `forward_backward` returns None elsewhere and the
loop averages over replicas with `Mesh.replica_mean`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from parallel.compile import compile_blocks
from parallel.fsdp import (
    apply_fsdp,
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    local_model_state,
    local_optimizer_state,
    placed_like,
    precision_policy,
)
from parallel.grads import average_gradients, clip_grad_norm_, reduce_gradients
from parallel.mesh import Mesh
from parallel.model import build_local_model, n_stages
from parallel.pipeline import Pipeline, StageModule, sync_tied_gradients
from parallel.sequence import SequenceLoss, SequenceStage, shard_of, zigzag_split
from parallel.tensor import TensorShard, local_slice, vocab_parallel_loss
from parallel.zero import CHECKPOINT_DIR as ZERO_CHECKPOINT_DIR
from parallel.zero import ZeroEngine
from pretrain.batch import Batch
from pretrain.checkpoint_shards import (
    SHARDS_DIR,
    load_shards,
    load_slice,
    shard_parts,
    slice_written_by,
    sliced_parts,
    write_files,
)
from pretrain.config import ConfigError, RunConfig
from pretrain.loss import CausalLMLoss, head_loss_sum, loss_denominator, token_cross_entropy
from titans.memory import NeuralMemory
from titans.model import TitansLM


def copy_mapped_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Checkpoints load memory-mapped; on the CPU an optimizer's `load_state_dict` keeps the loaded tensors
    as its state (`.to(cpu)` is no copy), which would keep the checkpoint file mapped, and its disk space
    taken after retention deletes it, for the whole run. Its CPU state tensors are replaced by copies."""
    for opt in (optimizer, getattr(optimizer, "optim", None)):  # ZeroRedundancyOptimizer: the local AdamW
        for entry in getattr(opt, "state", {}).values():
            for key, value in entry.items():
                if torch.is_tensor(value) and value.device.type == "cpu":
                    entry[key] = value.clone()


def make_optimizer(models: list[nn.Module], cfg: RunConfig, mesh: Mesh) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norm gains, biases) and the learned initial memory do not. With
    ZeRO-1 under tp / pp, its state is sharded over the data-parallel group."""
    decay, no_decay = [], []
    for model in models:
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and "init_weights" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.parallel.zero_stage == 1 and mesh.layout.model_parallel and mesh.layout.dp > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, torch.optim.AdamW, process_group=mesh.dp_group,
                                       lr=cfg.train.lr, betas=cfg.train.betas)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)


def head_loss_sum_of(model: TitansLM) -> partial:
    """Σ (w·) cross-entropy of a head's logits, vocabulary-parallel when the head is split over tp."""
    return partial(head_loss_sum, cross_entropy=vocab_parallel_loss(model) or token_cross_entropy)


def loss_on(module: nn.Module, batch: Batch, autocast: torch.autocast) -> Tensor:
    """Mean (or weighted mean) next-token loss of a CausalLMLoss module (or a wrapper around one)."""
    tokens, weights = batch
    with autocast:
        return module(tokens[:, :-1], tokens[:, 1:], weights)


class Engine:
    """What every engine shares: this rank's model pieces, the optimizer, the mesh."""

    def __init__(self, models: list[TitansLM], optimizer: torch.optim.Optimizer, mesh: Mesh,
                 cfg: RunConfig, autocast: torch.autocast) -> None:
        self.models, self.optimizer, self.mesh = models, optimizer, mesh
        self.cfg, self.autocast = cfg, autocast

    def memories(self) -> list[tuple[int, NeuralMemory]]:
        """(layer index, memory) for every neural memory this rank holds (for diagnostics)."""
        return [(int(i), m) for model in self.models for i, block in model.blocks.items()
                for m in block.modules() if isinstance(m, NeuralMemory)]

    def head_loss_sum(self) -> partial:
        return head_loss_sum_of(self.models[-1])

    def parameters(self) -> list[Tensor]:
        return [p for model in self.models for p in model.parameters()]

    def step(self, grad_clip: float, apply: bool) -> float:
        """Clip, then apply the optimizer step if `apply` and the gradient norm is finite; returns the
        norm before clipping."""
        norm = clip_grad_norm_(self.parameters(), grad_clip, self.mesh)
        if apply and math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def average_over_dp(self) -> None:
        """Average the gradients over the data-parallel group, where no wrapper (DDP, FSDP) did."""
        average_gradients(self.parameters(), self.mesh)

    def train(self, mode: bool = True) -> None:
        for model in self.models:
            model.train(mode)

    def whole_model(self) -> contextlib.AbstractContextManager:
        """While inside, every parameter of `models` is whole on this rank (a no-op unless sharded)."""
        return contextlib.nullcontext()

    def model_state(self) -> dict[str, Tensor]:
        """Collective where the parameters are sharded over dp: this rank's model state dict, as a run
        without FSDP holds it."""
        return self.models[0].state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def set_model_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        model.load_state_dict(state)

    def set_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def checkpoint_parts(self, directory: Path) -> tuple[dict[Path, Any], dict[str, Any]]:
        """Collective. This rank's files of the checkpoint in `directory` (path → object to save) and what
        rank 0 puts into state.pt for the model and optimizer; both hold the live tensors (a writer that
        runs while training goes on copies them first)."""
        if not self.mesh.layout.model_parallel:  # one whole model (ZeRO under tp / pp only: see above)
            return {}, {"model": self.model_state(), "optimizer": self.optimizer_state()}
        files, record = shard_parts(directory, self.models, self.optimizer, self.mesh, self.cfg,
                                    *self.tensor_shard_states())
        return files, {"shards": record}

    def save(self, directory: Path) -> dict[str, Any]:
        """Collective. Writes this rank's part of the checkpoint into `directory`; returns what rank 0 puts
        into state.pt for the model and optimizer."""
        files, state = self.checkpoint_parts(directory)
        write_files(files)
        return state

    def tensor_shard_states(self) -> tuple[dict[str, Tensor], dict[str, Any]] | tuple[()]:
        """What shard_parts writes for this rank, where it cannot read it from the modules itself."""
        return ()

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        self._load(directory, state)
        copy_mapped_optimizer_state(self.optimizer)

    def _load(self, directory: Path, state: dict[str, Any]) -> None:
        if "shards" in state:
            load_shards(directory, state["shards"], self.models, self.optimizer, self.mesh,
                        self.set_model_state, self.set_optimizer_state)
        elif "model" in state:
            if self.mesh.layout.model_parallel:
                raise RuntimeError(f"checkpoint {directory} holds a whole model, this run is split over "
                                   f"{self.mesh.layout}: resume with the layout it was written with")
            self.set_model_state(self.models[0], state["model"])
            if state.get("optimizer") is None:  # converted from dense weights
                self.mesh.print(f"{directory}: converted weights without optimizer state: AdamW moments "
                                "start at zero")
            else:
                self.set_optimizer_state(state["optimizer"])
        else:
            raise RuntimeError(f"checkpoint {directory} was written by a DeepSpeed ZeRO run: resume it with "
                               "the same parallel.zero_stage")


class ReplicaEngine(Engine):
    """pp = 1: the whole model on each rank (split over tp when tp > 1), DDP over the dp group."""

    def __init__(self, models, optimizer, mesh, cfg, autocast) -> None:
        super().__init__(models, optimizer, mesh, cfg, autocast)
        self.loss_module = CausalLMLoss(models[0], vocab_parallel_loss(models[0]) or token_cross_entropy)
        self.wrapped = mesh.wrap(self.loss_module)

    def forward_backward(self, batch: Batch, scale: float, last: bool) -> Tensor | None:
        with self.mesh.no_sync(self.wrapped, last):
            loss = loss_on(self.wrapped, batch, self.autocast)
            (loss * scale).backward()
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> Tensor | None:
        return loss_on(self.loss_module, batch, self.autocast)


class FsdpStates:
    """Checkpoint state of models sharded over dp by FSDP (`roots`: their FSDP root modules), gathered
    into what the same engine without FSDP holds: a checkpoint does not depend on FSDP."""

    models: list[TitansLM]
    optimizer: torch.optim.Optimizer
    mesh: Mesh
    roots: list[nn.Module]

    def average_over_dp(self) -> None:
        """Nothing to do: FSDP's reduce-scatter averaged the gradients over dp."""

    def slices(self) -> tuple[int, int]:
        """(how many ranks hold different slices of each tensor, this rank's place among them): the dp
        group, or an HSDP shard group of consecutive dp ranks."""
        count = self.cfg.parallel.fsdp_shard or self.mesh.layout.dp
        return count, self.mesh.dp_rank % count

    def checkpoint_parts(self, directory: Path) -> tuple[dict[Path, Any], dict[str, Any]]:
        """parallel.fsdp_checkpoint=sharded: every rank's slices, in its own file, nothing gathered; else
        gathered (`Engine.checkpoint_parts`). Under HSDP the replicas hold the same slices, and they share
        the writing (`slice_written_by`)."""
        if self.cfg.parallel.fsdp_checkpoint != "sharded":
            return super().checkpoint_parts(directory)
        self.reshard()
        count = self.slices()[0]
        model_state = {k: v for model in self.models for k, v in local_model_state(model).items()}
        files, record = sliced_parts(directory, self.models, self.mesh, self.cfg, count,
                                     slice_written_by(self.mesh.dp_rank, count, self.mesh.layout.dp),
                                     model_state, local_optimizer_state(self.optimizer))
        return files, {"shards": record}

    def _load(self, directory: Path, state: dict[str, Any]) -> None:
        """A sliced checkpoint of this layout: each rank reads its own slices only; else as any engine
        (the slices joined for a run without FSDP, or that slices otherwise)."""
        record, (count, index) = state.get("shards", {}), self.slices()
        if record.get("fsdp_slices") != count or record["layout"] != asdict(self.mesh.layout):
            return super()._load(directory, state)
        saved = load_slice(directory / SHARDS_DIR, record, self.mesh.tp_rank, self.mesh.pp_rank, index)
        for model in self.models:
            load_full_model_state(model, saved["model"], place=placed_like)
        load_full_optimizer_state(self.optimizer, saved["optimizer"], place=placed_like)

    def reshard(self) -> None:
        """Every unit sharded again: a unit kept whole after its forward (a pipeline's root, blocks under
        parallel.fsdp_reshard) stays whole after a forward without gradients, which has no backward to
        free it (an evaluation's)."""
        for root in self.roots:
            for unit in root.modules():
                if isinstance(unit, FSDPModule):
                    unit.reshard()

    def train(self, mode: bool = True) -> None:
        super().train(mode)  # type: ignore[misc]
        if mode:  # back from an evaluation: what its forwards left gathered is freed
            self.reshard()

    def model_state(self) -> dict[str, Tensor]:
        self.reshard()
        return {name: value for model in self.models
                for name, value in full_model_state(model, self.writes()).items()}

    def optimizer_state(self) -> dict[str, Any]:
        return full_optimizer_state(self.optimizer, keep=self.writes())

    def writes(self) -> bool:
        """Whether this rank writes the gathered state (dp and sp rank 0: the others hold the same)."""
        return self.mesh.dp_rank == 0 and self.mesh.sp_rank == 0

    def tensor_shard_states(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.model_state(), self.optimizer_state()

    def set_model_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        load_full_model_state(model, state)

    def set_optimizer_state(self, state: dict[str, Any]) -> None:
        load_full_optimizer_state(self.optimizer, state)

    @contextlib.contextmanager
    def whole_model(self) -> Iterator[None]:
        """Every FSDP unit gathered (code that calls blocks' methods, not their forward, such as the
        streaming evaluation, finds whole parameters), sharded again after."""
        units = [m for root in self.roots for m in root.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()


class FsdpEngine(FsdpStates, Engine):
    """pp = sp = 1 with parallel.fsdp: the model (split over tp when tp > 1) with its loss, its parameters,
    gradients and AdamW state sharded over the dp group by FSDP2 (parallel/fsdp.py)."""

    def __init__(self, models, optimizer, mesh, cfg, autocast, roots: list[nn.Module]) -> None:
        super().__init__(models, optimizer, mesh, cfg, autocast)
        self.roots = roots

    def forward_backward(self, batch: Batch, scale: float, last: bool) -> Tensor | None:
        self.roots[0].set_requires_gradient_sync(last)  # accumulate unsharded, reduce-scatter once a step
        loss = loss_on(self.roots[0], batch, self.autocast)
        (loss * scale).backward()
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> Tensor | None:
        return loss_on(self.roots[0], batch, self.autocast)


class PipelineEngine(Engine):
    """pp > 1: this rank's stages under a pipeline schedule; with sp > 1 each stage runs this rank's
    sequence shard, relaying the memory state to the same stage on the other sp ranks."""

    def __init__(self, models, optimizer, mesh, cfg, autocast, stage_indices: list[int],
                 modules: list[nn.Module] | None = None) -> None:
        """`modules`: what the schedule runs per stage, where they are not `StageModule`s of `models`."""
        super().__init__(models, optimizer, mesh, cfg, autocast)
        p = cfg.parallel
        microbatches = p.pp_microbatches or 2 * p.pp
        modules = modules or stage_modules(models, mesh, zigzag_split(cfg.model.layer_kinds, p.sp_split))
        self.sequence = [m for m in modules if isinstance(m, SequenceStage)]
        micro_shape = (cfg.data.batch_size // microbatches, cfg.data.seq_len // p.sp) if p.sp > 1 else None
        self.pipe = Pipeline(models, stage_indices, n_stages(p), mesh, p.pp_schedule, microbatches,
                             self.head_loss_sum(), modules=modules, micro_shape=micro_shape)

    def _run(self, batch: Batch, scale: float, train: bool) -> Tensor | None:
        tokens, weights = batch
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        denominator = loss_denominator(targets, weights) / scale  # of the whole sequences, over sp too
        if self.sequence:
            zigzag = self.sequence[0].shards.zigzag
            inputs, targets = shard_of(inputs, self.mesh, zigzag), shard_of(targets, self.mesh, zigzag)
            weights = None if weights is None else shard_of(weights, self.mesh, zigzag)
        run = self.pipe.train_step if train else self.pipe.eval_loss
        with self.autocast:
            loss = run(inputs, targets, weights, denominator)
        if not train:
            self.finish_sends()
        if loss is None:
            return None
        if self.sequence:  # the shards' shares → the batch's (the sp group of a last stage is last stages)
            loss = loss.float().clone()
            torch.distributed.all_reduce(loss, group=self.mesh.sp_group)
        return loss / scale

    def forward_backward(self, batch: Batch, scale: float, last: bool) -> Tensor | None:
        return self._run(batch, scale, train=True)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> Tensor | None:
        return self._run(batch, 1.0, train=False)

    def finish_sends(self) -> None:
        for stage in self.sequence:
            stage.shards.finish_sends()

    def step(self, grad_clip: float, apply: bool) -> float:
        if self.sequence:
            self.finish_sends()
            reduce_gradients(self.parameters(), self.mesh.sp_group)  # each shard holds its part
        self.average_over_dp()  # once per step, after every micro-batch
        sync_tied_gradients(self.models, self.mesh)
        return super().step(grad_clip, apply)


class FsdpPipelineEngine(FsdpStates, PipelineEngine):
    """pp > 1 with parallel.fsdp: each stage an FSDP root over the dp group (the schedule gathers and
    reduce-scatters, torch.distributed.pipelining drives FSDP), so the gradients arrive averaged."""

    def __init__(self, models, optimizer, mesh, cfg, autocast, stage_indices, roots: list[nn.Module]) -> None:
        super().__init__(models, optimizer, mesh, cfg, autocast, stage_indices, modules=roots)
        self.roots = roots


class SequenceEngine(Engine):
    """sp > 1 (pp = 1): each rank runs its shard of every sequence, the memory state relayed between sp
    ranks (parallel/sequence.py); gradients summed over sp, then averaged over dp."""

    def __init__(self, models, optimizer, mesh, cfg, autocast, root: SequenceLoss | None = None) -> None:
        """`root`: the model with its loss over a shard, where built before (FSDP wraps it)."""
        super().__init__(models, optimizer, mesh, cfg, autocast)
        self.root = root or SequenceLoss(models[0], mesh, self.head_loss_sum(),
                                         zigzag_split(cfg.model.layer_kinds, cfg.parallel.sp_split))
        self.shards = self.root.shards

    def _run(self, batch: Batch, scale: float, train: bool) -> Tensor:
        tokens, weights = batch
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        zigzag = self.shards.zigzag
        args = (shard_of(inputs, self.mesh, zigzag), shard_of(targets, self.mesh, zigzag),
                None if weights is None else shard_of(weights, self.mesh, zigzag),
                loss_denominator(targets, weights) / scale)
        with self.autocast:
            loss = self.root(*args)
        if train:
            loss.backward()
        self.shards.finish_sends()
        loss = loss.detach().float().clone()
        torch.distributed.all_reduce(loss, group=self.mesh.sp_group)  # the shards' shares → the batch's
        return loss / scale

    def forward_backward(self, batch: Batch, scale: float, last: bool) -> Tensor | None:
        return self._run(batch, scale, train=True)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> Tensor | None:
        return self._run(batch, 1.0, train=False)

    def step(self, grad_clip: float, apply: bool) -> float:
        reduce_gradients(self.parameters(), self.mesh.sp_group)  # each shard holds its part
        self.average_over_dp()
        return super().step(grad_clip, apply)


class FsdpSequenceEngine(FsdpStates, SequenceEngine):
    """sp > 1 (pp = 1) with parallel.fsdp: the model with its loss over a shard as the FSDP root, each
    block's halves around the halo hooked for FSDP's gathers (parallel/fsdp.py); FSDP averages the
    gradients' slices over dp, the sp ranks (which hold the same slices) sum them."""

    def __init__(self, models, optimizer, mesh, cfg, autocast, roots: list[nn.Module]) -> None:
        super().__init__(models, optimizer, mesh, cfg, autocast, root=roots[0])
        self.roots = roots

    def forward_backward(self, batch: Batch, scale: float, last: bool) -> Tensor | None:
        self.root.set_requires_gradient_sync(last)  # accumulate unsharded, reduce-scatter once a step
        return super().forward_backward(batch, scale, last)


class DeepSpeedEngine(Engine):
    """Pure data parallelism with ZeRO 1–3 through DeepSpeed (parallel/zero.py)."""

    def __init__(self, models, optimizer, mesh, cfg, autocast, precision: str) -> None:
        super().__init__(models, optimizer, mesh, cfg, autocast)
        self.zero = ZeroEngine(CausalLMLoss(models[0]), optimizer, stage=cfg.parallel.zero_stage,
                                    micro_batch=cfg.data.batch_size, grad_accum=cfg.train.grad_accum,
                                    grad_clip=cfg.train.grad_clip, precision=precision, device=mesh.device,
                                    local_rank=mesh.local_rank)

    def forward_backward(self, batch: Batch, scale: float, last: bool) -> Tensor | None:
        loss = loss_on(self.zero.engine, batch, self.autocast)
        self.zero.backward(loss)  # DeepSpeed divides by the accumulation steps itself
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> Tensor | None:
        return loss_on(self.zero.engine, batch, self.autocast)

    def step(self, grad_clip: float, apply: bool) -> float:
        return self.zero.step()  # DeepSpeed clips, and skips a non-finite step on every rank

    def checkpoint_parts(self, directory: Path) -> tuple[dict[Path, Any], dict[str, Any]]:
        raise NotImplementedError("DeepSpeed writes its own checkpoint files (collectives inside)")

    def save(self, directory: Path) -> dict[str, Any]:
        self.zero.save(directory / ZERO_CHECKPOINT_DIR)
        return {"zero": {"stage": self.cfg.parallel.zero_stage, "dir": ZERO_CHECKPOINT_DIR,
                         "world_size": self.mesh.world_size}}

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        self.zero.load(directory / ZERO_CHECKPOINT_DIR)


def stage_modules(models: list[TitansLM], mesh: Mesh, zigzag: bool = False) -> list[nn.Module]:
    """What the pipeline schedule runs for each of this rank's stages: with sp > 1 the relayed stage
    (`zigzag`: on zigzag pieces)."""
    return [SequenceStage(m, mesh, zigzag) if mesh.layout.sp > 1 else StageModule(m) for m in models]


@torch.no_grad()
def load_dense(models: list[TitansLM], weights: dict[str, Tensor]) -> None:
    """Set this rank's parameters from a dense state dict (any layout's consolidated weights): each takes
    its slice as the tensor-parallel split defines it (the vocabulary padded with zeros)."""
    for model in models:
        shard = getattr(model, "tensor_shard", None)
        for name, param in model.named_parameters():
            if name not in weights:
                raise ConfigError(f"train.init_from: the checkpoint has no parameter {name}: the model "
                                  "configs differ")
            full = local_slice(weights[name].to(param.device, param.dtype), param, shard)
            if full.shape != param.shape:
                raise ConfigError(f"train.init_from: {name} is {tuple(full.shape)} in the checkpoint and "
                                  f"{tuple(param.shape)} here: the model configs differ")
            param.copy_(full)


def build_engine(cfg: RunConfig, mesh: Mesh, precision: str,
                 initial: dict[str, Tensor] | None = None) -> Engine:
    """Model pieces for this rank → tensor / pipeline split → (initial weights) → optimizer → the engine
    for the layout."""
    p = cfg.parallel
    shard = TensorShard(mesh.tp_group, mesh.tp_rank, p.tp)
    models, stage_indices = build_local_model(cfg.model, p, mesh.pp_rank, shard, mesh.device, cfg.train.seed)
    for model in models:
        t = cfg.train
        model.checkpoint_blocks = t.activation_checkpointing and t.activation_checkpointing_every
        if cfg.train.compile:  # under sp a block sees one shard of each sequence
            compile_blocks(model, cfg.train.compile_backend, cfg.data.seq_len // p.sp, relay=p.sp > 1)
    if initial is not None:  # before the optimizer (and ZeRO) copy the parameters
        load_dense(models, initial)
    roots = []
    if p.fsdp and mesh.layout.dp == 1:
        mesh.print("note: parallel.fsdp=true with one data-parallel rank: nothing to shard, so nothing is")
    if p.fsdp and mesh.layout.dp > 1:  # before the optimizer: it must hold the sharded parameters
        zigzag = zigzag_split(cfg.model.layer_kinds, p.sp_split)
        options = {"shard": p.fsdp_shard, "relay": p.sp > 1, "zigzag": zigzag, "reshard": p.fsdp_reshard,
                   "policy": precision_policy(p.fsdp_param_dtype, p.fsdp_reduce_dtype, precision)}
        if p.pp > 1:  # the last stage's loss reads the head after the stage's forward: kept gathered
            roots = [apply_fsdp(module, m, mesh, pipeline=True, **options)
                     for module, m in zip(stage_modules(models, mesh, zigzag), models, strict=True)]
        else:
            loss_module = (SequenceLoss(models[0], mesh, head_loss_sum_of(models[0]), zigzag) if p.sp > 1 else
                           CausalLMLoss(models[0], vocab_parallel_loss(models[0]) or token_cross_entropy))
            roots = [apply_fsdp(loss_module, models[0], mesh, **options)]
    optimizer = make_optimizer(models, cfg, mesh)
    autocast = torch.autocast(mesh.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if p.pp > 1 and roots:
        return FsdpPipelineEngine(models, optimizer, mesh, cfg, autocast, stage_indices, roots)
    if p.pp > 1:
        return PipelineEngine(models, optimizer, mesh, cfg, autocast, stage_indices)
    if p.sp > 1 and roots:
        return FsdpSequenceEngine(models, optimizer, mesh, cfg, autocast, roots)
    if p.sp > 1:
        return SequenceEngine(models, optimizer, mesh, cfg, autocast)
    if roots:
        return FsdpEngine(models, optimizer, mesh, cfg, autocast, roots)
    if p.zero_stage > 0 and not mesh.layout.model_parallel:
        return DeepSpeedEngine(models, optimizer, mesh, cfg, autocast, precision)
    return ReplicaEngine(models, optimizer, mesh, cfg, autocast)
