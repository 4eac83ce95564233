"""`python -m pretrain.status`: a run's state from its folder: finished or stopped, running (the lock's
holder), its last losses, its checkpoints (and with --verify the bad ones), a table of many."""

from __future__ import annotations

import pytest
from run_helpers import small_config

from pretrain.checkpoint import STATE_FILE, list_checkpoints
from pretrain.run_lock import hold_run_lock
from pretrain.status import main, run_status
from pretrain.train import train


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status")
    finished = train(small_config(dataset, tmp / "finished", "train.steps=6", "train.eval_every=3"))
    train(small_config(dataset, tmp / "stopped", "train.steps=6", "train.stop_after_steps=2"))
    return tmp, finished


def test_a_finished_run_says_its_steps_losses_and_checkpoints(runs, capsys):
    tmp, finished = runs
    status = run_status(tmp / "finished")
    assert (status.state, status.step, status.steps, status.layers) == ("finished", 6, 6, "mac,mag")
    assert status.last["val/loss"] == (6, pytest.approx(finished.val_losses[6], rel=1e-6))
    assert status.last["train/loss"] == (6, pytest.approx(finished.losses[-1], rel=1e-6))  # the last step
    assert main([str(tmp / "finished")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp / 'finished'}: finished, step 6 of 6, layers mac,mag\n")
    assert "  checkpoints: step_00000005, step_00000006" in out


def test_a_stopped_run_a_running_one_and_a_table(runs, capsys):
    tmp, _ = runs
    assert run_status(tmp / "stopped").state == "stopped at step 2"
    held, _ = hold_run_lock(tmp / "stopped", wait_s=0)
    try:
        assert run_status(tmp / "stopped").state.startswith("running (host ")
    finally:
        held.close()
    assert main([str(tmp / "finished"), str(tmp / "stopped")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | state | step | train loss | val loss | tokens/s |"
    assert lines[2].startswith(f"| {tmp / 'finished'} | finished | 6/6 | ")
    assert lines[3].startswith(f"| {tmp / 'stopped'} | stopped at step 2 | 2/6 | ")
    assert main([str(tmp / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_verify_names_a_corrupt_checkpoint(runs, tmp_path, capsys):
    import shutil

    tmp, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(tmp / "finished", copy)
    state = list_checkpoints(copy)[-1] / STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert main([str(copy), "--verify"]) == 1
    assert "BAD: checkpoint file" in capsys.readouterr().out
