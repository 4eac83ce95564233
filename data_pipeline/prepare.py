"""`python -m data_pipeline.prepare`: text → tokenised documents → WebDataset token shards + manifest.

    python -m data_pipeline.prepare --default-corpus --out data/stdlib-bytes
    python -m data_pipeline.prepare corpus/ extra.jsonl.gz --tokenizer tok/tokenizer.json --out data/mix

Documents are tokenised in parallel (`--workers`), each followed by the EOS id, concatenated per split
and cut into samples of `--sample-tokens` ids (seq_len + 1, so one sample is one training sequence).
Documents go to the validation split by a hash of their id, so the split is stable across runs.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from data_pipeline.corpus import default_corpus_files, expand_inputs, iter_documents
from data_pipeline.shards import Manifest, ShardWriter, token_dtype
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)


def _encode(item: tuple[str, str, str]) -> tuple[str, list[int]]:
    split, _, text = item
    assert _worker_tokenizer is not None
    return split, _worker_tokenizer.encode(text)


def split_of(doc_id: str, val_fraction: float) -> str:
    """Deterministic train/val assignment of a document from a hash of its id."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def prepare(files: list[Path], out_dir: str | Path, tokenizer: str = "bytes", sample_tokens: int = 257,
            shard_samples: int = 1000, val_fraction: float = 0.02, workers: int = 1,
            text_field: str = "text", progress: bool = True) -> Manifest:
    """Tokenise `files` into shards under `out_dir`; returns (and writes) the manifest."""
    if sample_tokens < 2 or shard_samples < 1 or not 0 <= val_fraction < 1:
        raise ValueError("need sample_tokens >= 2, shard_samples >= 1 and 0 <= val_fraction < 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(out, s, sample_tokens, shard_samples, dtype) for s in ("train", "val")}
    documents = {"train": 0, "val": 0}

    def docs() -> Iterator[tuple[str, str, str]]:
        for path in files:
            for doc_id, text in iter_documents(path, text_field):
                yield split_of(doc_id, val_fraction), doc_id, text

    bar = tqdm(total=len(files), unit="file", disable=not progress, desc="tokenising")
    seen_files: set[str] = set()

    def tick(doc_id: str) -> None:
        name = doc_id.split(":")[0]
        if name not in seen_files:
            seen_files.add(name)
            bar.update(1)

    items = docs()
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,))
        results = pool.imap(_encode, _tee_ids(items, tick), chunksize=8)
    else:
        _init_worker(tokenizer)
        pool, results = None, map(_encode, _tee_ids(items, tick))
    try:
        for split, ids in results:
            writers[split].add(ids + [tok.eos_id])
            documents[split] += 1
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    manifest = Manifest(tokenizer=tok.name, vocab_size=tok.vocab_size, eos_id=tok.eos_id, dtype=dtype.name,
                        sample_tokens=sample_tokens, documents=documents)
    for split, writer in writers.items():
        manifest.dropped_tokens[split] = writer.close()
        manifest.splits[split] = writer.shards
    manifest.write(out)
    return manifest


def _tee_ids(items: Iterator[tuple[str, str, str]], tick) -> Iterator[tuple[str, str, str]]:
    for item in items:
        tick(item[1])
        yield item


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="text files, directories, .jsonl or .jsonl.gz files")
    parser.add_argument("--default-corpus", action="store_true",
                        help="use the installed Python standard library's sources (no download)")
    parser.add_argument("--max-bytes", type=int, default=None, help="cap on the default corpus's size")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--tokenizer", default="bytes",
                        help="'bytes', a tokenizer.json or a SentencePiece .model")
    parser.add_argument("--sample-tokens", type=int, default=257, help="tokens per sample (seq_len + 1)")
    parser.add_argument("--shard-samples", type=int, default=1000, help="samples per shard")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="fraction of documents held out")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    parser.add_argument("--workers", type=int, default=max(1, min(8, multiprocessing.cpu_count())))
    args = parser.parse_args(argv)
    try:
        files = default_corpus_files(args.max_bytes) if args.default_corpus else expand_inputs(args.inputs)
        manifest = prepare(files, args.out, args.tokenizer, args.sample_tokens, args.shard_samples,
                           args.val_fraction, args.workers, args.text_field)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, shards in manifest.splits.items():
        tokens = sum(s.tokens for s in shards)
        print(f"{split}: {manifest.documents[split]} documents, {len(shards)} shards, {tokens:,} tokens")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
