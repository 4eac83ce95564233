"""Activation checkpointing off, on every second block, on every block: step time and peak memory.

    python bench/activation_checkpointing.py                  # dim 256, 8 MAC layers, 4 × 1,024 tokens
    python bench/activation_checkpointing.py --layers mag --seq-len 2048

Each setting trains in its own process (the real training job, a small dataset built from this
repository's sources), so its peak resident memory is its own; printed beside the median step time of
the last steps, each as a ratio to the run without checkpointing. The losses are checked equal first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from ranks import source_dataset  # noqa: E402

SETTINGS = {"off": [], "every 2nd block": ["train.activation_checkpointing=true",
                                           "train.activation_checkpointing_every=2"],
            "every block": ["train.activation_checkpointing=true"]}


def worker(out: Path, overrides: list[str]) -> None:
    """One run in this process: step times, losses and peak RSS to `out`."""
    sys.path.insert(0, str(ROOT))
    from pretrain.config import load_config
    from pretrain.train import train

    result = train(load_config(str(ROOT / "configs" / "tiny.yaml"), overrides))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    out.write_text(json.dumps({"steps": result.step_seconds, "losses": result.losses, "peak": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="mac")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timed", type=int, default=5, help="median over the last N steps")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, rest)
        return
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        common = [*source_dataset(tmp / "data", args.seq_len), "data.batch_size=4",
                  f"model.layers={args.layers}", f"model.dim={args.dim}", f"model.n_layers={args.n_layers}",
                  f"train.steps={args.steps}", "train.warmup_steps=1", "train.eval_every=0",
                  f"train.checkpoint_every={10 * args.steps}", f"train.log_every={args.steps}"]
        got = {}
        for name, extra in SETTINGS.items():
            out = tmp / f"{len(got)}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), *common, *extra,
                       f"train.out_dir={tmp / str(len(got))}"]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            got[name] = json.loads(out.read_text())
            print(f"{name}: done", file=sys.stderr, flush=True)
    for name, run in got.items():
        worst = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], got["off"]["losses"], strict=True))
        if worst > 1e-5:
            raise SystemExit(f"{name}: losses differ from the run without checkpointing by {worst:.1e}")
    step = {name: statistics.median(run["steps"][-args.timed:]) for name, run in got.items()}
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.n_layers} "
          f"{args.layers} layers, dim {args.dim}, batch 4 × {args.seq_len} tokens, fp32")
    print("\n| checkpointing | step (s) | vs off | peak RSS (MiB) | vs off |\n|---|---:|---:|---:|---:|")
    for name, run in got.items():
        print(f"| {name} | {step[name]:.2f} | {step[name] / step['off']:.2f}× | {run['peak'] / 2**20:,.0f} | "
              f"{run['peak'] / got['off']['peak']:.2f}× |")


if __name__ == "__main__":
    main()
