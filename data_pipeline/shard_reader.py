"""Reading one token shard through webdataset, checked end to end before any sample is used.

A shard is read whole (webdataset's `gopen`: local files, `pipe:` commands, http(s) via curl), its
sha256 compared with the manifest, then expanded with webdataset's tar iterator and key grouping. Every
sample must be one `.tokens` member of exactly `sample_tokens` ids, the count must match the manifest
and no id may reach the vocabulary size. Reading whole shards (a few MB each) makes a corrupt shard
all-or-nothing: either every sample is used or none is, so a skip never leaves half a shard behind and a
resumed run sees exactly the same samples.
"""

from __future__ import annotations

import hashlib
import io
import logging

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipeline.errors import CorruptShardError, DataError
from data_pipeline.shards import Manifest, ShardInfo

log = logging.getLogger(__name__)


def fetch(url: str) -> bytes:
    """The shard's bytes; a missing or unreadable shard is a DataError naming it (never skipped)."""
    try:
        with wds.gopen(url) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise DataError(f"missing shard {url}") from err
    except (OSError, ValueError) as err:  # pipe exit status, curl failures, permissions
        raise DataError(f"shard {url} cannot be read: {err}") from err


def parse(url: str, data: bytes, manifest: Manifest, info: ShardInfo | None, verify: bool = True
          ) -> tuple[list[str], np.ndarray]:
    """(keys, tokens of shape (samples, sample_tokens)) of a shard's bytes; CorruptShardError if damaged."""
    if not data:
        raise CorruptShardError(f"corrupt shard {url}: empty file")
    if verify and info is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise CorruptShardError(f"corrupt shard {url}: sha256 {digest[:12]}… differs from the "
                                    f"manifest's {info.sha256[:12]}… (truncated or modified file)")
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    expected = manifest.sample_tokens * dtype.itemsize
    keys, blobs = [], []
    try:
        files = tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
        for sample in group_by_keys(files):
            blob = sample.get("tokens")
            if blob is None or len(blob) != expected:
                size = "no .tokens member" if blob is None else f"{len(blob)} bytes"
                raise CorruptShardError(f"corrupt shard {url}: sample {sample['__key__']} has {size}, "
                                        f"expected {expected} ({manifest.sample_tokens} × {manifest.dtype})")
            keys.append(sample["__key__"])
            blobs.append(blob)
    except CorruptShardError:
        raise
    except Exception as err:  # tarfile.ReadError, duplicate members, … (webdataset appends " @ stream")
        reason = str(err.args[0] if err.args else err).split(" @ <")[0]
        raise CorruptShardError(f"corrupt shard {url}: not a readable tar ({reason})") from err
    if not keys:
        raise CorruptShardError(f"corrupt shard {url}: no samples (empty or truncated tar)")
    if info is not None and len(keys) != info.samples:
        raise CorruptShardError(f"corrupt shard {url}: {len(keys)} samples, the manifest says {info.samples}")
    tokens = np.frombuffer(b"".join(blobs), dtype=dtype).reshape(len(keys), manifest.sample_tokens)
    peaks = tokens.max(axis=1)
    bad = np.flatnonzero(peaks >= manifest.vocab_size)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"shard {url}, sample {keys[i]}: token id {int(peaks[i])} >= vocab size "
                        f"{manifest.vocab_size} ({len(bad)} bad sample(s) in this shard; the data and the "
                        "manifest disagree: re-run prepare)")
    return keys, tokens


def read_shard(url: str, manifest: Manifest, info: ShardInfo | None, verify: bool = True
               ) -> tuple[list[str], np.ndarray]:
    return parse(url, fetch(url), manifest, info, verify)


class CorruptShards:
    """Distinct corrupt shards met so far; past `limit` it is an error (0: every corrupt shard is fatal).

    Counting distinct URLs keeps the count right when a resumed run or a later epoch meets the same
    shard again.
    """

    def __init__(self, limit: int, known: list[str] | None = None) -> None:
        self.limit = limit
        self.urls: set[str] = set(known or [])

    def report(self, url: str, err: CorruptShardError) -> None:
        if url in self.urls:
            log.debug("skipping known corrupt shard %s", url)
            return
        self.urls.add(url)
        if len(self.urls) > self.limit:
            raise CorruptShardError(f"{err} [corrupt shards: {len(self.urls)}, allowed by "
                                    f"max_corrupt_shards: {self.limit}]") from err
        log.warning("%s; skipped (%d of %d allowed corrupt shards)", err, len(self.urls), self.limit)
