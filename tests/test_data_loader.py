"""The streaming loader: exactly-once epochs over dp ranks × workers, exact resume, mixtures, URLs."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_data_helpers import make_dataset, shard_keys

from data_pipeline.loader import DataError, Source, TokenLoader, TokenStream, build_loader

pytestmark = pytest.mark.timeout(90)
TIMEOUT = 30.0  # DataLoader: a stuck worker is an error, never a hang


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    # 425 samples of 33 tokens (seq_len 32) in 27 shards of ≤ 16: enough for 2 dp ranks × 2 workers
    return make_dataset(tmp_path_factory.mktemp("data"), "ds", n_docs=50, sample_tokens=33, shard_samples=16)


def take(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if n == 0:
        return out
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [2, 0])
def test_one_epoch_every_sample_once(dataset: tuple[Path, object], workers: int) -> None:
    folder, manifest = dataset
    expected = shard_keys(folder, manifest)
    seen: list[str] = []
    for rank in range(2):
        loader = build_loader(str(folder), rank, 2, batch_size=3, seq_len=32, num_workers=workers, epochs=1,
                              shuffle_buffer=10, timeout=TIMEOUT)
        for batch, keys in loader.batches_with_keys():
            assert batch.dtype == torch.int64 and batch.shape[1] == 33 and batch.shape[0] == len(keys) <= 3
            seen += keys
    assert len(seen) == len(expected) and set(seen) == set(expected)


def test_same_dp_rank_same_batches_and_epochs_differ(dataset: tuple[Path, object]) -> None:
    folder, _ = dataset
    a = take(build_loader(str(folder), 1, 2, 4, 32, num_workers=0), 12)
    b = take(build_loader(str(folder), 1, 2, 4, 32, num_workers=0), 12)  # e.g. the tp peer of rank 1
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = take(build_loader(str(folder), 0, 2, 4, 32, num_workers=0), 12)
    assert not all(torch.equal(x, y) for x, y in zip(a, other))
    stream = TokenStream([str(folder)], 32, 1, epochs=2, shuffle_buffer=4)
    keys = [k for _, k in TokenLoader(stream).batches_with_keys()]
    half = len(keys) // 2
    assert sorted(keys[:half]) == sorted(keys[half:]) and keys[:half] != keys[half:]  # reshuffled


def assert_resumes(make: callable, total: int, cut: int) -> dict:
    reference = take(make(), total)
    first = make()
    take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # plain types: survives json / torch.save
    resumed = make()
    resumed.load_state_dict(state)
    rest = take(resumed, total - cut)
    assert len(rest) == total - cut
    for i, (want, got) in enumerate(zip(reference[cut:], rest)):
        assert torch.equal(want, got), f"batch {cut + i} differs after resume"
    return state


@pytest.mark.parametrize(("workers", "cut"), [(0, 0), (0, 11), (2, 7)])
def test_resume_endless_mixture_with_packing(tmp_path: Path, dataset: tuple[Path, object], workers: int,
                                             cut: int) -> None:
    other, _ = make_dataset(tmp_path, "other", n_docs=30, sample_tokens=20, shard_samples=5, seed=1)
    folder, _ = dataset

    def make() -> TokenLoader:  # rows of 41 tokens cut across samples of 33 and 20: packing spans them
        return build_loader([Source(str(folder), 2.0), Source(str(other), 1.0)], 1, 2, batch_size=3,
                            seq_len=40, num_workers=workers, shuffle_buffer=7, seed=5, timeout=TIMEOUT)

    assert_resumes(make, 40, cut)  # ≈ 3 epochs of each reader: resume crosses epoch boundaries


@pytest.mark.parametrize("cut", [3, -1])  # -1: after one worker has ended
def test_resume_finite_with_uneven_workers(dataset: tuple[Path, object], cut: int) -> None:
    folder, manifest = dataset
    n_shards = len(manifest.splits["train"])
    assert n_shards % 2 == 1  # one worker reads more shards and ends later

    def make() -> TokenLoader:
        return build_loader(str(folder), 0, 1, batch_size=4, seq_len=32, num_workers=2, epochs=1,
                            shuffle_buffer=5, timeout=TIMEOUT)

    total = len(take(make(), 10_000))
    state = assert_resumes(make, total, cut % total)
    assert [p["done"] for p in state["workers"]] == ([False, True] if cut < 0 else [False, False])


def test_mixture_weights(tmp_path: Path) -> None:
    a, _ = make_dataset(tmp_path, "a", n_docs=20, sample_tokens=17, shard_samples=4)
    b, _ = make_dataset(tmp_path, "b", n_docs=20, sample_tokens=17, shard_samples=4, seed=3)
    loader = build_loader([Source(str(a), 3.0), Source(str(b), 1.0)], 0, 1, batch_size=10, seq_len=16,
                          num_workers=0, shuffle_buffer=8)
    counts: Counter[str] = Counter()
    for i, (_, keys) in enumerate(loader.batches_with_keys()):
        counts.update(Path(k.split("#")[0]).parent.name for k in keys)
        if i == 199:
            break
    share = counts["a"] / (counts["a"] + counts["b"])
    assert abs(share - 0.75) < 0.04, counts


def test_pipe_urls_and_resampled(dataset: tuple[Path, object]) -> None:
    folder, manifest = dataset
    names = [s.name for s in manifest.splits["train"]]
    piped = Source(str(folder), urls=[f"pipe:cat {folder / n}" for n in names])
    local = build_loader(str(folder), 0, 1, 2, 32, num_workers=0, epochs=1, shuffle=False)
    via_pipe = build_loader(piped, 0, 1, 2, 32, num_workers=0, epochs=1, shuffle=False)
    assert all(torch.equal(x, y) for x, y in zip(local, via_pipe, strict=True))
    # resampled: shards drawn with replacement; endless and allowed with more readers than shards
    loader = build_loader(str(folder), 0, 40, 2, 32, num_workers=2, resampled=True, timeout=TIMEOUT)
    assert len(take(loader, 30)) == 30


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) URLs with curl")
def test_http_urls(dataset: tuple[Path, object]) -> None:
    folder, manifest = dataset
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        names = [s.name for s in manifest.splits["train"]]
        remote = Source(str(folder), urls=[f"{base}/{n}" for n in names])
        local = build_loader(str(folder), 0, 1, 2, 32, num_workers=0, epochs=1, shuffle=False)
        via_http = build_loader(remote, 0, 1, 2, 32, num_workers=2, epochs=1, shuffle=False, timeout=TIMEOUT)
        assert sorted(map(tuple, torch.cat(list(local)).tolist())) == \
            sorted(map(tuple, torch.cat(list(via_http)).tolist()))
        missing = Source(str(folder), urls=[f"{base}/no-such-shard.tar"])
        with pytest.raises(DataError, match="no-such-shard.tar cannot be read"):
            next(iter(build_loader(missing, 0, 1, 2, 32, num_workers=0)))
    finally:
        server.shutdown()
        server.server_close()
