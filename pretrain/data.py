"""Builds the training job's loaders from the run config (and the embedded default corpus if asked)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from data_pipeline.corpus import default_corpus_files
from data_pipeline.loader import DataError, Source, TokenLoader, TokenStream
from data_pipeline.prepare import prepare
from data_pipeline.shards import MANIFEST, Manifest
from pretrain.config import RunConfig

DEFAULT_CORPUS_BYTES = 8_000_000


def ensure_default_corpus(cfg: RunConfig) -> None:
    """Tokenise the standard library's sources into `data.train` (bytes) unless already there."""
    if (Path(cfg.data.train) / MANIFEST).is_file() or not cfg.data.default_corpus:
        return
    print(f"building the default corpus (Python standard library sources, PSF License) in {cfg.data.train}")
    prepare(default_corpus_files(DEFAULT_CORPUS_BYTES), cfg.data.train, "bytes",
            sample_tokens=cfg.data.seq_len + 1, shard_samples=256, val_fraction=0.05, workers=1)


def build_loaders(cfg: RunConfig, dp_rank: int, dp_size: int, barrier: Callable[[], None] = lambda: None
                  ) -> tuple[TokenLoader, Callable[[], Iterator[torch.Tensor]]]:
    """The training loader of this dp rank and a function returning the validation batches."""
    d = cfg.data
    if dp_rank == 0:
        ensure_default_corpus(cfg)
    barrier()
    manifest = Manifest.read(d.train)
    if manifest.vocab_size > cfg.model.vocab_size:
        raise DataError(f"dataset {d.train} has vocabulary {manifest.vocab_size} but model.vocab_size is "
                        f"{cfg.model.vocab_size}")
    train = TokenStream([Source(d.train)], d.seq_len, d.batch_size, dp_rank, dp_size, seed=d.seed,
                        shuffle_buffer=d.shuffle_buffer, max_corrupt_shards=d.max_corrupt_shards)
    val_source = Source(d.val or d.train, split="val")
    val_shards = len(val_source.resolve()[0])
    # few validation shards: every rank evaluates the same batches (the mean is the same)
    val_rank, val_size = (dp_rank, dp_size) if val_shards >= dp_size else (0, 1)

    def val_batches() -> Iterator[torch.Tensor]:
        stream = TokenStream([val_source], d.seq_len, d.batch_size, val_rank, val_size, epochs=1,
                             shuffle=False, max_corrupt_shards=d.max_corrupt_shards)
        for i, batch in enumerate(TokenLoader(stream)):
            if i == cfg.train.eval_batches:
                break
            yield batch

    return TokenLoader(train, d.num_workers), val_batches
