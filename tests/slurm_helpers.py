"""Shared by the Slurm tests: find the local cluster (slurm/local_cluster.sh), follow jobs with deadlines.

Without a running cluster the tests skip, naming why; with REQUIRE_SLURM=1 (set by .ci/run) they fail,
so CI cannot pass while silently testing nothing. Every wait has a deadline: a job that hangs is
cancelled and the test fails with its log.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def cluster_env() -> dict[str, str]:
    """The environment for Slurm's commands (SLURM_CONF of the local cluster unless already set); skips
    or, with REQUIRE_SLURM=1, fails the test when no cluster answers."""
    conf = os.environ.get("SLURM_CONF") or str(
        Path(os.environ.get("TITANS_SLURM_DIR", "/tmp/titans-slurm")) / "slurm.conf")
    env = {**os.environ, "SLURM_CONF": conf}
    problem = None
    if shutil.which("sbatch") is None:
        problem = "sbatch is not installed"
    elif not Path(conf).is_file():
        problem = f"no Slurm config at {conf}"
    else:
        try:
            states = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True,
                                    timeout=30)
            if states.returncode != 0:
                problem = f"sinfo failed: {states.stderr.strip()[-300:]}"
            elif not re.search(r"^(idle|mixed|allocated)", states.stdout, re.M):
                problem = f"no node takes jobs (sinfo: {states.stdout.strip() or 'nothing'})"
        except subprocess.TimeoutExpired:
            problem = "sinfo did not answer within 30 s"
    if problem:
        message = f"local Slurm unavailable: {problem}; start it with slurm/local_cluster.sh start"
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but the {message}", pytrace=False)
        pytest.skip(message)
    return env


def job_fields(job: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...); {} once it is gone."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True,
                           timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout)) if shown.returncode == 0 else {}


def log_tail(folder: Path, chars: int = 6000) -> str:
    logs = sorted(folder.rglob("*.out")) + sorted(folder.rglob("restarts.log"))
    return "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-chars:]}" for p in logs)


def wait_until(job: str, env: dict[str, str], folder: Path, what: str, timeout: float,
               done: Callable[[dict[str, str]], bool]) -> dict[str, str]:
    """Poll the job until done(fields); past the deadline, cancel it and fail with its logs."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job, env)
        if done(fields):
            return fields
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
            pytest.fail(f"job {job}: {what} did not happen within {timeout:.0f} s (state "
                        f"{fields.get('JobState')}, reason {fields.get('Reason')})\n{log_tail(folder)}")
        time.sleep(0.25)


def ended(fields: dict[str, str]) -> bool:
    return fields.get("JobState") in TERMINAL


def task_pids(job: str, rank: int) -> list[int]:
    """Process ids of the training processes (python -m pretrain.train) of one task of a job."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if b"pretrain.train" in cmdline and f"SLURM_JOB_ID={job}".encode() in environ \
                and f"SLURM_PROCID={rank}".encode() in environ:
            pids.append(int(proc.name))
    return pids
