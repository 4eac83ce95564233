"""The order in which one reader (a dp rank's DataLoader worker) sees samples: a pure function of
(seed, source, epoch, reader), so that a position is two integers per source and resume is exact.

- epoch shards: the source's shards permuted by a seeded generator per epoch (the same permutation on
  every reader) and dealt round-robin to the `readers = dp_size × num_workers` readers; in `resampled`
  mode each reader instead draws shards with replacement (an "epoch" is then ⌈shards / readers⌉ draws).
- samples: the epoch's shards read in that order through a shuffle buffer seeded per (epoch, reader).
- `SourceCursor` walks epoch after epoch; its position is (epoch, samples taken in that epoch). Resuming
  rebuilds that epoch's stream and drops the samples already taken: it re-reads at most one epoch of this
  reader's share of the data and never depends on earlier epochs.
- `Mixture` picks the source of each sample with a seeded numpy generator whose state is saved.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from data_pipeline.errors import DataError

Sample = tuple[str, np.ndarray]  # (key, ids of one sample)
Loader = Callable[[int], tuple[list[str], np.ndarray] | None]  # shard index → samples (None: skipped)


def epoch_shards(n_shards: int, readers: int, reader: int, seed: int, source: int, epoch: int,
                 shuffle: bool = True, resampled: bool = False) -> list[int]:
    """Indices of the shards `reader` reads in `epoch` (disjoint across readers unless resampled)."""
    if resampled:
        rng = random.Random(f"resample/{seed}/{source}/{epoch}/{reader}")
        return [rng.randrange(n_shards) for _ in range(math.ceil(n_shards / readers))]
    order = list(range(n_shards))
    if shuffle:
        random.Random(f"shards/{seed}/{source}/{epoch}").shuffle(order)
    return order[reader::readers]


def buffered(shards: list[int], load: Loader, buffer: int, rng: random.Random | None) -> Iterator[Sample]:
    """Samples of `shards` in order, passed through a shuffle buffer of `buffer` samples (rng None: none)."""
    pool: list[Sample] = []
    for shard in shards:
        loaded = load(shard)
        if loaded is None:
            continue
        keys, tokens = loaded
        for key, row in zip(keys, tokens):
            if rng is None:
                yield key, row
                continue
            pool.append((key, row))
            if len(pool) >= buffer:
                i = rng.randrange(len(pool))
                pool[i], pool[-1] = pool[-1], pool[i]
                yield pool.pop()
    if rng is not None:
        rng.shuffle(pool)
        yield from pool


class SourceCursor:
    """One source's sample stream for one reader, epoch after epoch (`epochs=None`: forever)."""

    def __init__(self, name: str, index: int, n_shards: int, load: Loader, *, readers: int, reader: int,
                 seed: int, epochs: int | None, shuffle: bool, resampled: bool, buffer: int,
                 epoch: int = 0, taken: int = 0) -> None:
        self.name, self.index, self.n_shards, self.load = name, index, n_shards, load
        self.readers, self.reader, self.seed, self.epochs = readers, reader, seed, epochs
        self.shuffle, self.resampled, self.buffer = shuffle, resampled, buffer
        self.epoch, self.taken = epoch, taken
        self._it: Iterator[Sample] | None = None

    @property
    def finished(self) -> bool:
        return self.epochs is not None and self.epoch >= self.epochs

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "taken": self.taken}

    def _open_epoch(self) -> Iterator[Sample]:
        shards = epoch_shards(self.n_shards, self.readers, self.reader, self.seed, self.index, self.epoch,
                              self.shuffle, self.resampled)
        rng = random.Random(f"buffer/{self.seed}/{self.index}/{self.epoch}/{self.reader}") \
            if self.shuffle and self.buffer > 1 else None
        it = buffered(shards, self.load, self.buffer, rng)
        for skipped in range(self.taken):  # resume inside this epoch: drop what was already taken
            if next(it, None) is None:
                raise DataError(f"dataset {self.name}: cannot resume at sample {self.taken} of epoch "
                                f"{self.epoch} (reader {self.reader}): the epoch has only {skipped} samples; "
                                "the shards changed since the checkpoint")
        return it

    def next(self) -> Sample | None:
        """The next sample, or None once `epochs` passes are done."""
        while not self.finished:
            if self._it is None:
                self._it = self._open_epoch()
            item = next(self._it, None)
            if item is not None:
                self.taken += 1
                return item
            if self.taken == 0 and self.epochs is None:
                raise DataError(f"dataset {self.name}: reader {self.reader} of {self.readers} got no samples "
                                f"in epoch {self.epoch} (all its shards empty or skipped as corrupt); an "
                                "endless loader would spin forever")
            self.epoch, self.taken, self._it = self.epoch + 1, 0, None
        return None


class Mixture:
    """Draws each sample's source with probability ∝ weight among the sources not yet finished."""

    def __init__(self, cursors: list[SourceCursor], weights: list[float], seed: int, reader: int,
                 rng_state: dict[str, Any] | None = None) -> None:
        self.cursors = cursors
        self.weights = np.asarray(weights, dtype=np.float64)
        self.rng = np.random.Generator(np.random.PCG64([seed, reader, 0x6D6978]))
        if rng_state is not None:
            self.rng.bit_generator.state = rng_state

    def rng_state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def next(self) -> tuple[int, str, np.ndarray] | None:
        alive = [i for i, c in enumerate(self.cursors) if not c.finished]
        while alive:
            if len(self.cursors) == 1:
                pick = alive[0]
            else:
                cumulative = np.cumsum(self.weights[alive])
                pick = alive[min(int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1],
                                                     side="right")), len(alive) - 1)]
            item = self.cursors[pick].next()
            if item is not None:
                return pick, item[0], item[1]
            alive.remove(pick)
        return None
