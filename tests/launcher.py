"""A deadline-bounded launcher for multi-process tests: N worker processes of one script over gloo.

The worker reads a spec (jobs + where to write results), runs every job on every rank, and rank 0
writes the results as JSON. A rank that fails, or a launch past its deadline, fails the test with every
rank's log tail, so a hang never outlives its deadline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: Path, jobs: list[dict], tmp: Path, world: int, timeout: float) -> dict:
    """Run the jobs in `world` worker processes; returns rank 0's results. Fails (with the logs) when a
    rank exits with an error or the launch passes its deadline."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "spec.json"
    results = tmp / "results.json"
    spec.write_text(json.dumps({"jobs": jobs, "results": str(results)}))
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT),
               "OMP_NUM_THREADS": "1"}
        logs.append(tmp / f"rank{rank}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(worker), str(spec)], cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    problem = None
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            problem = "a rank failed"
        elif time.monotonic() > deadline:
            problem = f"the {world}-process launch did not finish within {timeout:.0f} s (hang?)"
        if problem:
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    if problem is None and any(p.returncode != 0 for p in procs):
        problem = "a rank failed"
    if problem is not None:
        tails = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{logs[r].read_text()[-4000:]}"
                          for r, p in enumerate(procs))
        pytest.fail(f"{problem}\n{tails}")
    return json.loads(results.read_text())
