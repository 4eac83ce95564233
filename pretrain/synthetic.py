"""Synthetic long-context tasks, generated on the fly from a seed: needle retrieval and associative recall.

Every generator returns a `TaskBatch(tokens, positions, answers)`: `tokens` (B, T) the full input with
the answers in place (teacher forcing), `positions` (B, Q) the positions whose next-token logits must
predict `answers` (B, Q), i.e. `tokens[b, positions[b, q] + 1] == answers[b, q]`. Accuracy is
`argmax(logits[b, positions[b, q]]) == answers[b, q]` (`accuracy`).

The tasks live in a `TokenSpace`: disjoint sets of key, value and filler tokens plus a few markers.
For a byte vocabulary (256 or 257) they are readable text: keys are upper-case letters, values digits,
filler lower-case letters and spaces, so a needle reads `\\nKQ=7;` and its question `\\nKQ=` -> `7`.
Any other vocabulary of at least 64 tokens is partitioned by id.

- `needle`: one key–value pair planted early, filler, then the key asked for at `distance` tokens after
  the value (the distance is given by the caller, e.g. a multiple of the attention window).
- `mqar`: multi-query associative recall (Zoology, Arora et al. 2023): `n_pairs` key–value pairs, filler
  of `distance` tokens, then every key asked for once in a random order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class TaskBatch(NamedTuple):
    tokens: Tensor  # (B, T) int64
    positions: Tensor  # (B, Q) int64: logits at these positions predict ...
    answers: Tensor  # (B, Q) int64: ... these tokens


@dataclass(frozen=True)
class TokenSpace:
    """Disjoint token sets the tasks are written in, and the markers around pairs and questions."""

    keys: tuple[int, ...]
    values: tuple[int, ...]
    filler: tuple[int, ...]
    open: int  # before a key (a pair or a question)
    assign: int  # between key and value
    close: int  # after a pair's value

    def __post_init__(self) -> None:
        groups = [set(self.keys), set(self.values), set(self.filler), {self.open, self.assign, self.close}]
        if min(len(self.keys), len(self.values), len(self.filler)) < 2:
            raise ValueError("a token space needs at least 2 keys, values and filler tokens")
        if sum(len(g) for g in groups) != len(set().union(*groups)) or len(groups[3]) != 3:
            raise ValueError("keys, values, filler and markers of a token space must be disjoint")

    @classmethod
    def for_vocab(cls, vocab_size: int) -> TokenSpace:
        """Readable text for a byte vocabulary; an id partition for any other vocabulary (>= 64)."""
        if vocab_size in (256, 257):
            return cls(keys=tuple(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), values=tuple(b"0123456789"),
                       filler=tuple(b"abcdefghijklmnopqrstuvwxyz     "), open=ord("\n"), assign=ord("="),
                       close=ord(";"))
        if vocab_size < 64:
            raise ValueError(f"synthetic tasks need a vocabulary of at least 64 tokens, got {vocab_size}")
        n = min((vocab_size - 3) // 4, 256)  # keys, values: n each; filler: the rest up to 2n
        base = 3
        filler = tuple(range(base + 2 * n, min(vocab_size, base + 4 * n)))
        return cls(keys=tuple(range(base, base + n)), values=tuple(range(base + n, base + 2 * n)),
                   filler=filler, open=0, assign=1, close=2)

    @property
    def max_id(self) -> int:
        return max(*self.keys, *self.values, *self.filler, self.open, self.assign, self.close)


KEY_LEN = 2  # tokens per key: 26² = 676 keys in bytes


def _pick(choices: tuple[int, ...], shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    table = torch.tensor(choices, dtype=torch.long)
    return table[torch.randint(len(choices), shape, generator=gen)]


def _distinct_keys(space: TokenSpace, batch: int, count: int, gen: torch.Generator) -> Tensor:
    """(batch, count, KEY_LEN) keys, distinct within each sample."""
    n = len(space.keys)
    if count > n**KEY_LEN:
        raise ValueError(f"{count} distinct keys asked for, the token space has {n ** KEY_LEN}")
    table = torch.tensor(space.keys, dtype=torch.long)
    codes = torch.stack([torch.randperm(n**KEY_LEN, generator=gen)[:count] for _ in range(batch)])
    digits = [(codes // n**i) % n for i in reversed(range(KEY_LEN))]
    return table[torch.stack(digits, dim=-1)]


def needle(batch: int, distance: int, space: TokenSpace, seed: int = 0, max_offset: int = 16) -> TaskBatch:
    """Single-needle retrieval: `[filler] open key assign value close [filler ...] open key assign value`.

    The needle starts after 0..max_offset-1 filler tokens (random per sample); the question's answer
    comes exactly `distance` tokens after the needle's value, so every sample has the same length
    `max_offset + distance + KEY_LEN + 3` (the tail is padded with filler). One answer per sample.
    """
    if distance < KEY_LEN + 4:
        raise ValueError(f"distance must be >= {KEY_LEN + 4} (the question must not overlap the needle), "
                         f"got {distance}")
    gen = torch.Generator().manual_seed(seed)
    length = max_offset + KEY_LEN + 3 + distance
    tokens = _pick(space.filler, (batch, length), gen)
    keys = _distinct_keys(space, batch, 1, gen)[:, 0]
    values = _pick(space.values, (batch,), gen)
    offsets = torch.randint(max_offset, (batch,), generator=gen)
    positions = torch.empty(batch, 1, dtype=torch.long)
    for b in range(batch):
        o = int(offsets[b])
        pair = [space.open, *keys[b].tolist(), space.assign, int(values[b]), space.close]
        tokens[b, o : o + len(pair)] = torch.tensor(pair)
        value_at = o + KEY_LEN + 2
        answer_at = value_at + distance  # the value token of the question
        question = [space.open, *keys[b].tolist(), space.assign, int(values[b])]
        tokens[b, answer_at - len(question) + 1 : answer_at + 1] = torch.tensor(question)
        positions[b, 0] = answer_at - 1
    return TaskBatch(tokens, positions, values.unsqueeze(1))


def mqar(batch: int, distance: int, space: TokenSpace, n_pairs: int = 8, seed: int = 0,
         questions: int | None = None) -> TaskBatch:
    """Multi-query associative recall: `n_pairs` pairs `open key assign value close`, filler of
    `distance` tokens, then every key asked for once (random order) as `open key assign value`.

    Distinct keys per sample; values are drawn independently (they may repeat). The first question
    starts `distance` tokens after the last pair. `questions` < n_pairs asks only that many of the keys
    (the first of the random order): then the last answer cannot be had by elimination, from the values
    seen without their keys, so every answer needs the key's own value.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    questions = n_pairs if questions is None else questions
    if not 1 <= questions <= n_pairs:
        raise ValueError(f"mqar asks 1 to n_pairs={n_pairs} of its keys, got questions={questions}")
    gen = torch.Generator().manual_seed(seed)
    pair_len = KEY_LEN + 4  # open, key, assign, value, close
    question_len = KEY_LEN + 3  # open, key, assign, value
    keys = _distinct_keys(space, batch, n_pairs, gen)  # (B, P, K)
    values = _pick(space.values, (batch, n_pairs), gen)
    order = torch.stack([torch.randperm(n_pairs, generator=gen) for _ in range(batch)])  # question order
    order = order[:, :questions]
    filler = _pick(space.filler, (batch, distance), gen)
    col = lambda t, n=n_pairs: torch.full((batch, n, 1), t, dtype=torch.long)  # noqa: E731
    pairs = torch.cat([col(space.open), keys, col(space.assign), values.unsqueeze(-1), col(space.close)], -1)
    asked_keys = keys.gather(1, order.unsqueeze(-1).expand(-1, -1, KEY_LEN))
    answers = values.gather(1, order)
    asked = torch.cat([col(space.open, questions), asked_keys, col(space.assign, questions),
                       answers.unsqueeze(-1)], -1)
    tokens = torch.cat([pairs.flatten(1), filler, asked.flatten(1)], dim=1)
    start = n_pairs * pair_len + distance
    positions = start + torch.arange(questions) * question_len + KEY_LEN + 1  # the assign tokens
    return TaskBatch(tokens, positions.expand(batch, -1).clone(), answers)


