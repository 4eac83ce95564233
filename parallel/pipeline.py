"""Pipeline parallelism for TitansLM: contiguous groups of blocks per stage, micro-batches, 1F1B,
interleaved 1F1B and GPipe schedules.

    stages = [pipeline_stage(model_for(s), s, n_stages) for s in stage_ids(mesh.pp_rank, pp, per_rank)]
    pipe = Pipeline(stages, ids, n_stages, mesh, "1f1b", microbatches=8, head_loss_sum=...)
    loss = pipe.train_step(inputs, targets, weights, denominator)  # on the last stage, None elsewhere

The first stage holds the embedding, the last the final norm, the head and the loss; a stage's model is
a TitansLM with the other blocks removed (`titans/` knows nothing of this: its forward passes hidden
states through when the embedding or the head is absent, and its blocks keep their global names).
Training sequences start from the initial memory, so no memory state crosses micro-batches or stages:
only activations (B, T, dim) travel between stages.

Why `torch.distributed.pipelining`: megatron-core's schedules and p2p call CUDA, and DeepSpeed's
`PipelineModule` has one 1F1B-style schedule and no interleaving; torch's schedules (GPipe, 1F1B,
interleaved 1F1B, zero-bubble) run on CPU/gloo and NCCL alike. The stages are not wrapped in DDP (its
bucket rebuild asserts under a schedule that runs several backward passes per step): the engine
averages the gradients over the data-parallel group once per step (`parallel.grads.average_gradients`),
and ZeRO-1 shards the optimizer over the same group (pretrain/engine.py).

Interleaved: with v stages per rank, rank r holds stages r, r + pp, …, r + (v−1)·pp, so a micro-batch
visits every rank v times and the bubble shrinks by v.

Tied embeddings with pp > 1: the first stage's embedding and the last stage's head start equal (both are
slices of one dense init) and their gradients are summed between the two (`sync_tied_gradients`), so
they stay equal, as one shared matrix would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from parallel.fsdp import local
from parallel.mesh import Mesh
from titans.model import TitansLM

# Σ (w ·) loss of head(features) against targets: (features, head, targets, weights or None) -> scalar
HeadLossSum = Callable[[Tensor, nn.Module, Tensor, Tensor | None], Tensor]


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, equal groups of layer indices, one per stage."""
    if n_layers % n_stages:
        raise ValueError(f"model.n_layers={n_layers} does not split into {n_stages} pipeline stages")
    per = n_layers // n_stages
    return [range(s * per, (s + 1) * per) for s in range(n_stages)]


