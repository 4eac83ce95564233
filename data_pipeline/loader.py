"""Streaming token loader over WebDataset shards: dp-rank and worker splitting, shuffling, mixtures,
packing to (batch, seq_len + 1) int64 batches, and an exact, small resume position.

Use:
    loader = build_loader("data/stdlib-bytes", dp_rank, dp_size, batch_size=8, seq_len=2048, num_workers=2)
    for batch in loader: ...                 # LongTensor (8, 2049): inputs [:, :-1], targets [:, 1:]
    ckpt["data"] = loader.state_dict()       # small, plain Python types
    loader.load_state_dict(ckpt["data"])     # the next batch is the first one not yet consumed

Splitting is by data-parallel rank only: pass the dp rank and size of the *data-parallel group*, so the
tensor / pipeline / sequence-parallel ranks of one replica read identical batches.

How resume is exact. There are `dp_size × num_workers` *readers*; reader (rank, worker) sees a sample
stream that is a pure function of (seed, epoch, reader) (see sampling.py), packs it into rows and yields
whole batches, each tagged with the reader's position *after* it: per source (epoch, samples taken in
that epoch), the mixture generator's state, the < seq_len + 1 tokens left over for the next row, and
the corrupt shards met. The loader hands batches to the training loop in a fixed round-robin over
workers (reordering what torch's DataLoader delivers, so the order never depends on timing) and keeps,
per worker, the position of the last batch it handed out. `state_dict()` is those positions plus whose
turn is next: exactly the consumed batches, never the prefetched ones. `load_state_dict` gives each
worker its position; the worker rebuilds its current epoch and drops the samples already taken (reads
at most one epoch of its share again, no model compute), so the batches that follow are bit-identical
to those of an uninterrupted run. The layout (dp size, num_workers, seed, sources) must be the same.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import CorruptShardError, DataError
from data_pipeline.sampling import Mixture, SourceCursor
from data_pipeline.shard_reader import CorruptShards, read_shard
from data_pipeline.sources import ResolvedSource, Source

log = logging.getLogger(__name__)
STATE_VERSION = 1
__all__ = ["DataError", "Source", "TokenLoader", "TokenStream", "build_loader"]



@dataclass
class Item:
    """What a worker sends: its batch (None marks its end), sample keys and its position after it.

    A class, not a tuple, so DataLoader's default_convert passes it through untouched (no per-token
    recursion into the position); `pin_memory` is honoured through the method below.
    """

    worker: int
    batch: torch.Tensor | None
    keys: list[str]
    position: dict[str, Any]
    error: tuple[str, str, str] | None = None  # (exception class, message, worker traceback)

    def pin_memory(self) -> Item:
        if self.batch is not None:
            self.batch = self.batch.pin_memory()
        return self


class TokenStream(IterableDataset):
    """The batches of one dp rank, split among DataLoader workers; yields `Item`s for `TokenLoader`.

    `epochs=None` streams forever (a fresh shard permutation and shuffle each epoch); `epochs=n` stops
    after n passes. `resampled=True` draws shards with replacement per reader (forever; fewer shards
    than readers are then allowed). Corrupt shards beyond `max_corrupt_shards` (per dp rank) are errors.
    """

    def __init__(self, sources: Sequence[Source | str], seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000, epochs: int | None = None,
                 max_corrupt_shards: int = 0, shuffle: bool = True, resampled: bool = False,
                 verify_checksums: bool = True, drop_last: bool = False) -> None:
        if not sources:
            raise DataError("no data sources given")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"need seq_len >= 1 and batch_size >= 1, got {seq_len} and {batch_size}")
        if epochs is not None and (epochs < 1 or resampled):
            raise DataError("epochs must be >= 1, and resampled streams are endless (epochs=None)")
        self.sources = [Source(s) if isinstance(s, str) else s for s in sources]
        self.seq_len, self.batch_size, self.dp_rank, self.dp_size = seq_len, batch_size, dp_rank, dp_size
        self.seed, self.shuffle_buffer, self.epochs, self.shuffle = seed, shuffle_buffer, epochs, shuffle
        self.max_corrupt_shards, self.resampled = max_corrupt_shards, resampled
        self.verify_checksums, self.drop_last = verify_checksums, drop_last
        self.resolved: list[ResolvedSource] = [s.resolve() for s in self.sources]
        weights = [s.weight for s in self.sources]
        if any(not w > 0 for w in weights):
            raise DataError(f"mixture weights must be > 0, got {weights}")
        vocab = {r.manifest.vocab_size for r in self.resolved}
        if len(vocab) > 1:
            raise DataError(f"datasets {[s.path for s in self.sources]} have different vocabularies {vocab}: "
                            "mix only datasets prepared with the same tokenizer")
        self.vocab_size = vocab.pop()
        self.num_workers = 1  # set by TokenLoader
        self.start_states: list[dict[str, Any] | None] = [None]

    def check_layout(self, num_workers: int) -> None:
        """Every reader needs at least one shard of every source (unless shards are resampled)."""
        readers = self.dp_size * num_workers
        for r in self.resolved:
            if not self.resampled and len(r.urls) < readers:
                raise DataError(f"dataset {r.source.path} ({r.source.split}) has {len(r.urls)} shard(s) but "
                                f"{self.dp_size} dp rank(s) × {num_workers} worker(s) = {readers} readers "
                                "need at least one each: write smaller shards (--shard-samples), use fewer "
                                "workers, or resampled=True")

    def signature(self) -> list[str]:
        """What must not change for a resume to be exact: per source the split, weight and shard list
        (names and checksums; the folder may move)."""
        out = []
        for r in self.resolved:
            shards = "|".join(f"{Path(u).name}:{i.sha256 if i else ''}" for u, i in zip(r.urls, r.infos))
            out.append(f"{r.source.split}:{r.source.weight}:{len(r.urls)}:"
                       f"{hashlib.sha1(shards.encode()).hexdigest()[:16]}")
        return out

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.num_workers:
            raise DataError("iterate a TokenStream through TokenLoader (it sets the worker count)")
        if info is None:
            yield from self.reader_items(worker, self.start_states[worker])
            return
        try:  # hand errors over as data: a worker that raises makes torch wait 5 s per worker at shutdown
            yield from self.reader_items(worker, self.start_states[worker])
        except Exception as err:
            yield Item(worker, None, [], {}, (type(err).__name__, str(err), traceback.format_exc()))

    def reader_items(self, worker: int, state: dict[str, Any] | None) -> Iterator[Item]:
        """Batches of reader (dp_rank, worker) from `state` on, then one end marker (batch None)."""
        state = copy.deepcopy(state) if state else {"sources": None, "mix": None, "pending": [],
                                                    "batches": 0, "corrupt": [], "done": False}
        if state["done"]:
            yield Item(worker, None, [], state)
            return
        reader, readers = self.dp_rank * self.num_workers + worker, self.dp_size * self.num_workers
        corrupt = CorruptShards(self.max_corrupt_shards, state["corrupt"])
        starts = state["sources"] or [{}] * len(self.resolved)
        cursors = [self._cursor(i, reader, readers, corrupt, starts[i]) for i in range(len(self.resolved))]
        mixture = Mixture(cursors, [s.weight for s in self.sources], self.seed, reader, state["mix"])
        width = self.seq_len + 1
        pending = np.asarray(state["pending"], dtype=np.int64)
        rows: list[np.ndarray] = []
        keys: list[str] = []

        def position(done: bool = False) -> dict[str, Any]:
            return {"sources": [c.state() for c in cursors], "mix": mixture.rng_state(),
                    "pending": pending.tolist(), "batches": state["batches"],
                    "corrupt": sorted(corrupt.urls), "done": done}

        while (item := mixture.next()) is not None:
            _, key, sample = item
            keys.append(key)
            pending = np.concatenate([pending, sample.astype(np.int64)]) if len(pending) else \
                sample.astype(np.int64)
            while len(pending) >= width:  # pack: cut the stream into rows of seq_len + 1
                rows.append(pending[:width])
                pending = pending[width:]
                if len(rows) == self.batch_size:
                    state["batches"] += 1
                    yield Item(worker, torch.from_numpy(np.stack(rows)), keys, position())
                    rows, keys = [], []
        if rows and not self.drop_last:
            state["batches"] += 1
            yield Item(worker, torch.from_numpy(np.stack(rows)), keys, position())
        if len(pending) or (rows and self.drop_last):
            log.info("reader %d: the data ends with %d tokens (< a row of %d) and %d short-batch rows unused",
                     reader, len(pending), width, len(rows) if self.drop_last else 0)
        yield Item(worker, None, [], position(done=True))

    def _cursor(self, index: int, reader: int, readers: int, corrupt: CorruptShards, pos: dict[str, int]
                ) -> SourceCursor:
        resolved = self.resolved[index]

        def load(shard: int) -> tuple[list[str], np.ndarray] | None:
            url = resolved.urls[shard]
            try:
                keys, tokens = read_shard(url, resolved.manifest, resolved.infos[shard],
                                          self.verify_checksums)
            except CorruptShardError as err:
                corrupt.report(url, err)
                return None
            return [f"{url}#{k}" for k in keys], tokens

        return SourceCursor(resolved.source.path, index, len(resolved.urls), load, readers=readers,
                            reader=reader, seed=self.seed, epochs=self.epochs, shuffle=self.shuffle,
                            resampled=self.resampled, buffer=self.shuffle_buffer,
                            epoch=pos.get("epoch", 0), taken=pos.get("taken", 0))


class TokenLoader:
    """The training loop's loader for one dp rank: iterate for LongTensor batches (B, seq_len + 1)."""

    def __init__(self, stream: TokenStream, num_workers: int = 0, timeout: float = 300.0,
                 pin_memory: bool = False, prefetch_factor: int = 2,
                 multiprocessing_context: str | None = None) -> None:
        stream.check_layout(max(1, num_workers))
        self.stream, self.num_workers, self.timeout = stream, num_workers, timeout
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.mp_context = multiprocessing_context
        self.readers = max(1, num_workers)
        self.positions: list[dict[str, Any] | None] = [None] * self.readers
        self.next_worker = 0
        self.consumed = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch, _ in self.batches_with_keys():
            yield batch

    def batches_with_keys(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Batches with the keys (`shard url#sample key`) of the samples that start in each."""
        stream = copy.copy(self.stream)
        stream.num_workers, stream.start_states = self.readers, list(self.positions)
        workers = self.num_workers
        loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                            timeout=self.timeout if workers else 0, persistent_workers=False,
                            prefetch_factor=self.prefetch_factor if workers else None,
                            multiprocessing_context=self.mp_context if workers else None)
        it = iter(loader)
        queues: list[deque[Item]] = [deque() for _ in range(self.readers)]
        alive = [w for w in range(self.readers) if not (self.positions[w] or {}).get("done")]
        while alive:
            turn = self._turn(alive)
            while not queues[turn]:
                try:
                    item = next(it)
                except StopIteration:
                    raise DataError(f"data loader worker {turn} stopped without its end marker") from None
                except RuntimeError as err:
                    if "timed out" not in str(err):
                        raise
                    raise DataError(f"no batch from the data loader workers of dp rank {self.stream.dp_rank} "
                                    f"within timeout={self.timeout} s: a stuck shard source (pipe:/http) "
                                    "or a slow resume replay; raise the timeout if the source is just slow"
                                    ) from err
                queues[item.worker].append(item)
            item = queues[turn].popleft()
            if item.error is not None:
                raise worker_error(turn, *item.error)
            batch, keys, self.positions[turn] = item.batch, item.keys, item.position
            later = [w for w in alive if w > turn]
            self.next_worker = later[0] if later else alive[0]
            self._check_corrupt()
            if batch is None:
                alive.remove(turn)
                self.next_worker = (later or alive or [0])[0]
                continue
            self.consumed += 1
            yield batch, keys

    def _turn(self, alive: list[int]) -> int:
        later = [w for w in alive if w >= self.next_worker]
        return later[0] if later else alive[0]

    def _check_corrupt(self) -> None:
        urls = self.corrupt_shards
        if len(urls) > self.stream.max_corrupt_shards:
            raise CorruptShardError(f"{len(urls)} corrupt shards on dp rank {self.stream.dp_rank} exceed "
                                    f"max_corrupt_shards={self.stream.max_corrupt_shards}: {', '.join(urls)}")

    @property
    def corrupt_shards(self) -> list[str]:
        """The corrupt shards skipped so far by this rank's workers (logged when met)."""
        return sorted({u for p in self.positions if p for u in p["corrupt"]})

    def state_dict(self) -> dict[str, Any]:
        """This dp rank's position: plain Python types (safe for torch.save / json)."""
        s = self.stream
        return {"version": STATE_VERSION, "dp_rank": s.dp_rank, "dp_size": s.dp_size,
                "num_workers": self.num_workers, "seed": s.seed, "sources": s.signature(),
                "batches": self.consumed, "next_worker": self.next_worker,
                "workers": copy.deepcopy(self.positions)}

    # what a resume needs unchanged, and the setting of a training run that decides it
    RESUME_SETTINGS = {"dp_rank": "the layout", "dp_size": "the layout: world / (tp · pp · sp)",
                       "num_workers": "data.num_workers", "seed": "data.seed",
                       "sources": "the shards of data.train and data.mix, and data.mix_weights"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batches already consumed; the data layout must be the one saved."""
        mine = self.state_dict()
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        for key, setting in self.RESUME_SETTINGS.items():
            if state.get(key) != mine[key]:
                raise DataError(f"the data position was saved with {key}={state.get(key)}, this run has "
                                f"{key}={mine[key]} (set by {setting}): the data order would differ, so it "
                                "cannot continue exactly; resume with the saved setting, or start a new run")
        self.positions = copy.deepcopy(state["workers"])
        self.next_worker, self.consumed = int(state["next_worker"]), int(state["batches"])


def worker_error(worker: int, kind: str, message: str, trace: str) -> Exception:
    """The worker's exception re-created in the main process (data errors keep their class)."""
    cls = {"CorruptShardError": CorruptShardError, "DataError": DataError}.get(kind)
    if cls is not None:
        return cls(f"{message} (data loader worker {worker})")
    return RuntimeError(f"data loader worker {worker} failed with {kind}: {message}\n{trace}")


def build_loader(data: str | Source | Sequence[str | Source], dp_rank: int, dp_size: int, batch_size: int,
                 seq_len: int, num_workers: int = 2, **kwargs: Any) -> TokenLoader:
    """One call for the training loop: dataset folder(s) or weighted `Source`s → this dp rank's loader.

    kwargs go to `TokenStream` (seed, shuffle_buffer, epochs, resampled, max_corrupt_shards, …) or to
    `TokenLoader` (timeout, pin_memory, prefetch_factor, multiprocessing_context).
    """
    loader_keys = {"timeout", "pin_memory", "prefetch_factor", "multiprocessing_context"}
    loader_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in loader_keys}
    sources = [data] if isinstance(data, str | Source) else list(data)
    stream = TokenStream(sources, seq_len, batch_size, dp_rank, dp_size, **kwargs)
    return TokenLoader(stream, num_workers, **loader_kwargs)
