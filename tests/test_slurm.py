"""The training job under a real Slurm (the local one-node cluster, slurm/local_cluster.sh): a 2-task job
trains; a job warned with USR1 saves, requeues itself and resumes to the same end, bitwise, as an
uninterrupted one; a killed task ends the job with an error in seconds; a scaling sweep runs as an array
job and is fitted.

Needs the cluster: skipped without it, failed without it under REQUIRE_SLURM=1 (.ci/run). Each job runs
under a deadline: a hang is cancelled and fails the test with the job's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_family
from slurm_helpers import cluster_env, ended, log_tail, task_pids, wait_until

from pretrain.checkpoint import latest_checkpoint, load_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
JOB_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    return cluster_env()


def overrides(dataset: Path, out: Path, steps: int = STEPS) -> list[str]:
    """The tiny config shrunk to a few seconds of CPU per run (as in tests/run_helpers.py)."""
    return [f"data.train={dataset}", "data.default_corpus=false", "data.seq_len=32", "data.batch_size=2",
            "model.dim=32", "model.n_heads=2", "model.window=8", "model.segment_len=16",
            "model.memory_chunk=8",
            f"train.out_dir={out}", f"train.steps={steps}", "train.warmup_steps=2", "train.eval_every=30",
            "train.eval_batches=2", "train.checkpoint_every=10", "train.log_every=5"]


def submit(slurm: dict[str, str], tmp: Path, extra: list[str], wait: bool) -> tuple[str, Path]:
    """`python -m slurm.submit` for a 2-task CPU job; returns (job id, log folder)."""
    args = [sys.executable, "-m", "slurm.submit", "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--tasks-per-node", "2", "--time", "00:10:00", "--log-dir", str(tmp / "logs"), *extra]
    try:
        done = subprocess.run(args + (["--wait"] if wait else []), cwd=ROOT, env=slurm, capture_output=True,
                              text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        job = next((line.split(": ")[1] for line in (err.stdout or b"").decode().splitlines()
                    if line.startswith("submitted")), None)
        if job:
            subprocess.run(["scancel", job], env=slurm, capture_output=True, timeout=30)
        pytest.fail(f"the job did not end within {JOB_TIMEOUT_S} s\n{log_tail(tmp / 'logs')}")
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    job = next((v for k, v in lines.items() if k.startswith("submitted")), None)
    assert job, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    folder = Path(lines["logs"])
    if wait:
        assert done.returncode == 0, f"job {job} exit {done.returncode}\n{log_tail(folder)}"
    return job, folder


def final_state(out: Path) -> dict:
    ckpt = latest_checkpoint(out)
    verify_checkpoint(ckpt)
    return load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def uninterrupted(slurm, dataset, tmp_path_factory):
    """A 2-task job, submitted with sbatch --wait, that runs from start to end."""
    tmp = tmp_path_factory.mktemp("slurm_whole")
    started = time.monotonic()
    job, folder = submit(slurm, tmp, overrides(dataset, tmp / "run"), wait=True)
    return {"job": job, "folder": folder, "out": tmp / "run", "seconds": time.monotonic() - started}


@pytest.mark.timeout(300)
def test_a_two_task_job_trains_and_writes_events_and_a_checkpoint(slurm, uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = (uninterrupted["folder"] / f"slurm-{uninterrupted['job']}.out").read_text()
    assert "2 tasks" in log and "batch: srun ended with exit code 0" in log, log
    assert "0: rank 1/2: tp 0/1, pp 0/1, sp 0/1, dp 1/2" in log, log  # both ranks in one process group
    assert "restart 0" in log and "rendezvous 127.0.0.1:" in log, log  # NodeAddr of the first node
    assert f"done: {STEPS} steps" in log, log
    state = final_state(uninterrupted["out"])
    assert state["step"] == STEPS and len(state["data"]) == 2  # a data position per rank
    events = EventAccumulator(str(uninterrupted["out"] / "tensorboard"))
    events.Reload()
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])
    assert events.Scalars("val/loss")[-1].step == STEPS


@pytest.mark.timeout(400)
def test_a_warned_job_saves_requeues_and_ends_bitwise_as_an_uninterrupted_one(slurm, dataset, tmp_path,
                                                                            uninterrupted):
    out = tmp_path / "run"
    job, folder = submit(slurm, tmp_path, overrides(dataset, out), wait=False)
    # warn it as a preemption would (--signal=B:USR1@N): USR1 to the batch shell, once training has begun
    wait_until(job, slurm, folder, "a first checkpoint", JOB_TIMEOUT_S,
               lambda f: ended(f) or latest_checkpoint(out) is not None)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True, timeout=30)
    # Slurm holds a requeued job for about two minutes (its BeginTime) while the node forgets the old
    # allocation; a start within the same second is refused ("credential revoked"). Start it 3 s later.
    fields = wait_until(job, slurm, folder, "the requeue", JOB_TIMEOUT_S,
                        lambda f: ended(f) or (f.get("JobState") == "PENDING" and f.get("Restarts") == "1"))
    if fields.get("JobState") == "PENDING":
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, timeout=30)
    fields = wait_until(job, slurm, folder, "the end of the requeued job", JOB_TIMEOUT_S, ended)
    if fields.get("JobState") != "COMPLETED" or fields.get("Restarts") != "1":  # the whole log, untruncated
        pytest.fail(f"job {job}: state {fields.get('JobState')}, restarts {fields.get('Restarts')}, exit "
                    f"{fields.get('ExitCode')}\n{log_tail(folder)}")

    log = (folder / f"slurm-{job}.out").read_text()
    assert "batch: USR1 received" in log and "SIGUSR1 received: saving" in log, log
    assert "requeueing job" in log and "restart 1" in log, log
    assert "resumed from" in log and f"done: {STEPS} steps" in log, log
    restarts = (folder / f"job-{job}" / "restarts.log").read_text()
    assert "restart 0 saved and stopped" in restarts and "restart 1 started" in restarts, restarts

    want, got = final_state(uninterrupted["out"]), final_state(out)
    assert got["step"] == want["step"] == STEPS
    assert got["losses"] == want["losses"]  # every step's loss, the last included, bitwise
    differ = [k for k in want["model"] if not torch.equal(got["model"][k], want["model"][k])]
    assert not differ, differ


@pytest.mark.timeout(300)
def test_killing_one_task_ends_the_job_with_an_error_within_two_minutes(slurm, dataset, tmp_path):
    out = tmp_path / "run"
    job, folder = submit(slurm, tmp_path, overrides(dataset, out, steps=100000), wait=False)
    wait_until(job, slurm, folder, "training to start", JOB_TIMEOUT_S,
               lambda f: ended(f) or (out / "tensorboard").exists())
    time.sleep(2)  # a few steps: both ranks inside collectives
    pids = task_pids(job, rank=1)
    assert pids, f"no training process of rank 1 found\n{log_tail(folder)}"
    killed = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    fields = wait_until(job, slurm, folder, "the end after a killed task", 120, ended)
    seconds = time.monotonic() - killed
    assert fields["JobState"] == "FAILED", (fields, log_tail(folder))  # an error, not requeued
    assert fields["Restarts"] == "0"
    log = (folder / f"slurm-{job}.out").read_text()
    assert "task 1: Exited with exit code 137" in log, log
    print(f"job {job} ended {seconds:.1f} s after rank 1 was killed")
    assert seconds < 120


@pytest.mark.timeout(400)
def test_a_scaling_sweep_runs_as_an_array_job_and_is_fitted(slurm, dataset, tmp_path):
    """`python -m pretrain.scaling` without --local: one array task per run, followed to the end, then
    the fit (the same family as the local sweep's test, tests/test_scaling.py). Under warmup-stable-decay
    the cooldowns are a second array job, after the runs they branch from."""
    family = tiny_family(tmp_path / "family.yaml", dataset, [640, 1280], "train.lr_decay_fraction=0.25")
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "pretrain.scaling", "--family", str(family), "--out", str(out),
               "--time", "00:10:00", "--bootstrap", "2"]
    try:
        done = subprocess.run(command, cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=360)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", f"scaling-{out.name}"], env=slurm, capture_output=True,
                       timeout=30)
        pytest.fail(f"the sweep did not end within 360 s\n{log_tail(out / 'slurm')}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log_tail(out / "slurm")
    assert done.stdout.count("submitted array job") == 2 and done.stdout.count("(3 runs)") == 2
    assert done.stdout.count(" val loss ") == 6 and "fit of 6 runs" in done.stdout
    assert (out / "fit.json").is_file() and (out / "scaling.png").is_file()
