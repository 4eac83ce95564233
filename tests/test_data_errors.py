"""Bad data: each case is an error naming the file and the fault, or a counted, logged skip; never a hang."""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path

import pytest
from test_data_helpers import make_dataset, shard_keys, write_docs

from data_pipeline.errors import CorruptShardError, DataError
from data_pipeline.loader import Source, build_loader
from data_pipeline.prepare import prepare

pytestmark = pytest.mark.timeout(90)
TIMEOUT = 30.0


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, object]:
    return make_dataset(tmp_path, "ds", n_docs=30, sample_tokens=33, shard_samples=16)


def epoch_keys(folder: Path, workers: int = 0, **kwargs: object) -> list[str]:
    loader = build_loader(str(folder), 0, 1, 2, 32, num_workers=workers, epochs=1, timeout=TIMEOUT, **kwargs)
    return [k for _, keys in loader.batches_with_keys() for k in keys]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_is_an_error_naming_it(dataset: tuple[Path, object], workers: int) -> None:
    folder, manifest = dataset
    bad = folder / manifest.splits["train"][1].name
    flip_byte(bad, 600)  # inside the first sample's token bytes: only the checksum can tell
    with pytest.raises(CorruptShardError, match=rf"{bad.name}.*sha256"):
        epoch_keys(folder, workers)


def test_corrupt_shards_skipped_up_to_the_limit(dataset: tuple[Path, object],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    folder, manifest = dataset
    shards = manifest.splits["train"]
    bad = folder / shards[2].name
    flip_byte(bad, 600)
    with caplog.at_level(logging.WARNING):
        loader = build_loader(str(folder), 0, 1, 2, 32, num_workers=0, epochs=1, max_corrupt_shards=1)
        keys = [k for _, ks in loader.batches_with_keys() for k in ks]
    expected = [k for k in shard_keys(folder, manifest) if not k.startswith(str(bad))]
    assert sorted(keys) == sorted(expected)  # everything else, exactly once
    assert loader.corrupt_shards == [str(bad)] and loader.state_dict()["workers"][0]["corrupt"] == [str(bad)]
    assert any(bad.name in r.getMessage() and "1 of 1" in r.getMessage() for r in caplog.records)
    flip_byte(folder / shards[5].name, 700)  # a second one is over the limit, even in another worker
    with pytest.raises(CorruptShardError, match="corrupt shards: 2, allowed by max_corrupt_shards: 1"):
        epoch_keys(folder, max_corrupt_shards=1)
    either = r"(corrupt shards: 2, allowed by |2 corrupt shards on dp rank 0 exceed )max_corrupt_shards\W+1"
    with pytest.raises(CorruptShardError, match=either):
        epoch_keys(folder, workers=2, max_corrupt_shards=1)


def test_truncated_shard(dataset: tuple[Path, object]) -> None:
    folder, manifest = dataset
    bad = folder / manifest.splits["train"][0].name
    data = bad.read_bytes()
    bad.write_bytes(data[: 3 * 1024 + 512 + 30])  # cut inside the 4th member's data (512 B header + block)
    with pytest.raises(CorruptShardError, match=rf"{bad.name}.*sha256"):
        epoch_keys(folder)
    with pytest.raises(CorruptShardError, match=rf"{bad.name}: not a readable tar"):
        epoch_keys(folder, verify_checksums=False)
    bad.write_bytes(data[:1024])  # cut at a member boundary: one sample left, the tar parses
    with pytest.raises(CorruptShardError, match=rf"{bad.name}: 1 samples, the manifest says 16"):
        epoch_keys(folder, verify_checksums=False)
    bad.write_bytes(b"")
    with pytest.raises(CorruptShardError, match=rf"{bad.name}: empty file"):
        epoch_keys(folder)


def test_missing_shard_and_missing_manifest(dataset: tuple[Path, object], tmp_path: Path) -> None:
    folder, manifest = dataset
    gone = folder / manifest.splits["train"][3].name
    gone.unlink()
    with pytest.raises(DataError, match=rf"missing shard\(s\): .*{gone.name}"):
        build_loader(str(folder), 0, 1, 2, 32, num_workers=0)
    piped = Source(str(folder), urls=[f"pipe:cat {gone}"])
    with pytest.raises(DataError, match=rf"shard pipe:cat {gone} cannot be read"):
        next(iter(build_loader(piped, 0, 1, 2, 32, num_workers=0)))
    with pytest.raises(DataError, match=r"manifest\.json does not exist"):
        build_loader(str(tmp_path / "nowhere"), 0, 1, 2, 32, num_workers=0)


def test_empty_dataset(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "text", 2, words=(1, 2))
    with pytest.raises(ValueError, match=r"the training split is empty \(2 documents, fewer tokens than one "
                                         r"sample of 2049\): add documents or lower --sample-tokens"):
        prepare(docs, tmp_path / "tiny", sample_tokens=2049, val_fraction=0.0, progress=False)
    prepare(docs, tmp_path / "tiny", sample_tokens=4, val_fraction=0.0, progress=False)
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    manifest["splits"]["train"] = []  # a dataset whose shards were all removed
    (tmp_path / "tiny" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"tiny: split 'train' has no shards \(empty dataset\)"):
        build_loader(str(tmp_path / "tiny"), 0, 1, 2, 2048, num_workers=0)
    with pytest.raises(DataError, match="no split 'test'"):
        build_loader(Source(str(tmp_path / "tiny"), split="test"), 0, 1, 2, 2048, num_workers=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_token_id_out_of_range(dataset: tuple[Path, object], workers: int) -> None:
    folder, _ = dataset
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    raw["vocab_size"] = 100  # the texts hold bytes ≥ 100 ('e', 'm', …): the data and manifest disagree
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"shard .*train-000\d\d\.tar, sample train_\d+_\d+: token id \d+ >= "
                                        r"vocab size 100"):
        epoch_keys(folder, workers)


def test_more_readers_than_shards(dataset: tuple[Path, object], tmp_path: Path) -> None:
    folder, manifest = dataset
    n = len(manifest.splits["train"])
    layout = rf"has {n} shard\(s\) but {n} dp rank\(s\) × 2 worker\(s\) = {2 * n} readers"
    with pytest.raises(DataError, match=layout):
        build_loader(str(folder), 0, n, 2, 32, num_workers=2)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    loader = build_loader(str(copy), 0, 1, 2, 32, num_workers=0)
    with pytest.raises(DataError, match="num_workers=2"):
        other = build_loader(str(copy), 0, 1, 2, 32, num_workers=2)
        other.load_state_dict(loader.state_dict())


@pytest.mark.timeout(60)
def test_stuck_source_times_out(dataset: tuple[Path, object]) -> None:
    folder, manifest = dataset
    urls = [f"pipe:sleep 6; cat {folder / s.name}" for s in manifest.splits["train"]]
    stuck = Source(str(folder), urls=urls)
    loader = build_loader(stuck, 0, 1, 2, 32, num_workers=2, timeout=1.0)
    with pytest.raises(DataError, match=r"within timeout=1.0 s: a stuck shard source"):
        next(iter(loader))
    gc.collect()  # torch joins each stuck worker for 5 s before killing it: pay it here, not in another test
