"""Builds the training job's loaders from the run config (and the embedded default corpus if asked)."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from data_pipeline.corpus import default_corpus_files
from data_pipeline.loader import DataError, Source, TokenLoader, TokenStream
from data_pipeline.prepare import prepare
from data_pipeline.shards import MANIFEST, Manifest
from data_pipeline.sources import ResolvedSource
from data_pipeline.tokenizer import tokenizer_mismatch
from pretrain import synthetic
from pretrain.batch import Batch, as_batch
from pretrain.config import DataConfig, RunConfig
from pretrain.repeats import RepeatedPassages

DEFAULT_CORPUS_BYTES = 8_000_000


def _at_default_corpus_path(train: str) -> bool:
    """The default path or a sibling named after it (`data/stdlib-bytes-64k`: its samples are as long as
    that run's sequences): the only places the embedded corpus is built."""
    default, path = Path(DataConfig.train), Path(train)
    return path == default or (path.parent == default.parent and path.name.startswith(f"{default.name}-"))


def dataset_problem(cfg: RunConfig) -> str | None:
    """Why the run would stop at start for want of its data, or None: what `slurm.submit` checks before a
    job waits in the queue for hours only to fail in its first second."""
    d = cfg.data
    built_here = d.default_corpus and _at_default_corpus_path(d.train)  # the job builds the embedded corpus
    if not (Path(d.train) / MANIFEST).is_file() and not built_here:
        return f"data.train={d.train}: no prepared dataset there ({MANIFEST} is missing)"
    for field_name, paths in (("data.mix", d.mix), ("data.val_sets", d.val_sets)):
        for path in paths:
            if not (Path(path) / MANIFEST).is_file():
                return f"{field_name}: {path}: no prepared dataset there ({MANIFEST} is missing)"
    if d.val and cfg.train.eval_every:
        try:
            Source(d.val, split="val").resolve()
        except DataError as err:
            return f"data.val={d.val}: {err}"
    return None


def ensure_default_corpus(cfg: RunConfig) -> None:
    """Tokenise the standard library's sources into `data.train` (bytes) unless already there.

    Only at the default path or a sibling named after it: a path the user named is theirs, and a missing
    dataset there is an error, never silently replaced by the embedded corpus (a mistyped path would train
    on the wrong data)."""
    if (Path(cfg.data.train) / MANIFEST).is_file() or not cfg.data.default_corpus:
        return
    if not _at_default_corpus_path(cfg.data.train):
        raise DataError(f"data.train={cfg.data.train}: no prepared dataset there ({MANIFEST} is missing). "
                        "Prepare it with `python -m data_pipeline.prepare`, or leave data.train at its "
                        f"default ({DataConfig.train}, or {DataConfig.train}-NAME) to build the embedded "
                        "corpus")
    print(f"building the default corpus (Python standard library sources, PSF License) in {cfg.data.train}")
    prepare(default_corpus_files(DEFAULT_CORPUS_BYTES), cfg.data.train, "bytes",
            sample_tokens=cfg.data.seq_len + 1, shard_samples=256, val_fraction=0.05, workers=1,
            progress=sys.stderr.isatty())  # a bar's carriage returns would garble a log


class SyntheticMix:
    """The text loader's batches with synthetic retrieval sequences (`data.synthetic_*`) mixed in.

    Why: a model learns to retrieve from its long-term memory only if something in training asks it to;
    plain text rarely does within a short run. The synthetic sequences are trained on their answers only,
    each sequence's answers weighing as much as `weight` text sequences. Either `rows` rows appended to
    each text batch (one `Batch`), or, with `separate`, `rows` sequences of their own length yielded before
    the text batch (a list of two `Batch`es: one step, two forwards); the first `alone` of those come
    without text (a one-`Batch` list), the text starting after them where it would have. Sequences are
    generated from (seed, dp rank, count), so a resumed run sees exactly the ones it would have seen.
    """

    def __init__(self, text: TokenLoader, rows: int, task: str, seq_len: int, vocab_size: int,
                 weight: float, seed: int, separate: bool = False, alone: int = 0,
                 **row_options: Any) -> None:
        self.text, self.rows, self.task, self.seq_len = text, rows, task, seq_len
        self.separate, self.alone = separate, alone
        self.generate = synthetic.instance_batch if separate else synthetic.training_rows
        self.row_options = row_options  # the generator's min_distance, n_pairs, max_distance (rows: pack)
        self.space = synthetic.TokenSpace.for_vocab(vocab_size)
        self.weight, self.seed, self.generated = weight, seed, 0

    def __iter__(self) -> Iterator[Batch | list[Batch]]:
        while self.generated < self.alone:
            yield [self.synthetic()]
        for text in self.text:
            text, synthetic = as_batch(text), self.synthetic()
            if self.separate:
                yield [synthetic, text]
            else:
                weights = text.weights
                if weights is None:
                    weights = torch.ones(text.tokens.shape[0], self.seq_len)
                yield Batch(torch.cat([text.tokens, synthetic.tokens]),
                            torch.cat([weights, synthetic.weights]))

    def synthetic(self) -> Batch:
        """The next synthetic sequences, trained on their answers only."""
        tokens, answers = self.generate(self.task, self.rows, self.seq_len + 1, self.space,
                                        seed=self.row_seed(), **self.row_options)
        self.generated += 1
        return Batch(tokens, answers * (self.weight * self.seq_len / answers.sum(-1, keepdim=True)))

    def row_seed(self) -> int:
        """A seed per (seed, batch count): torch's generator keeps only 32 bits, so hash, do not shift."""
        digest = hashlib.blake2b(f"{self.seed}:{self.generated}".encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little")

    def state_dict(self) -> dict[str, Any]:
        return {"text": self.text.state_dict(), "generated": self.generated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.text.load_state_dict(state["text"])
        self.generated = state["generated"]


def mixture_sources(cfg: RunConfig, manifest: Manifest, dp_size: int, report: bool) -> list[Source]:
    """`data.train` and the datasets of `data.mix`, weighted: one tokenizer for all (a mixture of two
    vocabularies would train on ids that mean different things). With `report`, one line says how much
    of each dataset the run reads, in epochs: a run that repeats its data should know it does."""
    d = cfg.data
    manifests = [manifest]
    for path in d.mix:
        try:
            other = Manifest.read(path)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"data.mix: {path}: {err}") from err
        mismatch = tokenizer_mismatch(other.tokenizer, manifest.tokenizer)
        if mismatch:
            raise DataError(f"data.mix: {path} was tokenised with {mismatch[0]}, data.train={d.train} with "
                            f"{mismatch[1]}: prepare every dataset of a mixture with one tokenizer")
        manifests.append(other)
    weights = list(d.mix_weights) or [float(m.tokens("train")) for m in manifests]
    sources = [Source(path, weight=w) for path, w in zip([d.train, *d.mix], weights, strict=True)]
    if report:
        text_rows = d.batch_size - d.synthetic_rows
        read = cfg.train.steps * text_rows * d.seq_len * cfg.train.grad_accum * dp_size  # text tokens
        shares = [w / sum(weights) for w in weights]
        epochs = [read * share / max(1, m.tokens("train")) for share, m in zip(shares, manifests)]
        print("data: " + "; ".join(
            f"{s.path}: {m.tokens('train'):,} tokens" + (f", {share:.1%} of the samples" if d.mix else "")
            + f", {e:.2f} epochs in {cfg.train.steps:,} steps"
            for s, m, share, e in zip(sources, manifests, shares, epochs)), flush=True)
        repeated = [f"{s.path} ({e:.2f} epochs)" for s, e in zip(sources, epochs) if e > 1]
        if repeated:
            print(f"warning: this run reads {', '.join(repeated)} more than once", flush=True)
    return sources


def build_loaders(cfg: RunConfig, dp_rank: int, dp_size: int, barrier: Callable[[], None] = lambda: None,
                  is_main: bool | None = None
                  ) -> tuple[TokenLoader | RepeatedPassages | SyntheticMix,
                             Callable[[], Iterator[torch.Tensor]]]:
    """The training loader of this dp rank and a function returning the validation batches. The default
    corpus is built by the main process (`is_main`, default: dp rank 0) while the others wait."""
    d = cfg.data
    failed = None
    main = dp_rank == 0 if is_main is None else is_main  # builds the corpus, says what the data is
    if main:
        try:
            ensure_default_corpus(cfg)
        except DataError as err:  # raised after the barrier: the other ranks are waiting there
            failed = err
    barrier()
    if failed is not None:
        raise failed
    try:
        manifest = Manifest.read(d.train)
    except FileNotFoundError as err:  # every rank says it, in one line (rank 0's own check said why above)
        raise DataError(f"data.train={d.train}: {err}") from err
    if manifest.vocab_size > cfg.model.vocab_size:
        raise DataError(f"dataset {d.train} has vocabulary {manifest.vocab_size} but model.vocab_size is "
                        f"{cfg.model.vocab_size}")
    unused = cfg.model.vocab_size - manifest.vocab_size
    if unused > max(128, cfg.model.vocab_size // 20) and main:
        # padding to a multiple of 64 is common and cheap; tens of thousands of rows no token reaches (the
        # default 32,000 on a byte dataset) is a forgotten setting that costs memory and time
        print(f"warning: dataset {d.train} has a vocabulary of {manifest.vocab_size:,} and model.vocab_size "
              f"is {cfg.model.vocab_size:,}: {unused:,} embedding rows no token uses; set "
              f"model.vocab_size={manifest.vocab_size}", flush=True)
    text_rows = d.batch_size - d.synthetic_rows
    sources = mixture_sources(cfg, manifest, dp_size, main)
    train = TokenStream(sources, d.seq_len, text_rows, dp_rank, dp_size, seed=d.seed,
                        shuffle_buffer=d.shuffle_buffer, max_corrupt_shards=d.max_corrupt_shards)
    if cfg.train.eval_every == 0:  # no validation: the split is never opened
        return _train_mix(TokenLoader(train, d.num_workers), cfg, dp_rank), lambda: iter(())
    val_source = Source(d.val or d.train, split="val")
    try:
        val = val_source.resolve()
    except DataError as err:
        raise DataError(f"{err}: set data.val to a dataset with a validation split, or train.eval_every=0 "
                        "to train without validation") from err
    if d.val:  # a validation loss over other tokens than training's would be a number about nothing
        mismatch = tokenizer_mismatch(val.manifest.tokenizer, manifest.tokenizer)
        if mismatch:
            raise DataError(f"data.val={d.val} was tokenised with {mismatch[0]}, data.train={d.train} with "
                            f"{mismatch[1]}: prepare both with one tokenizer")
    return _train_mix(TokenLoader(train, d.num_workers), cfg, dp_rank), _batches(val, cfg, dp_rank, dp_size)


def _batches(val: ResolvedSource, cfg: RunConfig, dp_rank: int, dp_size: int
             ) -> Callable[[], Iterator[torch.Tensor]]:
    """A function returning the first train.eval_batches batches of `val`, split over the dp ranks."""
    d = cfg.data
    # few validation shards: every rank evaluates the same batches (the mean is the same)
    val_rank, val_size = (dp_rank, dp_size) if len(val.urls) >= dp_size else (0, 1)

    def val_batches() -> Iterator[torch.Tensor]:
        stream = TokenStream([val.source], d.seq_len, d.batch_size, val_rank, val_size, epochs=1,
                             shuffle=False, max_corrupt_shards=d.max_corrupt_shards)
        for i, batch in enumerate(TokenLoader(stream)):
            if i == cfg.train.eval_batches:
                break
            yield batch

    return val_batches


def validation_sets(cfg: RunConfig, dp_rank: int, dp_size: int, report: bool
                    ) -> dict[str, Callable[[], Iterator[torch.Tensor]]]:
    """data.val_sets by folder name: each dataset's validation split, or the whole of one that has none
    and is not trained on (an evaluation-only dataset), in data.train's tokenizer."""
    d = cfg.data
    if not d.val_sets:
        return {}
    trained = {Path(p).resolve() for p in (d.train, *d.mix)}
    tokenizer = Manifest.read(d.train).tokenizer
    sets = {}
    for path in d.val_sets:
        try:
            split = "val" if Manifest.read(path).splits.get("val") else "train"
            if split == "train" and Path(path).resolve() in trained:
                raise DataError(f"dataset {path} has no validation split, and this run trains on it")
            val = Source(path, split=split).resolve()
        except (FileNotFoundError, ValueError, DataError) as err:
            raise DataError(f"data.val_sets: {err}") from err
        if split == "train" and report:
            print(f"note: data.val_sets: {path} has no validation split and is not trained on: "
                  "validating on the whole of it", flush=True)
        mismatch = tokenizer_mismatch(val.manifest.tokenizer, tokenizer)
        if mismatch:
            raise DataError(f"data.val_sets: {path} was tokenised with {mismatch[0]}, data.train={d.train} "
                            f"with {mismatch[1]}: prepare both with one tokenizer")
        sets[Path(path).name] = _batches(val, cfg, dp_rank, dp_size)
    return sets


def _train_mix(loader: TokenLoader, cfg: RunConfig, dp_rank: int
               ) -> TokenLoader | RepeatedPassages | SyntheticMix:
    """The text loader with its rows' repeated passages and the synthetic tasks, as configured."""
    d = cfg.data
    if d.repeat_rows:
        loader = RepeatedPassages(loader, d.repeat_rows, d.repeat_passage, d.repeat_min_gap,
                                  seed=d.seed * 65_537 + dp_rank, weight=d.repeat_weight)
    if not d.synthetic_rows and not d.synthetic_sequences:
        return loader
    options: dict[str, Any] = {"min_distance": d.synthetic_min_distance, "n_pairs": d.synthetic_pairs,
                               "max_distance": d.synthetic_max_distance}
    if not d.synthetic_sequences:
        options["pack"] = d.synthetic_pack
    return SyntheticMix(loader, d.synthetic_rows or d.synthetic_sequences, d.synthetic_task, d.seq_len,
                        cfg.model.vocab_size, d.synthetic_weight, seed=d.seed * 65_537 + dp_rank,
                        separate=bool(d.synthetic_sequences),
                        alone=d.synthetic_alone_steps * cfg.train.grad_accum, **options)
