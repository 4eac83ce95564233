"""What a checkpoint costs the training loop: written in the step, or in the background
(`train.async_checkpoint`), against the same run without checkpoints.

    python bench/checkpoint_overlap.py                    # dim 512, 8 layers, 12 steps, a checkpoint every 2
    python bench/checkpoint_overlap.py --threads 1          # training on one core, the writer on another

One process, the real training job on a small dataset built from this repository's sources, each mode run
twice in turn in this process (the faster of the two kept). Printed: the wall time of the whole run, its
cost per checkpoint over the run without any, and the checkpoint's size. The background mode still pays
for the host copy of the state in the step; the files are written while the next steps run (on the same
cores here: on a GPU node the writes overlap GPU compute instead).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from ranks import source_dataset  # noqa: E402


def run(common: list[str], extra: list[str], out: Path) -> float:
    from pretrain.config import load_config
    from pretrain.train import train

    started = time.perf_counter()
    train(load_config(str(ROOT / "configs" / "tiny.yaml"), [*common, f"train.out_dir={out}", *extra]))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=2, help="a checkpoint every N steps")
    parser.add_argument("--threads", type=int, default=0,
                        help="train.threads (0: torch's default); 1 on a 2-core machine leaves the writer a "
                             "core, as a GPU node's host is free while the GPU computes")
    args = parser.parse_args()
    from pretrain.checkpoint import checkpoint_path
    from titans.model import num_parameters

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        common = [*source_dataset(tmp / "data", 128), "data.batch_size=4", f"model.dim={args.dim}",
                  f"model.n_layers={args.layers}", f"train.steps={args.steps}", "train.warmup_steps=1",
                  "train.eval_every=0",
                  f"train.log_every={args.steps}", "train.keep_last=2", f"train.threads={args.threads}"]
        modes = {"no checkpoints": [f"train.checkpoint_every={10 * args.steps}"],
                 "in the step": [f"train.checkpoint_every={args.every}"],
                 "background": [f"train.checkpoint_every={args.every}", "train.async_checkpoint=true"]}
        best: dict[str, float] = {}
        for attempt in range(2):
            for name, extra in modes.items():
                seconds = run(common, extra, tmp / f"{attempt}-{name}")
                best[name] = min(best.get(name, seconds), seconds)
                print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
        size = sum(f.stat().st_size for f in checkpoint_path(tmp / "0-in the step", args.steps).rglob("*"))
        from pretrain.config import load_config

        parameters = num_parameters(load_config(str(ROOT / "configs" / "tiny.yaml"), common).model)
    saves = -(-args.steps // args.every)
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; model dim "
          f"{args.dim}, {args.layers} layers ({parameters / 1e6:.1f}M parameters), {args.steps} steps, "
          f"a checkpoint every {args.every} ({saves}) of {size / 2**20:.0f} MiB; "
          f"train.threads={args.threads}")
    print("\n| checkpoints | run (s) | per checkpoint (s) |\n|---|---:|---:|")
    for name, seconds in best.items():
        cost = "" if name == "no checkpoints" else f"{(seconds - best['no checkpoints']) / saves:.2f}"
        print(f"| {name} | {seconds:.1f} | {cost} |")


if __name__ == "__main__":
    main()
