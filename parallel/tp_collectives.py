"""The two collectives of megatron's tensor parallelism, as autograd Functions that torch.compile traces.

    y = F.linear(copy_to_tp(x, group), w_columns, b)          # column-parallel: x's gradient summed over tp
    y = reduce_from_tp(F.linear(x, w_rows), group) + b        # row-parallel: the partial outputs summed

megatron-core's own layers and mappings break dynamo's graph: an all-reduce with `async_op=True` in their
backward, a `warnings.warn`, and a custom Function that returns its input as-is and is then modified in
place. While compiling these use functional collectives (`torch.distributed._functional_collectives`),
which return new tensors and trace into a graph, so a tensor-parallel block compiles whole
(`fullgraph=True`). The tensor-parallel linears take them only while compiling (parallel/tensor.py); the
memory's shared output norm always does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor


def _all_reduce(x: Tensor, group: Any) -> Tensor:
    """The sum over tp as a new tensor: the functional collective while compiling; eagerly c10d's
    in-place all-reduce on a copy, since a functional collective's eager result is a tensor subclass
    (it would become a parameter's `.grad` as is)."""
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x.contiguous(), "sum", group)
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over tp: every rank's columns read the same input."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Sums the ranks' partial outputs; backward is the identity: each partial output fed the whole sum."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def copy_to_tp(x: Tensor, group: Any) -> Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group: Any) -> Tensor:
    return _ReduceFromTP.apply(x, group)