def accuracy(logits: Tensor, answers: Tensor) -> Tensor:
    """Per-answer correctness (B, Q) bool from logits (B, Q, vocab) at the answer positions."""
    return logits.argmax(-1) == answers


def value_chance(space: TokenSpace) -> float:
    """Accuracy of guessing uniformly among the value tokens (a model that learnt only the format)."""
    return 1.0 / len(space.values)


TRAINING_TASKS = ("needle", "mqar")
MQAR_TRAINING_PAIRS = 4


NEEDLE_MAX_OFFSET = 16  # `needle`'s default: the pair starts within the first 16 tokens


def training_distances(task: str, length: int, min_distance: int = 0,
                       n_pairs: int = MQAR_TRAINING_PAIRS) -> tuple[int, int]:
    """The (shortest, longest) question–answer distance of a `task` row of `length` tokens (mqar: with
    `n_pairs` pairs); a ValueError naming the task if there is none (also how the run config checks its
    synthetic_* fields)."""
    if task not in TRAINING_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TRAINING_TASKS)}")
    min_distance = max(min_distance, KEY_LEN + 4)
    if task == "needle":  # filler before the pair, the pair and the question
        overhead = NEEDLE_MAX_OFFSET + KEY_LEN + 3
    else:  # the pairs and the questions
        if n_pairs < 1:
            raise ValueError(f"mqar needs at least 1 key-value pair, got {n_pairs}")
        overhead = n_pairs * (2 * KEY_LEN + 7)
    if length - overhead < min_distance:
        raise ValueError(f"a {task} sequence needs at least {overhead + min_distance} tokens, got {length}")
    return min_distance, length - overhead


