"""`python -m data_pipeline.prepare`: text → tokenised documents → WebDataset token shards + manifest.

    python -m data_pipeline.prepare --default-corpus --out data/stdlib-bytes
    python -m data_pipeline.prepare corpus/ extra.jsonl.gz --tokenizer tok/tokenizer.json --out data/mix

Inputs are text files, directories (searched recursively with --glob, default *.txt *.md *.py *.jsonl
*.jsonl.gz *.parquet), .jsonl(.gz) files whose records hold the text in --text-field, and .parquet files
(the Hugging Face hub's format; pyarrow) whose --text-field column holds it. Each document is
tokenised (in parallel with --workers, the order kept, so the output does not depend on the worker
count), followed by the EOS id; each split's documents are concatenated and cut into samples of
--sample-tokens ids (seq_len + 1: one sample is one training sequence with its shifted targets); the
last partial sample is dropped and its length recorded in the manifest. A document goes to the
validation split when a hash of its id (file name relative to its input folder, plus the line number
for jsonl, the row for parquet) falls below --val-fraction, so the split is stable across runs, machines
and worker counts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from data_pipeline.corpus import (
    InputFile,
    add_input_arguments,
    as_input,
    check_input_arguments,
    default_corpus_root,
    input_files,
    is_jsonl,
    is_parquet,
    jsonl_chunks,
    parquet_chunks,
    parse_jsonl,
    read_text,
)
from data_pipeline.shards import MANIFEST, Manifest, ShardWriter
from data_pipeline.tokenizer import Tokenizer, encode_array, load_tokenizer, token_dtype

SPLITS = ("train", "val")


class Task(NamedTuple):
    """One unit of work: a whole plain file (read by the worker), a chunk of raw jsonl lines, or a chunk of
    a parquet file's texts (rows)."""

    file: InputFile
    first_line: int
    lines: list[bytes] | list[str] | None


class _Worker:
    """Per-process tokenizer and settings (set once by the pool initializer, not pickled per task)."""

    tok: Tokenizer
    dtype: np.dtype
    val_fraction: float
    text_field: str
    force_val: frozenset[str] = frozenset()  # documents held out whatever their hash (a small corpus)


def _init_worker(spec: str, val_fraction: float, text_field: str, quiet_rust: bool,
                 force_val: frozenset[str] = frozenset()) -> None:
    if quiet_rust:  # our processes already parallelise; avoid oversubscribing with Rust threads
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _Worker.tok = load_tokenizer(spec)
    _Worker.dtype = token_dtype(_Worker.tok.vocab_size)
    _Worker.val_fraction, _Worker.text_field = val_fraction, text_field
    _Worker.force_val = force_val


def doc_hash(doc_id: str) -> float:
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64


def split_of(doc_id: str, val_fraction: float) -> str:
    """Deterministic train/val assignment of a document from a hash of its id."""
    return "val" if doc_hash(doc_id) < val_fraction else "train"


def _run_task(task: Task) -> tuple[list[tuple[str, np.ndarray, str]], int]:
    """[(split, ids + EOS, doc id)] for each document of the task, and the input bytes it covered."""
    tok = _Worker.tok
    if task.lines is None:
        docs: Iterable[tuple[str, str]] = [(task.file.name, read_text(task.file))]
        size = task.file.path.stat().st_size
    elif is_parquet(task.file.path):
        docs = ((f"{task.file.name}:{row}", text) for row, text in enumerate(task.lines, task.first_line))
        size = task_bytes(task)
    else:
        docs = parse_jsonl(task.file, task.first_line, task.lines, _Worker.text_field)
        size = sum(len(line) for line in task.lines)
    out = []
    for doc_id, text in docs:
        ids = encode_array(tok, text)
        if len(ids) and (int(ids.max()) >= tok.vocab_size or int(ids.min()) < 0):
            raise ValueError(f"{doc_id}: tokenizer {tok.name} produced id {int(ids.max())} outside its "
                             f"vocabulary of {tok.vocab_size}")
        eos = np.array([tok.eos_id], _Worker.dtype)
        split = "val" if doc_id in _Worker.force_val else split_of(doc_id, _Worker.val_fraction)
        out.append((split, np.concatenate([ids.astype(_Worker.dtype), eos]), doc_id))
    return out, size


