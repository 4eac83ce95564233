"""Repeated passages: text rows that copy one of their own passages from beyond the window.

Why: a small model trained on a few million tokens of text learns no in-context copying at all, even
within its window (`pretrain/text_recall.py` measures it), so nothing in its loss can show whether the
long-term memory carries text past the window. Rewriting some rows as text that repeats itself — a
passage, the text that follows it, the passage again, then the text goes on — gives copying a reward on
real text, as the synthetic tasks do on keys and values. Every target stays a text target; with `weight`
other than 1 the targets a copy predicts (the second reading's tokens after its first) weigh that much,
so that copying is not drowned by the ~2,000 other targets of the row.

The gap is drawn per row from a generator seeded by the row's own first tokens and `seed`, so a resumed
run rewrites each row exactly as before without any state of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from pretrain.batch import Batch


def draw_gap(row: Tensor, passage: int, min_gap: int, seed: int) -> int:
    """The gap, in [min_gap, T + 1 - 2·passage], after which `row` (T + 1,) reads its passage again."""
    length = len(row)
    max_gap = length - 2 * passage
    if max_gap < min_gap:
        raise ValueError(f"a repeated passage of {passage} tokens with a gap of at least {min_gap} does not "
                         f"fit a row of {length} tokens: lower data.repeat_passage or "
                         "data.repeat_min_gap")
    digest = hashlib.blake2b(f"{seed}:{row[:16].tolist()}".encode(), digest_size=4).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    return int(torch.randint(min_gap, max_gap + 1, (1,), generator=generator))


def repeat_passage(row: Tensor, passage: int, min_gap: int, seed: int) -> Tensor:
    """`row` (T + 1,) rewritten as row[:passage + gap] ‖ row[:passage] ‖ row[passage + gap:], cut back to
    its length: the passage read again `gap` (`draw_gap`) tokens after its end."""
    return rewrite(row, passage, min_gap, seed)[0]


def copy_targets(row: Tensor, passage: int, min_gap: int, seed: int) -> slice:
    """The next-token targets of `repeat_passage(row, ...)` that a copy of the first reading predicts:
    target p (token p + 1) for the second reading's tokens after its first (the first follows other text,
    so no copy predicts it)."""
    return rewrite(row, passage, min_gap, seed)[1]


def rewrite(row: Tensor, passage: int, min_gap: int, seed: int) -> tuple[Tensor, slice]:
    """`repeat_passage` and `copy_targets` of `row` from one drawn gap."""
    gap = draw_gap(row, passage, min_gap, seed)
    start = passage + gap  # where the second reading begins
    repeated = torch.cat([row[:start], row[:passage], row[start:]])[: len(row)]
    return repeated, slice(start, start + passage - 1)


class RepeatedPassages:
    """A text loader whose first `rows` rows of each (B, T + 1) batch are `repeat_passage` rows: tensors,
    or with `weight` other than 1 `Batch`es whose copy targets (`copy_targets`) weigh `weight`."""

    def __init__(self, text: Any, rows: int, passage: int, min_gap: int, seed: int,
                 weight: float = 1.0) -> None:
        self.text, self.rows, self.passage, self.min_gap, self.seed = text, rows, passage, min_gap, seed
        self.weight = weight

    def __iter__(self) -> Iterator[Tensor | Batch]:
        for batch in self.text:
            batch = batch.clone()
            weights = None if self.weight == 1 else torch.ones(batch.shape[0], batch.shape[1] - 1)
            for i in range(min(self.rows, len(batch))):
                batch[i], targets = rewrite(batch[i], self.passage, self.min_gap, self.seed)
                if weights is not None:
                    weights[i, targets] = self.weight
            yield batch if weights is None else Batch(batch, weights)

    def state_dict(self) -> dict[str, Any]:
        return self.text.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.text.load_state_dict(state)
