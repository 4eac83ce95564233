"""The training loss: next-token cross-entropy over the vocabulary, chunked so that B·T·V logits never exist.

    loss = causal_lm_loss(model, tokens[:, :-1], tokens[:, 1:])            # mean over tokens
    loss = causal_lm_loss(model, inputs, targets, weights=w)               # Σ w·ce / Σ w

The model returns features (`TitansLM.hidden_states`); the head and the loss run `chunk_tokens` tokens
at a time and are recomputed in backward, so a 32K-vocabulary head costs O(chunk · V) memory instead of
O(B · T · V). `cross_entropy` is per-token (reduction "none"): `F.cross_entropy` on one process,
`parallel.tensor.VocabParallelCrossEntropy` when the head is split over tensor-parallel ranks. In
training, a plain head (`fusable`, or a tensor-parallel one its cross-entropy can `split_of`) takes
`pretrain.linear_cross_entropy`, which computes the gradients in forward instead of recomputing the head
in backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pretrain.linear_cross_entropy import fusable, linear_cross_entropy_sum

CrossEntropy = Callable[[Tensor, Tensor], Tensor]  # (logits (N, V[/tp]), targets (N,)) -> per-token (N,)


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def head_loss_sum(
    features: Tensor, head: nn.Module, targets: Tensor, weights: Tensor | None = None,
    cross_entropy: CrossEntropy = token_cross_entropy, chunk_tokens: int = 2048,
) -> Tensor:
    """Σ (w ·) cross-entropy of `head(features)` against targets, `chunk_tokens` tokens at a time.
    features (..., dim); targets and weights (...)."""
    features, targets = features.flatten(0, -2), targets.flatten()
    training = torch.is_grad_enabled()
    if training:
        split = cross_entropy.split_of(head) if hasattr(cross_entropy, "split_of") else None
        if split is not None or (cross_entropy is token_cross_entropy and fusable(head)):
            return linear_cross_entropy_sum(features, head.weight, targets,
                                            None if weights is None else weights.flatten(), chunk_tokens,
                                            split)
    pieces = [features.split(chunk_tokens), targets.split(chunk_tokens)]
    if weights is not None:
        pieces.append(weights.flatten().float().split(chunk_tokens))

    def piece_sum(x: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor:
        logits = head(x)  # the softmax in float32 at least (float64 for a float64 model, as fused)
        ce = cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)
        return ce.sum() if w is None else (ce * w).sum()

    total = features.new_zeros((), dtype=torch.float32)
    for piece in zip(*pieces, strict=True):
        if training:
            total = total + checkpoint(piece_sum, *piece, use_reentrant=False)
        else:
            total = total + piece_sum(*piece)
    return total


def loss_denominator(targets: Tensor, weights: Tensor | None) -> Tensor | int:
    """What the batch's loss sum is divided by: the number of targets, or the sum of their weights."""
    return targets.numel() if weights is None else weights.float().sum()


def causal_lm_loss(
    model: nn.Module, inputs: Tensor, targets: Tensor, weights: Tensor | None = None,
    cross_entropy: CrossEntropy = token_cross_entropy, chunk_tokens: int = 2048,
) -> Tensor:
    """Mean (or `weights`-weighted mean) next-token cross-entropy of a TitansLM on inputs → targets."""
    features, _ = model.hidden_states(inputs)
    total = head_loss_sum(features, model.head, targets, weights, cross_entropy, chunk_tokens)
    return total / loss_denominator(targets, weights)


class CausalLMLoss(nn.Module):
    """The model with its loss, as one module: what DDP or a DeepSpeed engine wraps, so that their
    forward hooks (gradient sync, ZeRO-3 parameter gathering) see the head and the loss too."""

    def __init__(self, model: nn.Module, cross_entropy: CrossEntropy = token_cross_entropy) -> None:
        super().__init__()
        self.model = model
        self.cross_entropy = cross_entropy

    def forward(self, inputs: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
        return causal_lm_loss(self.model, inputs, targets, weights, self.cross_entropy)
