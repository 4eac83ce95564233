"""A deadline-bounded launcher for multi-process tests: N worker processes of one script over gloo.

The worker reads a spec (jobs + where to write results), runs every job on every rank (`serve_jobs`), and
rank 0 writes the results as JSON. A rank that fails, or a launch past its deadline, fails the test with
every rank's log tail, so a hang never outlives its deadline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

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
    try:  # whatever ends the wait (pytest's own timeout, Ctrl-C too), no rank outlives it
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                problem = "a rank failed"
            elif time.monotonic() > deadline:
                problem = f"the {world}-process launch did not finish within {timeout:.0f} s (hang?)"
            if problem:
                break
            time.sleep(0.2)
    finally:
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


def serve_jobs(spec_path: str, mesh: Any, run_job: Callable[[dict, Any], Any]) -> NoReturn:
    """The worker's side of `launch`: every job of the spec on this rank, rank 0 writing the results after
    each. A failing job ends the process at once (the launcher then stops the other ranks); the end is a
    barrier and `os._exit`, since gloo can abort at interpreter exit after the work is done."""
    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for job in spec["jobs"]:
        try:
            results[job["name"]] = run_job(job, mesh)
        except Exception:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        if mesh.is_main:
            Path(spec["results"]).write_text(json.dumps(results))
        print(f"rank {mesh.rank}: job {job['name']} done", flush=True)
    mesh.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
