"""The data pipeline's errors: each message names the dataset, shard or sample and what is wrong."""

from __future__ import annotations


class DataError(RuntimeError):
    """A problem with the data (missing shard, empty dataset, token id out of range, bad layout)."""


class CorruptShardError(DataError):
    """A shard whose bytes are damaged (bad tar, checksum, sizes); skippable under max_corrupt_shards."""