def _tasks(files: Sequence[InputFile], text_field: str) -> Iterator[Task]:
    for file in files:
        if is_jsonl(file.path):
            for first, lines in jsonl_chunks(file):
                yield Task(file, first, lines)
        elif is_parquet(file.path):  # columnar: the rows' texts are read here, tokenised by the workers
            for first, texts in parquet_chunks(file, text_field):
                yield Task(file, first, texts)
        else:
            yield Task(file, 1, None)


def task_bytes(task: Task) -> int:
    if task.lines is not None:  # (a parquet chunk's texts: their characters)
        return sum(len(line) for line in task.lines)
    try:
        return task.file.path.stat().st_size
    except OSError:
        return 0  # the worker reports the error, naming the file


def ordered_map(fn: Callable[[Task], Any], items: Iterable[Task], workers: int, init_args: tuple,
                inflight_bytes: int = 32 << 20) -> Iterator[Any]:
    """`map(fn, items)` over `workers` processes, results in input order. Tasks in flight are bounded by
    input bytes (`inflight_bytes` per worker), not by count: a large file at the head of the queue must
    not leave the other workers idle, and a huge input must not be read into memory all at once. A
    crashed worker raises BrokenProcessPool instead of hanging."""
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(fn, items)
        return
    budget = inflight_bytes * workers
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=init_args) as pool:
        window: deque[tuple[Future, int]] = deque()
        pending = 0
        try:
            for item in items:
                size = task_bytes(item)
                window.append((pool.submit(fn, item), size))
                pending += size
                while window and (pending > budget or len(window) >= 256 * workers):
                    future, size = window.popleft()
                    pending -= size
                    yield future.result()
            while window:
                yield window.popleft()[0].result()
        finally:
            for future, _ in window:
                future.cancel()


def default_source(inputs: Sequence[InputFile]) -> dict[str, Any]:
    """The manifest's record of the input: the stdlib corpus is recognised, anything else is counted."""
    size = sum(f.path.stat().st_size for f in inputs if f.path.is_file())
    root = default_corpus_root()
    if inputs and all(f.path.is_relative_to(root) and f.path.suffix == ".py" for f in inputs):
        return {"name": "python-stdlib", "python": platform.python_version(), "root": str(root),
                "license": "PSF-2.0", "files": len(inputs), "bytes": size}
    return {"files": len(inputs), "bytes": size}


