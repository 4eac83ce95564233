"""Repeated passages: text rows that copy one of their own passages from beyond the window.

Why: a small model trained on a few million tokens of text learns no in-context copying at all, even
within its window (`pretrain/text_recall.py` measures it), so nothing in its loss can show whether the
long-term memory carries text past the window. Rewriting some rows as text that repeats itself — a
passage, the text that follows it, the passage again, then the text goes on — gives copying a reward on
real text, as the synthetic tasks do on keys and values. Every target stays a text target (weight 1).

The gap is drawn per row from a generator seeded by the row's own first tokens and `seed`, so a resumed
run rewrites each row exactly as before without any state of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


def repeat_passage(row: Tensor, passage: int, min_gap: int, seed: int) -> Tensor:
    """`row` (T + 1,) rewritten as row[:passage + gap] ‖ row[:passage] ‖ row[passage + gap:], cut back to
    its length: the passage read again `gap` tokens after its end, gap in [min_gap, T + 1 - 2·passage]."""
    length = len(row)
    max_gap = length - 2 * passage
    if max_gap < min_gap:
        raise ValueError(f"a repeated passage of {passage} tokens with a gap of at least {min_gap} does not "
                         f"fit a row of {length} tokens: lower data.repeat_passage or "
                         "data.repeat_min_gap")
    digest = hashlib.blake2b(f"{seed}:{row[:16].tolist()}".encode(), digest_size=4).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    gap = int(torch.randint(min_gap, max_gap + 1, (1,), generator=generator))
    return torch.cat([row[: passage + gap], row[:passage], row[passage + gap :]])[:length]


class RepeatedPassages:
    """A text loader whose first `rows` rows of each (B, T + 1) batch are `repeat_passage` rows."""

    def __init__(self, text: Any, rows: int, passage: int, min_gap: int, seed: int) -> None:
        self.text, self.rows, self.passage, self.min_gap, self.seed = text, rows, passage, min_gap, seed

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.text:
            batch = batch.clone()
            for i in range(min(self.rows, len(batch))):
                batch[i] = repeat_passage(batch[i], self.passage, self.min_gap, self.seed)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.text.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.text.load_state_dict(state)
