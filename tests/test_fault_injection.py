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
STEPS = 40


def command(dataset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pretrain.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"data.train={dataset}", "data.default_corpus=false", "data.seq_len=32", "data.batch_size=2",
            "model.dim=32", "model.n_heads=2", "model.window=8", "model.segment_len=16",
            "model.memory_chunk=8", f"train.out_dir={out}", f"train.steps={STEPS}", "train.warmup_steps=2",
            "train.eval_every=6",
            "train.eval_batches=2", "train.checkpoint_every=1", "train.keep_last=2", "train.log_every=1"]


def run(args: list[str], kill_at_step: int | None = None, delay: float = 0.0) -> bool:
    """Run to the end; or, once the run has checkpointed step `kill_at_step`, wait `delay` seconds (the
    process is then stepping, loading data or writing the next checkpoint) and SIGKILL it. Returns
    whether it was killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("train.out_dir=")))
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        ckpt = latest_checkpoint(out) if kill_at_step is not None else None
        if ckpt is not None and int(ckpt.name.split("_")[1]) >= kill_at_step:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
        raise AssertionError("the run did not finish within 240 s")
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
    return False


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out)
    verify_checkpoint(ckpt)
    state = load_checkpoint(ckpt)
    assert state["step"] == STEPS
    return state["model"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("writer", [[], ["train.async_checkpoint=true"]], ids=["in-the-step", "background"])
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(dataset, tmp_path, writer):
    """Checkpoints written in the step, or by the background writer (a kill then often lands while a
    checkpoint is half written and the next step runs)."""
    started = time.monotonic()
    run(command(dataset, tmp_path / "whole"))
    step_seconds = (time.monotonic() - started) / STEPS  # an upper bound (start-up included)
    want = final_weights(tmp_path / "whole")

    rng = random.Random(20261125)
    out = tmp_path / "killed"
    targets = sorted(rng.sample(range(1, STEPS - 1), KILLS))  # spread over the whole run
    kills = sum(run(command(dataset, out) + writer, kill_at_step=target, delay=rng.uniform(0, step_seconds))
                for target in targets)  # each restart resumes from the newest good checkpoint
    assert kills >= KILLS - 1  # (a kill late in a run's last step can miss it)
    run(command(dataset, out) + writer)  # the last restart runs to the end
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
