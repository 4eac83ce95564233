"""Streaming token loader over WebDataset shards: dp-rank and worker splitting, shuffling, mixtures,
packing to `seq_len + 1`, and an exact, cheap-to-store resume position.

Determinism is what makes resume exact. The stream of one (dp rank, worker) is a pure function of
(seed, epoch, rank, worker): shards are permuted per epoch with a seeded generator and dealt round-robin
to the `dp_size × num_workers` readers; samples pass a seeded shuffle buffer; a mixture picks its source
per sample from a seeded generator. torch's DataLoader takes batches from its workers in strict
round-robin, so the position of a rank is one number, the batches it has consumed; `load_state_dict`
makes each worker silently replay (read, not train on) its share of those batches. Replay costs reading
the data once more, never model compute, and needs no per-worker state in the checkpoint.

Splitting is by data-parallel rank only: pass the dp rank and size, so the tensor / pipeline / sequence
ranks of one replica read identical batches.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.shards import Manifest

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A problem with the data, naming the dataset, shard or sample."""


@dataclass
class Source:
    """One dataset of a mixture: a prepared folder (with manifest.json) or explicit shard URLs."""

    path: str
    weight: float = 1.0
    split: str = "train"
    urls: list[str] | None = None  # local paths, `pipe:` commands or http(s) URLs; default from manifest

    def resolve(self) -> tuple[list[str], Manifest]:
        manifest = Manifest.read(self.path)
        if self.urls is not None:
            return self.urls, manifest
        shards = manifest.splits.get(self.split, [])
        if not shards:
            raise DataError(f"dataset {self.path}: split {self.split!r} has no shards (empty dataset)")
        urls = [str(Path(self.path) / s.name) for s in shards]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise DataError(f"dataset {self.path}: missing shard(s) {', '.join(missing)}")
        return urls, manifest


