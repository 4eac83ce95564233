"""A training batch: token sequences and, when some targets weigh differently, their loss weights."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Batch(NamedTuple):
    """Training sequences and, when some targets weigh differently (synthetic tasks, copy targets of
    repeated passages), their loss weights."""

    tokens: Tensor  # (B, T + 1)
    weights: Tensor | None  # (B, T) weight of each next-token target; None: every target weighs 1

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.tokens), move(self.weights))


def as_batch(batch: Tensor | Batch) -> Batch:
    """A loader's plain tensor as a `Batch` of targets that all weigh 1."""
    return batch if isinstance(batch, Batch) else Batch(batch, None)
