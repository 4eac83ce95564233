"""Sequence parallelism: bytes relayed per layer, activation memory per rank and step time at sp = 1, 2, 4.

    python bench/sequence_parallel.py                      # LMM, 4 layers, lengths 1024 and 4096
    python bench/sequence_parallel.py --layers mac --lengths 2048 8192
    python bench/sequence_parallel.py --layers full --sp 2 4 --split contiguous zigzag   # load balance

Each sp is a `torch.distributed.run` launch of a worker that builds the training job's engine
(pretrain/engine.py) for the layout and times forward + backward + optimizer steps on random tokens.
Printed per (sp, length): the bytes each rank sends per layer per step (the memory state forward, its
gradient back: they must not grow with the length; `--layers full` sends every earlier row, which does),
the activation bytes a rank saves for backward (they should fall about as 1/sp; not with
`--checkpointing`, where the checkpoints hold their inputs and the reruns save in backward), the median
step time, and the largest peak resident memory of a rank. On a CPU with fewer cores than ranks, times measure
oversubscription more than the wavefront. Then, per sp, the longest sequence whose activations fit a
per-rank budget (`--budget-mib`), from the line through the two longest measured lengths (activations
are linear in the length: per-token tensors plus per-chunk memory states). `--split` runs each sp > 1 with
each `parallel.sp_split` named (attention-only models: zigzag pieces against contiguous shards; the bytes
of a zigzag layer's all-gather and reduce-scatter are counted as sent to each peer) and adds the busiest
rank's forward + backward time without the waits: its compute, the figure load balancing evens out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from ranks import run_ranks  # noqa: E402


def worker(out: Path, layers: str, n_layers: int, length: int, steps: int, checkpointing: bool,
           split: str) -> None:
    import resource

    import torch

    from parallel.mesh import init_mesh
    from pretrain.batch import Batch
    from pretrain.config import load_config
    from pretrain.engine import build_engine

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      [f"model.layers={layers}", f"model.n_layers={n_layers}", f"data.seq_len={length}",
                       "data.batch_size=1", f"parallel.sp={world}",
                       f"train.activation_checkpointing={str(checkpointing).lower()}",
                       f"parallel.sp_split={split}"])
    mesh = init_mesh(sp=world)
    engine = build_engine(cfg, mesh, "fp32")
    generator = torch.Generator().manual_seed(0)
    batch = Batch(torch.randint(0, cfg.model.vocab_size, (1, length + 1), generator=generator), None)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    times, runner, first_wait = [], getattr(engine, "shards", None), 0.0
    for step in range(steps):
        started = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if step == 0 else nullcontext():
            engine.forward_backward(batch, 1.0, last=True)
        engine.step(1.0, apply=True)
        times.append(time.perf_counter() - started)
        if step == 0 and runner is not None:
            first_wait = runner.wait_s
    sent = runner.bytes_sent / steps / n_layers if runner is not None else 0
    waits = (runner.wait_s - first_wait) / (steps - 1) if runner is not None else 0.0  # after the first
    step_s = statistics.median(times[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    report = mesh.gather_objects({"sent": sent, "saved": sum(saved.values()), "step": step_s, "rss": peak,
                                  "compute": statistics.mean(times[1:]) - waits})
    if mesh.is_main:
        out.write_text(json.dumps(report))
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="lmm")
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--budget-mib", type=float, default=1024.0,
                        help="per-rank activation budget for the longest-sequence table")
    parser.add_argument("--checkpointing", action="store_true",
                        help="train.activation_checkpointing=true (full attention's halo is then sent again "
                             "in backward, not kept)")
    parser.add_argument("--split", nargs="+", default=["auto"], choices=["auto", "contiguous", "zigzag"],
                        help="parallel.sp_split for sp > 1, each named one in turn")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.layers, args.n_layers, args.length, args.steps, args.checkpointing,
               args.split[0])
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            for sp in args.sp:
                for split in args.split if sp > 1 else ["-"]:
                    out = Path(tmp) / f"{sp}-{length}-{split}.json"
                    worker_args = ["--layers", args.layers, "--n-layers", str(args.n_layers),
                                   "--length", str(length), "--steps", str(args.steps),
                                   "--split", "auto" if split == "-" else split,
                                   *(["--checkpointing"] if args.checkpointing else [])]
                    ranks = run_ranks(Path(__file__), sp, out, worker_args, f"sp={sp}, length {length}")
                    rows.append((length, sp, split, max(r["sent"] for r in ranks),
                                 max(r["saved"] for r in ranks), statistics.median(r["step"] for r in ranks),
                                 max(r["rss"] for r in ranks), [r["compute"] for r in ranks]))
                    print(f"length {length}, sp {sp} {split}: done", file=sys.stderr, flush=True)
    base = {length: saved for length, sp, _, _, saved, *_ in rows if sp == 1}
    step1 = {length: step for length, sp, _, _, _, step, *_ in rows if sp == 1}
    print(f"\n{args.n_layers} {args.layers} layers of configs/tiny.yaml, batch 1, fp32, activation "
          f"checkpointing {'on' if args.checkpointing else 'off'}, {os.cpu_count()} cores\n")
    print("| length | sp | split | bytes sent / layer / step (max rank) | activations saved / rank (MiB) "
          "| vs sp=1 | step (s) | vs sp=1 | compute s per rank (no waits) | peak RSS (MiB, max rank) |"
          "\n|---:|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for length, sp, split, sent, saved, step, rss, compute in rows:
        activations = ("n/a | n/a" if args.checkpointing else
                       f"{saved / 2**20:.1f} | {saved / base.get(length, saved):.2f}")
        print(f"| {length} | {sp} | {split} | {sent:,.0f} | {activations} | {step:.3f} | "
              f"{step / step1.get(length, step):.2f} | {' / '.join(f'{c:.3f}' for c in compute)} | "
              f"{rss / 2**20:,.0f} |")
    if not args.checkpointing and len(args.split) == 1:
        print_longest(rows, args.budget_mib * 2**20)


def print_longest(rows: list[tuple], budget: float) -> None:
    """Per sp: the longest length (a multiple of 64·sp: whole chunks and segments per shard) whose
    activations per rank fit `budget`, on the line through the two longest measured lengths."""
    print(f"\n| sp | longest sequence with activations ≤ {budget / 2**20:.0f} MiB per rank | vs sp=1 |"
          "\n|---:|---:|---:|")
    longest = {}
    for sp in sorted({sp for _, sp, *_ in rows}):
        measured = sorted((length, saved) for length, s, _, _, saved, *_ in rows if s == sp)
        if len(measured) < 2:
            continue
        (l1, a1), (l2, a2) = measured[-2:]
        per_token = (a2 - a1) / (l2 - l1)
        unit = 64 * sp
        longest[sp] = int((budget - (a1 - per_token * l1)) / per_token) // unit * unit
        print(f"| {sp} | {longest[sp]:,} | {longest[sp] / longest.get(1, longest[sp]):.2f} |")


if __name__ == "__main__":
    main()