def stage_ids(pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """The stages rank `pp_rank` holds: one, or `per_rank` interleaved ones (r, r + pp, …)."""
    return [pp_rank + i * pp for i in range(per_rank)]


def pipeline_stage(model: TitansLM, stage: int, n_stages: int) -> TitansLM:
    """Keep only stage `stage`'s blocks (and the embedding on the first stage, the final norm and head on
    the last), in place; returns the model."""
    keep = {str(i) for i in stage_layers(len(model.cfg.layer_kinds), n_stages)[stage]}
    for name in list(model.blocks):
        if name not in keep:
            del model.blocks[name]
    tied = model.cfg.tie_embeddings
    model.pipeline_stage = stage
    if stage > 0:
        model.embed = None
    if stage < n_stages - 1:
        model.norm = model.head = None
    elif tied and stage > 0:  # the head holds its own copy of the tied matrix: not counted twice
        model.head.weight = nn.Parameter(model.head.weight.detach().clone())
        model.head.weight.tied_copy = True
    return model


class StageModule(nn.Module):
    """A stage as the schedule sees it: hidden states (or token ids) in, hidden states (or final
    features) out; the memory states stay inside the stage."""

    def __init__(self, model: TitansLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.hidden_states(x)[0]


SCHEDULES = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe", "interleaved": "ScheduleInterleaved1F1B"}


class Pipeline:
    """This rank's stages and the schedule that runs them."""

    def __init__(self, stages: list[TitansLM], stage_indices: list[int], n_stages: int, mesh: Mesh,
                 schedule: str, microbatches: int, head_loss_sum: HeadLossSum,
                 modules: list[nn.Module] | None = None,
                 micro_shape: tuple[int, int] | None = None) -> None:
        """`modules`: what the schedule runs per stage (default `StageModule`s). `micro_shape`: (rows,
        tokens) of a micro-batch, to give the stages their input and output shapes up front instead of
        inferring them from a trial forward and backward (which a stage with side effects, such as the
        sequence relay's, must not run)."""
        from torch.distributed import pipelining

        self.head_loss_sum = head_loss_sum
        modules = modules or [StageModule(m) for m in stages]
        self.stages = [pipelining.PipelineStage(module, i, n_stages, mesh.device, group=mesh.pp_group,
                                                **self._shapes(m, i, micro_shape, mesh.device))
                       for module, m, i in zip(modules, stages, stage_indices, strict=True)]
        self.last = next((m for m, i in zip(stages, stage_indices) if i == n_stages - 1), None)
        self._denominator: Tensor | int = 1
        cls = getattr(pipelining, SCHEDULES[schedule])
        # scale_grads=False: the loss of a micro-batch is already its share of the batch loss
        stage_arg = self.stages if schedule == "interleaved" else self.stages[0]
        self.schedule = cls(stage_arg, microbatches, loss_fn=self._loss, scale_grads=False)

    @staticmethod
    def _shapes(model: TitansLM, stage: int, micro_shape: tuple[int, int] | None, device: torch.device
                ) -> dict[str, Tensor]:
        if micro_shape is None:
            return {}
        dtype = next(model.parameters()).dtype  # the residual stream stays in it under autocast
        # requires_grad: the received activations must, or the stage's backward never reaches its input
        hidden = torch.empty(*micro_shape, model.cfg.dim, dtype=dtype, device=device, requires_grad=True)
        tokens = torch.empty(micro_shape, dtype=torch.long, device=device)
        return {"input_args": tokens if stage == 0 else hidden, "output_args": hidden,
                "input_grads": None if stage == 0 else hidden, "output_grads": hidden}

    def _loss(self, features: Tensor, packed: Tensor) -> Tensor:
        """A micro-batch's share of the batch loss: Σ (w·) ce / the batch's denominator."""
        targets, weights = (packed, None) if packed.dim() == 2 else (packed[..., 0].long(), packed[..., 1])
        return self.head_loss_sum(features, self.last.head, targets, weights) / self._denominator

    @staticmethod
    def _pack(targets: Tensor, weights: Tensor | None) -> Tensor:
        # the schedule splits one target tensor per micro-batch: weights travel with their targets
        if weights is None:
            return targets
        return torch.stack([targets.double(), weights.double()], dim=-1)

    def _run(self, step: Callable, inputs: Tensor, targets: Tensor, weights: Tensor | None,
             denominator: Tensor | float) -> Tensor | None:
        self._denominator = denominator
        losses: list[Tensor] = []
        first = any(s.is_first for s in self.stages)
        args = (inputs,) if first else ()
        target = self._pack(targets, weights) if self.last is not None else None
        step(*args, target=target, losses=losses)
        return torch.stack(losses).sum().detach() if self.last is not None else None

    def train_step(self, inputs: Tensor, targets: Tensor, weights: Tensor | None,
                   denominator: Tensor | float) -> Tensor | None:
        """Forward and backward of one batch over all micro-batches; the gradients of Σ (w·) ce /
        `denominator` are added to the stages' parameters. Returns that loss on the rank holding the last
        stage, None elsewhere."""
        return self._run(self.schedule.step, inputs, targets, weights, denominator)

    @torch.no_grad()
    def eval_loss(self, inputs: Tensor, targets: Tensor, weights: Tensor | None,
                  denominator: Tensor | float) -> Tensor | None:
        return self._run(self.schedule.eval, inputs, targets, weights, denominator)


def sync_tied_gradients(models: list[TitansLM], mesh: Mesh) -> None:
    """Sum the tied embedding's gradient between the first stage (embedding) and the last (head)."""
    if mesh.embedding_group is None or not any(m.cfg.tie_embeddings for m in models):
        return
    for model in models:
        for module in (model.embed, model.head):
            if module is not None and module.weight.grad is not None:  # (an FSDP shard: the same slice)
                torch_dist.all_reduce(local(module.weight.grad), group=mesh.embedding_group)