class InputProgress:
    """tqdm's bar over the input bytes on a terminal; in a log (a batch job) a line at every 10 % of the
    input instead, or every minute when its size is unknown (gzip), as a bar's carriage returns would
    make the log one unreadable line."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenising", file=sys.stderr,
                        disable=not (enabled and self.tty))
        self.lines = enabled and not self.tty
        self.total, self.done, self.mark = total or None, 0, 0
        self.start = time.monotonic()

    def update(self, size: int, documents: int) -> None:
        self.bar.update(size)
        self.bar.set_postfix(docs=documents, refresh=False)
        if not self.lines:
            return
        self.done += size
        elapsed = time.monotonic() - self.start
        mark = self.done * 10 // self.total if self.total else int(elapsed // 60)
        if mark > self.mark:
            self.mark = mark
            share = f"{100 * self.done / self.total:.0f}%, " if self.total else ""
            print(f"tokenising: {share}{self.done / 1e6:,.1f} MB, {documents:,} documents, "
                  f"{self.done / 1e6 / max(elapsed, 1e-9):.1f} MB/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def prepare(files: Sequence[InputFile | Path | str], out_dir: str | Path, tokenizer: str = "bytes",
            sample_tokens: int = 2049, shard_samples: int = 1000, val_fraction: float = 0.02,
            workers: int = 1, text_field: str = "text", progress: bool = True,
            source: dict[str, Any] | None = None, force_val: frozenset[str] = frozenset()) -> Manifest:
    """Tokenise `files` into `out_dir/{train,val}-NNNNN.tar`; returns (and writes) the manifest.

    With val_fraction > 0 the validation split is never left empty: if no document's hash falls under
    the fraction (a small corpus) or the held-out ones are shorter than a sample, the pass is redone with
    the longest training documents held out, one more at a time, until val holds a sample; a corpus too
    small to give both splits a sample is an error that says so.
    """
    if sample_tokens < 2 or shard_samples < 1 or not 0 <= val_fraction < 1:
        raise ValueError("need --sample-tokens >= 2, --shard-samples >= 1 and 0 <= --val-fraction < 1")
    inputs = [as_input(f) for f in files]
    tok = load_tokenizer(tokenizer)  # a bad tokenizer fails before anything is deleted
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("train-*.tar*"), *out.glob("val-*.tar*"), out / MANIFEST]:
        old.unlink(missing_ok=True)  # never leave a manifest that describes other shards
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(out, s, sample_tokens, shard_samples, dtype) for s in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    # compressed inputs: their size on disk is not the bytes read
    unknown = any(f.path.name.endswith(".gz") or is_parquet(f.path) for f in inputs)
    total = None if unknown else sum(f.path.stat().st_size for f in inputs if f.path.is_file())
    bar = InputProgress(total, progress)
    init_args = (tokenizer, val_fraction, text_field, workers > 1, force_val)
    lengths: dict[str, int] = {}  # training documents' token counts, to pick held-out ones if needed
    try:
        for docs, size in ordered_map(_run_task, _tasks(inputs, text_field), workers, init_args):
            for split, ids, doc_id in docs:
                writers[split].add(ids)
                documents[split] += 1
                if split == "train":
                    lengths[doc_id] = len(ids)
            bar.update(size, sum(documents.values()))
    except BrokenProcessPool as err:
        raise RuntimeError(f"a tokenisation worker died ({err}); rerun with --workers 1 to see why") from err
    finally:
        bar.close()
    manifest = Manifest(tokenizer=tok.describe(), vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                        dtype=dtype.name, sample_tokens=sample_tokens, documents=documents,
                        source=source or default_source(inputs))
    for split, writer in writers.items():
        manifest.dropped_tokens[split] = writer.close()
        manifest.splits[split] = writer.shards
    # one document cannot be split, whichever split its hash (of its path) chose: the same error for both
    if val_fraction > 0 and (not manifest.splits["val"] or sum(documents.values()) < 2):
        longest = sorted(lengths, key=lambda d: (-lengths[d], d))
        if len(longest) < 2:
            raise ValueError(f"the corpus is too small for a validation split ({sum(documents.values())} "
                             "document(s)): add documents, or use --val-fraction 0 and train with "
                             "train.eval_every=0 (no validation)")
        if progress:
            print(f"the validation split is empty: holding out {longest[0]} ({lengths[longest[0]]:,} tokens) "
                  "and tokenising again", file=sys.stderr, flush=True)
        return prepare(files, out_dir, tokenizer, sample_tokens, shard_samples, val_fraction, workers,
                       text_field, progress, source, force_val | {longest[0]})
    if not manifest.splits["train"]:
        held_out = f"; {documents['val']} more held out for validation" if documents["val"] else ""
        raise ValueError(f"the training split is empty ({documents['train']} documents, fewer tokens than "
                         f"one sample of {sample_tokens}{held_out}): add documents or lower --sample-tokens")
    manifest.write(out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    parser.add_argument("--tokenizer", default="bytes",
                        help="'bytes' (256 bytes + EOS, the default), a tokenizer.json, or a "
                             "SentencePiece .model")
    parser.add_argument("--sample-tokens", type=int, default=2049,
                        help="token ids per sample: seq_len + 1 (default 2049)")
    parser.add_argument("--shard-samples", type=int, default=None,
                        help="samples per shard (default 1000; 100 with --default-corpus, whose ~5,400 "
                             "samples of 2049 then make ~54 shards: enough for many dp ranks × workers)")
    parser.add_argument("--val-fraction", type=float, default=0.02,
                        help="fraction of documents held out for validation (default 0.02)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="tokenising processes (default: cores, at most 8)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_input_arguments(parser, args)
    try:
        files = input_files(args)
        shard_samples = args.shard_samples or (100 if args.default_corpus else 1000)
        manifest = prepare(files, args.out, args.tokenizer, args.sample_tokens, shard_samples,
                           args.val_fraction, args.workers, args.text_field, progress=not args.quiet)
    except (OSError, ValueError, ImportError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, shards in manifest.splits.items():
        print(f"{split}: {manifest.documents[split]} documents, {len(shards)} shards, "
              f"{manifest.tokens(split):,} tokens in samples of {manifest.sample_tokens} "
              f"({manifest.dropped_tokens[split]} tail tokens dropped)")
        if not shards and (split == "train" or args.val_fraction > 0):
            print(f"warning: split {split!r} is empty ({manifest.documents[split]} documents, "
                  f"{manifest.dropped_tokens[split]} tokens < --sample-tokens)", file=sys.stderr)
    print(f"manifest: {Path(args.out) / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
