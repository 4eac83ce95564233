"""Checkpoints that are never silently wrong, and runs that fail before they start.

Each test reproduces a fault found by trying the stack as a new user would: a corrupt or truncated
newest checkpoint, a run folder reused with another model, a mistyped data path, signals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_helpers import small_config

from pretrain.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CorruptCheckpointError,
    list_checkpoints,
    newest_good_checkpoint,
    verify_checkpoint,
)
from pretrain.model_io import load_model
from pretrain.train import train


def flip_bytes(path: Path, offset_fraction: float = 0.5, count: int = 32) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_fraction)
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """An uninterrupted 20-step run, checkpoints every 5 steps."""
    out = tmp_path_factory.mktemp("whole")
    return train(small_config(dataset, out)), out


def test_every_checkpoint_has_a_manifest_with_the_checksum_of_every_file(finished):
    _, out = finished
    for ckpt in list_checkpoints(out):
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
        files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST_FILE}
        assert set(manifest["files"]) == files
        verify_checkpoint(ckpt)


@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["flipped bytes", "truncated"])
def test_a_damaged_newest_checkpoint_is_reported_and_skipped_for_the_newest_good_one(
        dataset, finished, tmp_path, damage, capsys):
    whole, _ = finished
    out = tmp_path / "run"
    train(small_config(dataset, out, "train.stop_after_steps=15"))
    newest = list_checkpoints(out)[-1]
    assert newest.name == "step_00000015"
    damage(newest / STATE_FILE)
    with pytest.raises(CorruptCheckpointError, match=f"{newest / STATE_FILE}"):
        verify_checkpoint(newest)
    resumed = train(small_config(dataset, out))
    assert f"skipped a bad checkpoint: checkpoint file {newest / STATE_FILE}" in capsys.readouterr().out
    assert resumed.losses == whole.losses  # resumed at step 10, never from the damaged step 15


def test_no_good_checkpoint_is_a_clear_error(dataset, tmp_path):
    out = tmp_path / "run"
    train(small_config(dataset, out, "train.steps=10", "train.warmup_steps=1"))
    for ckpt in list_checkpoints(out):
        flip_bytes(ckpt / STATE_FILE)
    with pytest.raises(CorruptCheckpointError, match="no good checkpoint in .*step_00000010.*step_00000005"):
        train(small_config(dataset, out, "train.steps=10", "train.warmup_steps=1"))


def test_evaluation_refuses_a_corrupt_checkpoint(dataset, tmp_path):
    out = tmp_path / "run"
    train(small_config(dataset, out, "train.steps=5", "train.warmup_steps=1"))
    ckpt = list_checkpoints(out)[-1]
    load_model(ckpt)  # a good one loads
    flip_bytes(ckpt / STATE_FILE, 0.9)
    with pytest.raises(CorruptCheckpointError, match="does not match its manifest checksum"):
        load_model(ckpt)
    with pytest.raises(CorruptCheckpointError, match="no good checkpoint"):
        newest_good_checkpoint(out)


def test_resume_from_a_chosen_checkpoint(dataset, finished, tmp_path):
    whole, source = finished
    ckpt = [c for c in list_checkpoints(source) if c.name == "step_00000010"][0]
    resumed = train(small_config(dataset, tmp_path / "new", f"train.resume_from={ckpt}"))
    assert resumed.losses == whole.losses  # steps 1-10 from the checkpoint, 11-20 recomputed bitwise


def test_init_from_takes_the_weights_only(dataset, finished, tmp_path):
    whole, source = finished
    fresh = train(small_config(dataset, tmp_path / "fresh", "train.steps=3", "train.warmup_steps=1",
                               f"train.init_from={source}"))
    assert fresh.last_step == 3 and len(fresh.losses) == 3  # a new run: step 0, new optimizer
    assert fresh.losses[0] < whole.losses[0] - 0.5  # but from trained weights
    state = torch.load(list_checkpoints(tmp_path / "fresh")[-1] / STATE_FILE, weights_only=False)
    assert state["step"] == 3