def distance_range(task: str, length: int, min_distance: int, n_pairs: int, max_distance: int
                   ) -> tuple[int, int]:
    """The (shortest, longest) distance a training sequence of `length` tokens draws from:
    `training_distances`' range, capped at `max_distance` (0: no cap)."""
    min_distance, longest = training_distances(task, length, min_distance, n_pairs)
    max_distance = min(longest, max_distance) if max_distance else longest
    if max_distance < min_distance:
        raise ValueError(f"synthetic max distance {max_distance} is below the min distance {min_distance}")
    return min_distance, max_distance


def draw_instances(task: str, batch: int, distances: tuple[int, int], space: TokenSpace, gen: torch.Generator,
                   n_pairs: int, questions: int | None) -> TaskBatch:
    """`batch` instances of the task at one distance drawn log-uniformly from `distances`, from `gen`."""
    lo, hi = distances
    u = float(torch.rand((), generator=gen))
    distance = min(hi, int(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
    seed = int(torch.randint(2**62, (), generator=gen))
    if task == "needle":
        return needle(batch, distance, space, seed=seed, max_offset=NEEDLE_MAX_OFFSET)
    return mqar(batch, distance, space, n_pairs=n_pairs, seed=seed, questions=questions)


def training_rows(task: str, rows: int, length: int, space: TokenSpace, seed: int,
                  min_distance: int = 0, n_pairs: int = MQAR_TRAINING_PAIRS, max_distance: int = 0,
                  pack: bool = False, questions: int | None = None) -> tuple[Tensor, Tensor]:
    """Synthetic training sequences of exactly `length` tokens, to mix into a text batch.

    Returns tokens (rows, length) and `answers` (rows, length - 1) bool over the next-token targets
    (target p is token p + 1): True where the target is an answer, the only tokens worth a loss (the
    filler is noise). Each row draws its distance log-uniformly from `min_distance` to `max_distance`
    (0: the task's minimum / the longest that fits), so training sees answers both inside and far beyond
    the attention span; filler pads the tail. `n_pairs`: key-value pairs per mqar row, `questions` of
    them asked (None: all).

    `pack`: a row holds task instances back to back, each with its own distance (drawn as above) and keys,
    until the next one would not fit: more answers per row when the distances are short. The memory is
    not reset between them; a key may recur in a later instance with a new value, which that instance's
    questions ask for.
    """
    distances = distance_range(task, length, min_distance, n_pairs, max_distance)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.empty(rows, length, dtype=torch.long)
    answers = torch.zeros(rows, length - 1, dtype=torch.bool)
    for r in range(rows):
        at = 0
        while True:
            made = draw_instances(task, 1, distances, space, gen, n_pairs, questions)
            n = made.tokens.shape[1]
            if at + n > length:  # only when packing: the first instance always fits
                break
            tokens[r, at : at + n] = made.tokens[0]
            answers[r, at + made.positions[0]] = True
            at += n
            if not pack:
                break
        tokens[r, at:] = _pick(space.filler, (length - at,), gen)
    return tokens, answers


def instance_batch(task: str, batch: int, length: int, space: TokenSpace, seed: int, min_distance: int = 0,
                   n_pairs: int = MQAR_TRAINING_PAIRS, max_distance: int = 0, questions: int | None = None
                   ) -> tuple[Tensor, Tensor]:
    """`batch` separate task sequences, one instance each from the sequence's first token, all at one
    distance drawn log-uniformly as in `training_rows` (for rows of `length` tokens). Returns tokens
    (batch, n + 1), n + 1 the instance's length, and `answers` (batch, n) bool over the next-token targets.

    Why not rows of the text batch: every instance starts on the memory's initial state, as the evaluation
    asks it, and a step holds as many instances as it has sequences, at the tokens their distance needs.
    """
    made = draw_instances(task, batch, distance_range(task, length, min_distance, n_pairs, max_distance),
                          space, torch.Generator().manual_seed(seed), n_pairs, questions)
    answers = torch.zeros(batch, made.tokens.shape[1] - 1, dtype=torch.bool)
    return made.tokens, answers.scatter_(1, made.positions, True)
