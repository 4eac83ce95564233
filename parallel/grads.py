"""Gradient norm and clipping over a model split across ranks.

Each parameter is counted once over the model replica: a tensor-parallel shard by every tp rank (the
shards are disjoint), a replicated parameter by tp rank 0 only, the last stage's copy of a tied
embedding not at all (the first stage counts it); the squares are summed over the model-parallel group
(tp × pp). Data-parallel replicas hold the same averaged gradients after DDP, so they agree without
talking; under FSDP each holds a slice of them, and the squares are summed over the slices first. On one
process this is `torch.nn.utils.clip_grad_norm_`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as torch_dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from parallel.fsdp import is_sharded, local, shard_group
from parallel.mesh import Mesh


def reduce_gradients(params: Iterable[Tensor], group, divisor: int = 1) -> None:
    """Sum the gradients over `group` (then divide), in one flat all-reduce per dtype. A parameter this
    rank did not use (e.g. the initial memory on a later sequence shard) takes part with zeros, so every
    rank reduces the same buffers. FSDP gradients: their slices (the ranks of `group` hold the same ones)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [local(p.grad) for p in params]
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(same)
        torch_dist.all_reduce(flat, group=group)
        if divisor != 1:
            flat /= divisor
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same), strict=True):
            g.copy_(reduced)


def average_gradients(params: Iterable[Tensor], mesh: Mesh) -> None:
    """Average the gradients over the data-parallel group (what DDP does per bucket, after the whole
    backward instead of overlapped with it)."""
    if mesh.layout.dp > 1:
        reduce_gradients(params, mesh.dp_group, mesh.layout.dp)


def counted_here(param: Tensor, mesh: Mesh) -> bool:
    if getattr(param, "tied_copy", False):
        return False
    return getattr(param, "tensor_model_parallel", False) or mesh.tp_rank == 0


def clip_grad_norm_(params: Iterable[Tensor], max_norm: float, mesh: Mesh) -> float:
    """Scale the gradients so that their global norm is at most `max_norm` (0: no clipping, as in
    Megatron-LM and DeepSpeed; torch's own would scale every gradient to zero); returns the norm before."""
    max_norm = max_norm if max_norm > 0 else math.inf
    params = [p for p in params if p.grad is not None]
    sharded = next((p.grad for p in params if is_sharded(p.grad)), None)  # FSDP: slices
    if not mesh.layout.model_parallel and sharded is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    square = torch.zeros((), dtype=torch.float64, device=mesh.device)
    for p in params:
        if counted_here(p, mesh):
            square += local(p.grad).detach().double().square().sum()
    if sharded is not None:
        torch_dist.all_reduce(square, group=shard_group(sharded))
    if mesh.layout.model_parallel:
        torch_dist.all_reduce(square, group=mesh.model_parallel_group)
    norm = math.sqrt(square.item())
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:  # as clip_grad_norm_: a non-finite norm leaves the gradients for the caller to skip
        for p in params:
            p.grad.mul_(scale)
    return norm
