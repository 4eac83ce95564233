"""Data pipeline throughput: `prepare` on the default corpus, and the streaming loader, in tokens/s.

    python bench/data_throughput.py                  # full default corpus (the stdlib's sources, ~11 MB)
    python bench/data_throughput.py --max-bytes 4000000 --batches 200 --bpe

Prints a markdown table. `prepare` rows time the whole CLI function (listing, reading, tokenising,
writing shards, checksums). Loader rows time batches (B=8, seq_len+1 tokens each) after the first one
(steady state; worker start-up is reported separately), endless mode with shuffling, 2 DataLoader
workers unless stated; "packing" cuts 2049-token samples into rows of 1025; "resume" is the time to
the first batch after `load_state_dict` halfway through a worker's epoch (it re-reads that epoch).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.corpus import default_corpus_files  # noqa: E402
from data_pipeline.prepare import prepare  # noqa: E402
from data_pipeline.train_tokenizer import train_bpe  # noqa: E402


def time_prepare(files: list, out: Path, tokenizer: str, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    manifest = prepare(files, out, tokenizer, sample_tokens=2049, shard_samples=100, workers=workers,
                       progress=False)
    seconds = time.perf_counter() - start
    return seconds, manifest.tokens("train") + manifest.tokens("val")


def time_loader(make: Callable, batches: int) -> tuple[float, float, int]:
    """(seconds to the first batch, steady tokens/s over `batches` more, tokens per batch)."""
    start = time.perf_counter()
    it = iter(make())
    first = next(it)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return startup, batches * first.numel() / (time.perf_counter() - start), first.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-bytes", type=int, default=None, help="cap on the default corpus")
    parser.add_argument("--batches", type=int, default=300, help="batches timed per loader row")
    parser.add_argument("--bpe", action="store_true", help="also time prepare with a trained 8K BPE")
    args = parser.parse_args()
    files = default_corpus_files(args.max_bytes)
    corpus_bytes = sum(f.path.stat().st_size for f in files)
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for workers in (1, 2):
            seconds, tokens = time_prepare(files, root / f"bytes{workers}", "bytes", workers)
            rows.append((f"prepare, bytes tokenizer, {workers} worker(s)", f"{tokens / seconds:,.0f}",
                         f"{tokens:,} tokens in {seconds:.2f} s"))
        if args.bpe:
            start = time.perf_counter()
            tok = train_bpe(files, 8192, root / "bpe" / "tokenizer.json")
            train_s = time.perf_counter() - start
            for workers in (1, 2):
                seconds, tokens = time_prepare(files, root / f"bpe{workers}", str(tok), workers)
                rows.append((f"prepare, 8K BPE (tokenizers), {workers} worker(s)", f"{tokens / seconds:,.0f}",
                             f"{tokens:,} tokens in {seconds:.2f} s; BPE training {train_s:.1f} s"))
        # imported here: prepare's spawned workers re-import this script, and should not pay for torch
        from data_pipeline.loader import TokenLoader, build_loader

        data = str(root / "bytes1")
        configs = [("loader, 2 workers, seq_len 2048", 2, 2048), ("loader, 0 workers, seq_len 2048", 0, 2048),
                   ("loader, 2 workers, packing to seq_len 1024", 2, 1024)]
        for name, workers, seq_len in configs:
            def make(w: int = workers, s: int = seq_len) -> TokenLoader:
                return build_loader(data, 0, 1, 8, s, num_workers=w, shuffle_buffer=1000)

            startup, rate, per_batch = time_loader(make, args.batches)
            note = f"B=8 × {per_batch // 8} tokens; first batch after {startup:.2f} s"
            rows.append((name, f"{rate:,.0f}", note))
        loader = build_loader(data, 0, 1, 8, 2048, num_workers=2, shuffle_buffer=1000)
        it = iter(loader)
        for _ in range(150):
            next(it)
        state = loader.state_dict()
        del it
        resumed = build_loader(data, 0, 1, 8, 2048, num_workers=2, shuffle_buffer=1000)
        resumed.load_state_dict(state)
        startup, rate, _ = time_loader(lambda: resumed, args.batches)
        rows.append(("loader, 2 workers, after resume at batch 150", f"{rate:,.0f}",
                     f"first batch after {startup:.2f} s (replays the current epoch)"))
    print(f"\nDefault corpus: {len(files)} stdlib files, {corpus_bytes / 1e6:.1f} MB; {os.cpu_count()} "
          f"cores (load average {os.getloadavg()[0]:.1f}), Python {platform.python_version()}\n")
    print("| what | tokens/s | notes |")
    print("|---|---:|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate} | {note} |")


if __name__ == "__main__":
    main()
