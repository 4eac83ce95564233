"""Writing token samples into WebDataset tar shards, and the manifest that describes them.

A shard is a plain tar whose members are `<key>.tokens`: one sample of `sample_tokens` token ids as a
little-endian uint16 (vocabulary ≤ 65536) or uint32 array. Tars are written reproducibly (fixed mtime,
owner) under a temporary name and renamed when complete; the manifest records each shard's sample
count, token count and sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    name: str
    samples: int
    tokens: int
    sha256: str


@dataclass
class Manifest:
    tokenizer: str
    vocab_size: int
    eos_id: int
    dtype: str
    sample_tokens: int
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    dropped_tokens: dict[str, int] = field(default_factory=dict)  # tail shorter than one sample
    documents: dict[str, int] = field(default_factory=dict)

    def write(self, out_dir: Path) -> None:
        tmp = out_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, out_dir / MANIFEST)

    @classmethod
    def read(cls, data_dir: str | Path) -> Manifest:
        path = Path(data_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: prepare the dataset first "
                                    "(python -m data_pipeline.prepare --help)")
        try:
            raw = json.loads(path.read_text())
            raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
            return cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a valid manifest: {err}") from err


class ShardWriter:
    """Cuts one split's token stream into samples and the samples into shards."""

    def __init__(self, out_dir: Path, split: str, sample_tokens: int, shard_samples: int, dtype: np.dtype):
        self.out_dir, self.split = out_dir, split
        self.sample_tokens, self.shard_samples, self.dtype = sample_tokens, shard_samples, dtype
        self.pending: list[int] = []
        self.shards: list[ShardInfo] = []
        self.tar: tarfile.TarFile | None = None
        self.in_shard = 0

    def add(self, ids: list[int]) -> None:
        self.pending.extend(ids)
        while len(self.pending) >= self.sample_tokens:
            self._write_sample(self.pending[: self.sample_tokens])
            del self.pending[: self.sample_tokens]

    def _path(self, index: int, partial: bool = False) -> Path:
        return self.out_dir / (f"{self.split}-{index:05d}.tar" + (".partial" if partial else ""))

    def _write_sample(self, ids: list[int]) -> None:
        if self.tar is None:
            path = self._path(len(self.shards), partial=True)
            self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (spans calls)
            self.in_shard = 0
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        info = tarfile.TarInfo(f"{self.split}{len(self.shards):05d}_{self.in_shard:06d}.tokens")
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
        return len(self.pending)
