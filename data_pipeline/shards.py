"""Writing token samples into WebDataset tar shards, and the manifest that describes them.

A shard is a plain tar whose members are `<key>.tokens`: one sample of `sample_tokens` token ids as a
little-endian uint16 (vocabulary ≤ 65536) or uint32 array. Tars are written reproducibly (fixed mtime,
owner) under a temporary name and renamed when complete; the manifest records each shard's sample
count, token count and sha256, which the loader checks, so corruption is caught, never trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.tokenizer import token_dtype

MANIFEST = "manifest.json"
FORMAT = "titans-tokens-v1"
__all__ = ["MANIFEST", "Manifest", "ShardInfo", "ShardWriter", "sha256_of", "token_dtype"]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's folder
    samples: int
    tokens: int
    sha256: str


@dataclass
class Manifest:
    tokenizer: dict[str, Any]  # {"type": "bytes" | "huggingface" | "sentencepiece", "path", "sha256", ...}
    vocab_size: int
    eos_id: int
    dtype: str  # "uint16" or "uint32", little-endian
    sample_tokens: int
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    dropped_tokens: dict[str, int] = field(default_factory=dict)  # tail shorter than one sample, per split
    documents: dict[str, int] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # where the text came from (and its licence)
    format: str = FORMAT

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits.get(split, []))

    def write(self, out_dir: Path) -> None:
        tmp = out_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, out_dir / MANIFEST)

    @classmethod
    def read(cls, data_dir: str | Path) -> Manifest:
        """From a dataset folder (or its manifest.json); a missing or malformed manifest names the path."""
        path = Path(data_dir)
        if path.name != MANIFEST:
            path = path / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: prepare the dataset first "
                                    "(python -m data_pipeline.prepare --help)")
        try:
            raw = json.loads(path.read_text())
            raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
            if isinstance(raw["tokenizer"], str):  # manifests written before the tokenizer was a dict
                raw["tokenizer"] = {"type": raw["tokenizer"]}
            manifest = cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} is not a valid manifest: {err!r}") from err
        if manifest.dtype not in ("uint16", "uint32") or manifest.sample_tokens < 1:
            raise ValueError(f"{path}: unsupported dtype {manifest.dtype!r} or sample_tokens "
                             f"{manifest.sample_tokens}")
        if manifest.vocab_size > np.iinfo(manifest.dtype).max + 1:
            raise ValueError(f"{path}: vocab size {manifest.vocab_size} does not fit dtype {manifest.dtype}")
        return manifest


class ShardWriter:
    """Cuts one split's token stream into samples and the samples into shards."""

    def __init__(self, out_dir: Path, split: str, sample_tokens: int, shard_samples: int, dtype: np.dtype):
        self.out_dir, self.split = out_dir, split
        self.sample_tokens, self.shard_samples, self.dtype = sample_tokens, shard_samples, np.dtype(dtype)
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.shards: list[ShardInfo] = []
        self.tar: tarfile.TarFile | None = None
        self.in_shard = 0

    def add(self, ids: np.ndarray | list[int]) -> None:
        """Append one document's ids (EOS included) to the stream; writes every completed sample."""
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.pending_len += len(self.pending[-1])
        if self.pending_len < self.sample_tokens:
            return
        stream = np.concatenate(self.pending)
        full = len(stream) // self.sample_tokens * self.sample_tokens
        for start in range(0, full, self.sample_tokens):
            self._write_sample(stream[start : start + self.sample_tokens])
        self.pending = [stream[full:]]
        self.pending_len = len(stream) - full

    def _path(self, index: int, partial: bool = False) -> Path:
        return self.out_dir / (f"{self.split}-{index:05d}.tar" + (".partial" if partial else ""))

    def _write_sample(self, ids: np.ndarray) -> None:
        if self.tar is None:
            path = self._path(len(self.shards), partial=True)
            self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (spans calls)
            self.in_shard = 0
        data = ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        info = tarfile.TarInfo(f"{self.split}_{len(self.shards):05d}_{self.in_shard:06d}.tokens")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        self.tar.addfile(info, io.BytesIO(data))
        self.in_shard += 1
        if self.in_shard == self.shard_samples:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self.tar is not None
        self.tar.close()
        index = len(self.shards)
        final = self._path(index)
        os.replace(self._path(index, partial=True), final)
        self.shards.append(ShardInfo(final.name, self.in_shard, self.in_shard * self.sample_tokens,
                                     sha256_of(final)))
        self.tar = None

    def close(self) -> int:
        """Finish the last shard; returns the number of tail tokens too few for one more sample."""
        if self.tar is not None:
            self._close_shard()
        return self.pending_len