class CorruptShards:
    """Counts corrupt shards; past `limit` the next one is an error (0: every corrupt shard is fatal)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0

    def report(self, url: str, err: Exception) -> None:
        self.count += 1
        if self.count > self.limit:
            raise DataError(f"corrupt shard {url}: {err} (corrupt shards so far: {self.count}, "
                            f"allowed: {self.limit})") from err
        log.warning("skipping corrupt shard %s (%s); %d of %d allowed", url, err, self.count, self.limit)


def read_shard(url: str, manifest: Manifest, corrupt: CorruptShards) -> Iterator[tuple[str, np.ndarray]]:
    """(key, tokens) of every sample of one shard, checked against the manifest."""
    dtype = np.dtype(manifest.dtype)
    expected = manifest.sample_tokens * dtype.itemsize
    samples = []
    try:
        for sample in wds.tarfile_to_samples()(iter([{"url": url}])):
            data = sample.get("tokens")
            if data is None or len(data) != expected:
                size = "no .tokens member" if data is None else f"{len(data)} bytes"
                raise DataError(f"sample {sample['__key__']} has {size}, expected {expected}")
            samples.append((sample["__key__"], np.frombuffer(data, dtype=dtype)))
    except Exception as err:  # tarfile, I/O and format errors: all name the shard
        if isinstance(err, FileNotFoundError):
            raise DataError(f"missing shard {url}") from err
        corrupt.report(url, err)
        return
    if not samples:
        corrupt.report(url, DataError("no samples (empty or truncated tar)"))
        return
    for key, tokens in samples:
        if int(tokens.max()) >= manifest.vocab_size:
            raise DataError(f"shard {url}, sample {key}: token id {int(tokens.max())} >= vocab size "
                            f"{manifest.vocab_size}")
        yield key, tokens


class TokenStream(IterableDataset):
    """Batches (B, seq_len + 1) of int64 token ids for one dp rank; workers split its shards.

    `epochs=None` streams forever (epoch after epoch, fresh permutation each time); `epochs=n` stops
    after n passes. `skip_batches` is set by `TokenLoader.load_state_dict`.
    """

    def __init__(self, sources: list[Source], seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000, epochs: int | None = None,
                 max_corrupt_shards: int = 0, shuffle: bool = True) -> None:
        if not sources:
            raise DataError("no data sources given")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.sources, self.seq_len, self.batch_size = sources, seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle_buffer, self.epochs, self.shuffle = shuffle_buffer, epochs, shuffle
        self.max_corrupt_shards = max_corrupt_shards
        self.resolved = [s.resolve() for s in sources]
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        if (self.weights <= 0).any():
            raise DataError(f"mixture weights must be > 0, got {self.weights.tolist()}")
        self.skip_batches = 0
        self.num_workers = 1

    def reader_count(self) -> int:
        return self.dp_size * self.num_workers

    def check_shard_counts(self) -> None:
        readers = self.reader_count()
        for source, (urls, _) in zip(self.sources, self.resolved, strict=True):
            if len(urls) < readers:
                raise DataError(f"dataset {source.path} ({source.split}) has {len(urls)} shard(s) but "
                                f"{self.dp_size} dp rank(s) × {self.num_workers} worker(s) = {readers} "
                                "readers need at least one each; write smaller shards or use fewer workers")

    def samples(self, worker: int, corrupt: CorruptShards) -> Iterator[tuple[str, np.ndarray]]:
        """This reader's samples, mixture applied, forever or for `epochs` passes."""
        reader = self.dp_rank * self.num_workers + worker
        streams = [self._source_samples(i, reader, corrupt) for i in range(len(self.sources))]
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = np.random.default_rng([self.seed, reader, 7])
        probs = self.weights / self.weights.sum()
        alive = list(range(len(streams)))
        while alive:
            pick = alive[0] if len(alive) == 1 else rng.choice(alive, p=probs[alive] / probs[alive].sum())
            try:
                yield next(streams[pick])
            except StopIteration:
                alive.remove(pick)

    def _source_samples(
        self, index: int, reader: int, corrupt: CorruptShards
    ) -> Iterator[tuple[str, np.ndarray]]:
        urls, manifest = self.resolved[index]
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = list(range(len(urls)))
            if self.shuffle:
                random.Random(f"{self.seed}-{index}-{epoch}").shuffle(order)
            mine = [urls[i] for i in order[reader :: self.reader_count()]]
            rng = random.Random(f"{self.seed}-{index}-{epoch}-{reader}")
            buffer: list[tuple[str, np.ndarray]] = []
            for url in mine:
                for sample in read_shard(url, manifest, corrupt):
                    if not self.shuffle:
                        yield sample
                        continue
                    buffer.append(sample)
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        corrupt = CorruptShards(self.max_corrupt_shards)
        width = self.seq_len + 1
        rows: list[np.ndarray] = []
        pending = np.zeros(0, dtype=np.int64)
        # batches of this worker to replay: DataLoader deals batch j to worker j % num_workers
        skip = len(range(worker, self.skip_batches, self.num_workers))
        for _, tokens in self.samples(worker, corrupt):
            pending = np.concatenate([pending, tokens.astype(np.int64)])
            while len(pending) >= width:  # pack: cut the stream into rows of seq_len + 1
                rows.append(pending[:width])
                pending = pending[width:]
                if len(rows) == self.batch_size:
                    if skip > 0:
                        skip -= 1
                    else:
                        yield torch.from_numpy(np.stack(rows))
                    rows = []


class TokenLoader:
    """The training loop's loader: iterate for batches; `state_dict()` is this rank's position."""

    def __init__(self, stream: TokenStream, num_workers: int = 0) -> None:
        self.stream, self.num_workers = stream, num_workers
        stream.num_workers = max(1, num_workers)
        stream.check_shard_counts()
        self.consumed = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.stream.skip_batches = self.consumed
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False, timeout=600 if self.num_workers else 0)
        for batch in loader:
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.consumed, "dp_rank": self.stream.dp_rank, "dp_size": self.stream.dp_size,
                "num_workers": self.num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batches already consumed. The layout must match to continue exactly."""
        for key in ("dp_rank", "dp_size", "num_workers"):
            if state.get(key) != self.state_dict()[key]:
                raise DataError(f"loader state was saved with {key}={state.get(key)}, this run has "
                                f"{key}={self.state_dict()[key]}: the data order would differ")
        self.consumed = int(state["batches"])
