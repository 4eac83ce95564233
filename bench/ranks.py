"""A benchmark's own worker run on N local processes (`torch.distributed.run`, gloo), and what its rank 0
wrote read back: the launch the multi-process benchmarks share.

    report = run_ranks(Path(__file__), 4, tmp / "out.json", ["--layers", "mac"], "sp=4")
    # the script, started with --worker OUT and the arguments, writes OUT (JSON) on rank 0
    overrides = source_dataset(tmp / "data", 256)   # and a small real-text dataset to train on
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, processes: int, out: Path, args: list[str], name: str,
              threads: int | None = None) -> Any:
    """Run `script --worker out *args` on `processes` ranks (each with `threads` threads: default the cores
    shared out) and return the JSON its rank 0 wrote to `out`; a failed launch raises with its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-port", str(free_port()), str(Path(script).resolve()), "--worker", str(out), *args]
    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def source_dataset(folder: Path, seq_len: int) -> list[str]:
    """A small byte-level dataset of this repository's own sources in `folder` (real text, no download),
    with samples of `seq_len` + 1 tokens; returns the overrides that train on it."""
    from data_pipeline.corpus import expand_inputs
    from data_pipeline.prepare import prepare

    files = expand_inputs([str(ROOT / d) for d in ("titans", "pretrain", "parallel")], ("*.py",))
    prepare(files, folder, "bytes", sample_tokens=seq_len + 1, shard_samples=64, val_fraction=0.2,
            progress=False)
    return [f"data.train={folder}", "data.default_corpus=false", f"data.seq_len={seq_len}"]
