"""The head and its cross-entropy as one autograd function that never recomputes the head.

The plain chunked loss (`pretrain.loss.head_loss_sum` with checkpointing) keeps no B·T·V logits, but pays
for it in backward: each chunk's logits are computed again (a fourth head matmul where the FLOP count
has three) and its log-softmax twice. Here the loss is a sum, so its gradient is known up to the one
scalar that flows back: each chunk's gradients with respect to the features and the head weight are
computed right after its logits, in the forward pass, and backward only scales them. Per chunk: one
matmul for the logits, one exp pass for the softmax (in place), two matmuls for the gradients: exactly
the 3 × forward the FLOP count assumes, with the same O(chunk · V) memory.

Same function as `F.cross_entropy(head(x).float(), y, reduction="none")` summed (weighted), ignore
index -100 included; tested against it in tests/test_linear_cross_entropy.py.

A tensor-parallel head holds a slice of the vocabulary rows (`VocabSplit`). Each rank computes its slice's
logits; the softmax needs three numbers per token from the whole vocabulary (the max, the sum of exps and
the target's logit), so each chunk all-reduces them over the tp group: the max, then the sum and the
target logit together. The head weight's gradient is local to the slice; the features' gradient is a sum
over the slices, all-reduced once per call (what the column-parallel head's backward would do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100  # F.cross_entropy's default: such targets contribute no loss and no gradient


def fusable(head: nn.Module) -> bool:
    """Whether `head` is a plain bias-free linear whose weight can be used directly: not split into a
    DTensor (tensor parallelism), and without forward hooks that could change what its weight is, except
    ZeRO-3's. ZeRO-3 partitions the weight and gathers it in the head's own forward hook; a read of the
    weight inside the engine's forward gathers it too (DeepSpeed registers it as an external parameter
    of the running module), and its gradient is reduced by the weight's own hooks, whoever computed it.
    Outside the engine's forward the read gives the empty partition: not fusable."""
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    weight = head.weight  # under ZeRO-3, inside the engine's forward, this read gathers the weight
    if hasattr(weight, "ds_id"):
        return weight.shape == (head.out_features, head.in_features)
    return not isinstance(weight, DTensor) and not head._forward_pre_hooks and not head._forward_hooks


@dataclass(frozen=True)
class VocabSplit:
    """The vocabulary rows a tensor-parallel head holds: rows [start, start + its rows) of a vocabulary
    padded to a multiple of tp; rows at or past `vocab_size` are padding and take no probability."""

    group: Any  # the tp process group holding the other slices
    start: int
    vocab_size: int


def _matmul_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast would run the head's matmul in (the weight's dtype without autocast)."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


class LinearCrossEntropySum(torch.autograd.Function):
    """Σ_i w_i · CE(x_i Wᵀ, y_i) over chunks of `chunk_tokens` rows; gradients computed in forward. With a
    `split`, W is this rank's slice of the vocabulary rows and the sum is over the whole vocabulary."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, targets: Tensor, weights: Tensor | None,
                chunk_tokens: int, split: VocabSplit | None) -> Tensor:
        dtype = _matmul_dtype(weight)
        acc = torch.promote_types(dtype, torch.float32)  # the softmax and the sums: float32 at least
        w_mm = weight.to(dtype)
        rows_here = weight.shape[0]
        start = split.start if split else 0
        padding_from = split.vocab_size - start if split else rows_here  # local index of the first pad row

        def all_reduce(t: Tensor, op: torch_dist.ReduceOp.RedOpType = torch_dist.ReduceOp.SUM) -> Tensor:
            if split is not None:
                torch_dist.all_reduce(t, op=op, group=split.group)
            return t

        with torch.autocast(features.device.type, enabled=False):
            total = features.new_zeros((), dtype=acc)
            grad_features = torch.empty_like(features)
            grad_weight = torch.zeros_like(weight, dtype=acc)
            for first in range(0, features.shape[0], chunk_tokens):
                rows = slice(first, first + chunk_tokens)
                x, y = features[rows].to(dtype), targets[rows]
                scale = (y != IGNORE_INDEX).to(acc)  # per-row weight of the loss and its gradient
                if weights is not None:
                    scale = scale * weights[rows].to(acc)
                y = y - start  # the target's row in this slice; outside [0, rows_here) it is elsewhere
                here = ((y >= 0) & (y < rows_here)).to(acc)
                y = y.clamp(0, rows_here - 1)[:, None]
                logits = (x @ w_mm.t()).to(acc)
                if padding_from < rows_here:
                    logits[:, padding_from:] = float("-inf")
                target_logit = logits.gather(1, y).squeeze(1) * here
                top = all_reduce(logits.amax(1, keepdim=True), torch_dist.ReduceOp.MAX)
                exp = logits.sub_(top).exp_()  # in place: the logits become exp(logit - max)
                sums = all_reduce(torch.cat([exp.sum(1, keepdim=True), target_logit[:, None]], 1))
                normaliser, target_logit = sums[:, :1], sums[:, 1]
                total += ((top + normaliser.log()).squeeze(1) - target_logit).mul(scale).sum()
                # d(w·CE)/d logits = w · (softmax - one-hot), built in the same buffer
                hit = (scale * here)[:, None]  # the one-hot's weight: zero where the target is elsewhere
                grad_logits = exp.mul_(scale[:, None] / normaliser).scatter_add_(1, y, -hit)
                grad_logits = grad_logits.to(dtype)
                grad_features[rows] = (grad_logits @ w_mm).to(features.dtype)
                grad_weight += grad_logits.t() @ x
            all_reduce(grad_features)
        ctx.save_for_backward(grad_features, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grad_features, grad_weight = ctx.saved_tensors
        return grad_features * grad_total, grad_weight * grad_total, None, None, None, None


def linear_cross_entropy_sum(features: Tensor, weight: Tensor, targets: Tensor,
                             weights: Tensor | None = None, chunk_tokens: int = 2048,
                             split: VocabSplit | None = None) -> Tensor:
    """Σ (w ·) cross-entropy of features (N, dim) @ weight (V, dim)ᵀ against targets (N,); with `split`,
    weight is this rank's slice of the vocabulary rows (the same total on every rank of its group)."""
    return LinearCrossEntropySum.apply(features, weight, targets, weights, chunk_tokens, split)
