"""What one dataset of a (mixture) loader is: a prepared folder's manifest plus the URLs of its shards.

Shards default to the files the manifest lists next to it; `urls` overrides where they are read from
(local paths, `file:`, `pipe:` commands or http(s) URLs, brace patterns such as
`pipe:cat /data/train-{00000..00009}.tar`) while the manifest, read locally, still supplies the
dtype, vocabulary and per-shard checksums (matched by file name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from webdataset.shardlists import expand_urls

from data_pipeline.errors import DataError
from data_pipeline.shards import Manifest, ShardInfo


@dataclass
class Source:
    """One dataset of a mixture: a prepared folder (with manifest.json), its weight and split."""

    path: str
    weight: float = 1.0
    split: str = "train"
    urls: list[str] | str | None = None  # default: the manifest's shards next to it

    def resolve(self) -> ResolvedSource:
        try:
            manifest = Manifest.read(self.path)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"dataset {self.path}: {err}") from err
        infos = manifest.splits.get(self.split, [])
        if self.urls is None:
            if self.split not in manifest.splits:
                raise DataError(f"dataset {self.path}: no split {self.split!r} (has "
                                f"{', '.join(manifest.splits) or 'none'})")
            folder = Path(self.path) if Path(self.path).is_dir() else Path(self.path).parent
            urls = [str(folder / s.name) for s in infos]
            matched: list[ShardInfo | None] = list(infos)
        else:
            urls = expand_urls(self.urls) if isinstance(self.urls, str) else list(self.urls)
            by_name = {s.name: s for s in infos}
            matched = [by_name.get(shard_file_name(u)) for u in urls]
        if not urls:
            raise DataError(f"dataset {self.path}: split {self.split!r} has no shards (empty dataset)")
        if sum(s.samples for s in matched if s is not None) == 0 and all(s is not None for s in matched):
            raise DataError(f"dataset {self.path}: split {self.split!r} has no samples (empty dataset)")
        missing = [u for u in urls if is_local(u) and not Path(local_path(u)).is_file()]
        if missing:
            raise DataError(f"dataset {self.path}: missing shard(s): {', '.join(missing)}")
        return ResolvedSource(urls, manifest, matched, self)


class ResolvedSource(NamedTuple):
    """A tuple so that `urls, manifest = source.resolve()[:2]` keeps working for older callers."""

    urls: list[str]
    manifest: Manifest
    infos: list[ShardInfo | None]  # per url: what the manifest promises (None: unknown, unchecked)
    source: Source


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or re.match(r"^[A-Za-z]:[\\/]", url) is not None


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def shard_file_name(url: str) -> str:
    """The shard's file name inside any URL form, e.g. 'train-00003.tar' of 'pipe:cat /d/train-00003.tar'."""
    last = url[5:].split()[-1] if url.startswith("pipe:") and url[5:].split() else url
    return Path(urlparse(last).path or last).name
