"""train.async_checkpoint: checkpoints written in a background thread while training goes on. Each one
equals the synchronous run's (bitwise) even while the next steps change the weights it was taken from; a
run resumes from them bitwise; a write that fails stops the run with the synchronous path's error at the
next save. Multi-process layouts (FSDP, tp × pp, a full disk on one rank) are in tests/test_fsdp.py and
tests/test_parallel.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from run_helpers import fill_disk, small_config

import pretrain.train as train_module
from pretrain.async_checkpoint import AsyncCheckpointWriter, detached_copy
from pretrain.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.train import CheckpointWriteError, train

STEPS = ("train.steps=8", "train.checkpoint_every=2", "train.keep_last=10", "train.eval_every=0")


@pytest.fixture
def slow_commit(monkeypatch):
    """The background thread waits 0.3 s before it commits (as if other ranks were still writing), so
    training steps run in between; returns the steps committed from a thread other than the main one."""
    real_wait, real_save = AsyncCheckpointWriter._every_rank_wrote, train_module.save_checkpoint
    committed = []

    def slow_wait(self, marks):
        time.sleep(0.3)
        return real_wait(self, marks)

    def save(out, step, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            committed.append(step)
        return real_save(out, step, *args, **kwargs)

    monkeypatch.setattr(AsyncCheckpointWriter, "_every_rank_wrote", slow_wait)
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    return committed


def states(run: Path) -> dict[int, dict]:
    return {int(c.name[5:]): load_checkpoint(c) for c in list_checkpoints(run)}


def assert_same_state(got: dict, want: dict) -> None:
    assert got["step"] == want["step"] and got["losses"] == want["losses"] and got["data"] == want["data"]
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    for index, entry in want["optimizer"]["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][index][k], v) for k, v in entry.items())


def test_background_checkpoints_equal_the_synchronous_ones(dataset, tmp_path, slow_commit):
    sync = train(small_config(dataset, tmp_path / "sync", *STEPS))
    background = train(small_config(dataset, tmp_path / "async", *STEPS, "train.async_checkpoint=true"))
    assert slow_commit == [2, 4, 6, 8]  # every one committed by the writer thread
    assert background.losses == sync.losses
    assert background.checkpoint == tmp_path / "async" / "checkpoints" / "step_00000008"
    got, want = states(tmp_path / "async"), states(tmp_path / "sync")
    assert sorted(got) == sorted(want) == [2, 4, 6, 8]
    for step in want:
        verify_checkpoint(tmp_path / "async" / "checkpoints" / f"step_{step:08d}")
        assert_same_state(got[step], want[step])
    assert not list((tmp_path / "async" / "checkpoints").glob(".*"))  # no staging folder or marks left


def test_a_run_resumes_from_background_checkpoints_bitwise(dataset, tmp_path, slow_commit):
    whole = train(small_config(dataset, tmp_path / "whole", *STEPS))
    run = [*STEPS, "train.async_checkpoint=true"]
    first = train(small_config(dataset, tmp_path / "split", *run, "train.stop_after_steps=3"))
    assert first.last_step == 3 and first.checkpoint.name == "step_00000003"  # committed before it stops
    second = train(small_config(dataset, tmp_path / "split", *run))
    assert second.losses == whole.losses
    assert_same_state(states(tmp_path / "split")[8], states(tmp_path / "whole")[8])


def test_a_background_write_that_fails_stops_the_run_at_the_next_save(dataset, tmp_path, monkeypatch):
    fill_disk(monkeypatch, lambda step: step == 4)
    message = (r"writing the checkpoint of step 4 failed \(rank 0: \[Errno 28\] No space left on device\); "
               r"the last good checkpoint is .*step_00000002: free")
    with pytest.raises(CheckpointWriteError, match=message):
        train(small_config(dataset, tmp_path / "run", *STEPS, "train.async_checkpoint=true"))
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def test_deepspeed_zero_cannot_checkpoint_in_the_background():
    with pytest.raises(ConfigError, match="train.async_checkpoint with parallel.zero_stage=2: DeepSpeed"):
        load_config(None, ["train.async_checkpoint=true", "parallel.zero_stage=2"])
    assert load_config(None, ["train.async_checkpoint=true", "parallel.zero_stage=1", "parallel.tp=2",
                              "model.n_heads=4"]).train.async_checkpoint


def test_the_copy_is_the_values_at_the_time_of_the_save():
    live = {"w": torch.ones(3), "groups": [{"m": torch.zeros(2)}], "step": 4}
    copy = detached_copy(live)
    live["w"].add_(1)
    live["groups"][0]["m"].add_(1)
    assert torch.equal(copy["w"], torch.ones(3)) and torch.equal(copy["groups"][0]["m"], torch.zeros(2))
    assert copy["step"] == 4


def test_marks_left_by_an_interrupted_attempt_are_cleared_before_the_same_step_is_saved(dataset, tmp_path,
                                                                                       monkeypatch):
    """A run killed after rank 1 marked its files of step 4, resumed from step 2: when it saves step 4
    again, the old mark must not let rank 0 commit before rank 1 has rewritten them."""
    from parallel.mesh import Mesh

    writer = AsyncCheckpointWriter(Mesh(), tmp_path, timeout_s=1)
    writer.marks(4).mkdir(parents=True)
    (writer.marks(4) / "1.done").touch()
    writer.clear_marks(4)
    assert not writer.marks(4).exists()
    cleared, real = [], AsyncCheckpointWriter.clear_marks
    monkeypatch.setattr(AsyncCheckpointWriter, "clear_marks",
                        lambda self, step: (cleared.append(step), real(self, step)))
    train(small_config(dataset, tmp_path / "run", *STEPS, "train.async_checkpoint=true"))
    assert cleared == [2, 4, 6, 8]  # at every save, before it starts
