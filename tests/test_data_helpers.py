"""Shared builders for the data-pipeline tests: small deterministic corpora and prepared datasets."""

from __future__ import annotations

import json
import random
import shutil
import tarfile
from pathlib import Path

from data_pipeline.prepare import prepare
from data_pipeline.shards import Manifest

WORDS = ["memory", "surprise", "momentum", "gate", "attention", "window", "token", "segment", "chunk",
         "layer", "weight", "decay", "ünïcode", "記憶", "forget", "learn", "test", "time", "neural"]


def write_docs(folder: Path, n_docs: int, seed: int = 0, words: tuple[int, int] = (20, 60)) -> list[Path]:
    """n_docs small text files of random words (including multi-byte UTF-8), deterministic."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + "\n"
        path = folder / f"doc{i:03d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def make_dataset(root: Path, name: str = "ds", n_docs: int = 40, sample_tokens: int = 33,
                 shard_samples: int = 8, val_fraction: float = 0.0, seed: int = 0) -> tuple[Path, Manifest]:
    """A prepared byte-level dataset in root/name (text in root/name-text)."""
    docs = write_docs(root / f"{name}-text", n_docs, seed)
    out = root / name
    manifest = prepare(docs, out, "bytes", sample_tokens=sample_tokens, shard_samples=shard_samples,
                       val_fraction=val_fraction, workers=1, progress=False)
    return out, manifest


def shard_keys(folder: Path, manifest: Manifest, split: str = "train") -> list[str]:
    """Every sample key of a split as the loader reports it (`url#key`), read with plain tarfile."""
    keys = []
    for shard in manifest.splits[split]:
        url = str(folder / shard.name)
        with tarfile.open(url) as tar:
            keys += [f"{url}#{m.name.split('.')[0]}" for m in tar.getmembers()]
    return keys


def copy_with_tokenizer(dataset: Path, out: Path, kind: str, file: str) -> Path:
    """A copy of a prepared dataset whose manifest says another tokenizer made it (`kind` from `file`, the
    same vocabulary size): what the checks that datasets share one tokenizer must catch."""
    shutil.copytree(dataset, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"] = {"type": kind, "path": file, "sha256": "0" * 64, "vocab_size": 257, "eos_id": 256}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out
