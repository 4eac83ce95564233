"""Fault injection: a run SIGKILLed at random moments and restarted each time ends with the weights of an
uninterrupted run, bitwise; a flipped byte or a truncation of any checkpoint file is detected.

The kills land wherever the process happens to be: starting up, loading data, stepping, writing a
checkpoint (one per step, so writes take a good share of the time). CI kills 3 times; with RUN_SLOW=1,
20 times (recorded in bench/RESULTS.md).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CorruptCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    verify_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
KILLS = 20 if os.environ.get("RUN_SLOW") == "1" else 3
STEPS = 12


def command(dataset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pretrain.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"data.train={dataset}", "data.default_corpus=false", "data.seq_len=32", "data.batch_size=2",
            "model.dim=32", "model.n_heads=2", "model.window=8", "model.segment_len=16",
            "model.memory_chunk=8", f"train.out_dir={out}", f"train.steps={STEPS}", "train.warmup_steps=2",
            "train.eval_every=6",
            "train.eval_batches=2", "train.checkpoint_every=1", "train.keep_last=2", "train.log_every=1"]


def run(args: list[str], kill_after: float | None = None) -> int | None:
    """Run to the end (its exit code), or SIGKILL it after `kill_after` seconds (None if it was killed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=kill_after if kill_after is not None else 240)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            proc.kill()
            raise
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
    return proc.returncode


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out)
    verify_checkpoint(ckpt)
    state = load_checkpoint(ckpt)
    assert state["step"] == STEPS
    return state["model"]


@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    started = time.monotonic()
    run(command(dataset, tmp_path / "whole"))
    whole_seconds = time.monotonic() - started
    want = final_weights(tmp_path / "whole")

    rng = random.Random(20261125)
    out = tmp_path / "killed"
    kills = 0
    while kills < KILLS:  # each restart resumes from the newest good checkpoint the kills left
        if run(command(dataset, out), kill_after=rng.uniform(0.3, 1.0) * whole_seconds) is not None:
            break  # it finished before the kill: start the kills over on a fresh folder
        kills += 1
    run(command(dataset, out))  # the last restart runs to the end
    got = final_weights(out)
    assert set(got) == set(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, differ


def test_a_flipped_byte_or_a_truncation_of_any_checkpoint_file_is_detected(dataset, tmp_path):
    run(command(dataset, tmp_path) + ["train.steps=3", "train.eval_every=3"])
    ckpt = latest_checkpoint(tmp_path)
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    assert {STATE_FILE, MANIFEST_FILE} <= {p.name for p in files}
    rng = random.Random(0)
    for path in files:
        original = path.read_bytes()
        for damage in ("flip", "truncate"):
            data = bytearray(original)
            if damage == "flip":
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            else:
                data = data[: rng.randrange(len(data))]
            path.write_bytes(bytes(data))
            with pytest.raises(CorruptCheckpointError):
                verify_checkpoint(ckpt)
            path.write_bytes(original)
        verify_checkpoint(ckpt)
