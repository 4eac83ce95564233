"""Step time of each parallel layout against the single-process run, same model and global batch.

    python bench/parallel_overhead.py                       # all layouts, MAC, 8 steps (5 timed)
    python bench/parallel_overhead.py --layers mag --steps 12
    python bench/parallel_overhead.py --only "tp=2" "tp=2, compiled"   # one process always runs first

Each layout is a `torch.distributed.run` launch of the training job (`pretrain.train`) on a small dataset
built from this repository's sources; dp ranks each take batch_size / dp rows, so the global batch is the
same everywhere. Printed: the median step time of the last steps (the first ones build DeepSpeed / gloo
state), its ratio to the 1-process run measured in the same invocation, and the parameter elements rank 0
holds (what tp, pp, FSDP and ZeRO-3 divide). On a CPU machine with fewer
cores than processes the ranks share cores, so the ratio there measures mostly oversubscription, not
communication: read it as an upper bound of the overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from ranks import run_ranks, source_dataset  # noqa: E402

LAYOUTS = {  # name: (processes, overrides)
    "1 process": (1, []),
    "tp=2": (2, ["parallel.tp=2"]),
    "pp=2 (1F1B)": (2, ["parallel.pp=2"]),
    "pp=2 (interleaved)": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved"]),
    "dp=2 (DDP)": (2, []),
    "dp=2, FSDP": (2, ["parallel.fsdp=true"]),
    "dp=2, ZeRO-3": (2, ["parallel.zero_stage=3"]),
    "tp=2 × pp=2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "tp=2 × dp=2, ZeRO-1": (4, ["parallel.tp=2", "parallel.zero_stage=1"]),
    "tp=2 × dp=2, FSDP": (4, ["parallel.tp=2", "parallel.fsdp=true"]),
    "pp=2 × dp=2, ZeRO-1": (4, ["parallel.pp=2", "parallel.zero_stage=1"]),
    "pp=2 × dp=2, FSDP": (4, ["parallel.pp=2", "parallel.fsdp=true"]),
    "dp=4, FSDP": (4, ["parallel.fsdp=true"]),
    "dp=4, HSDP 2 × 2": (4, ["parallel.fsdp=true", "parallel.fsdp_shard=2"]),
    "sp=2 × dp=2, ZeRO-1": (4, ["parallel.sp=2", "parallel.zero_stage=1"]),
    "sp=2 × dp=2, FSDP": (4, ["parallel.sp=2", "parallel.fsdp=true"]),
    # blocks compiled (inductor): the first step compiles, and the median is of the last steps
    "1 process, compiled": (1, ["train.compile=true"]),
    "tp=2, compiled": (2, ["parallel.tp=2", "train.compile=true"]),
    "dp=2, FSDP, compiled": (2, ["parallel.fsdp=true", "train.compile=true"]),
}


def worker(out: Path, overrides: list[str]) -> None:
    """One rank: train, then rank 0 writes the step times and the parameter elements it held."""
    from pretrain.config import load_config
    from pretrain.train import train

    result = train(load_config(str(ROOT / "configs" / "tiny.yaml"), overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        held = result.parameters_per_rank[0]
        out.write_text(json.dumps({"steps": result.step_seconds, "parameters": held}))
    os._exit(0)  # gloo can abort at interpreter exit after the work is done


def run_layout(name: str, processes: int, extra: list[str], common: list[str], tmp: Path) -> dict:
    out = tmp / f"{abs(hash(name))}.json"
    dp = processes // (2 if "parallel.tp=2" in extra else 1) // (2 if "parallel.pp=2" in extra else 1)
    overrides = common + extra + [f"data.batch_size={8 // dp}", f"train.out_dir={tmp / str(abs(hash(name)))}"]
    if "parallel.pp=2" in extra:
        overrides.append(f"parallel.pp_microbatches={4 // dp}")
    return run_ranks(Path(__file__), processes, out, overrides, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="mac", help="block pattern (model.layers)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timed", type=int, default=5, help="median over the last N steps")
    parser.add_argument("--only", nargs="*", default=None, help="layout names to run (default: all)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, rest)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        common = [*source_dataset(tmp / "data", 256), f"model.layers={args.layers}",
                  "model.n_layers=4", f"train.steps={args.steps}", "train.warmup_steps=1",
                  f"train.eval_every={args.steps}", "train.eval_batches=1",
                  f"train.checkpoint_every={args.steps}"]
        rows, baseline = [], None
        for name, (processes, extra) in LAYOUTS.items():
            if args.only and name not in args.only and name != "1 process":
                continue
            got = run_layout(name, processes, extra, common, tmp)
            median = statistics.median(got["steps"][-args.timed:])
            baseline = baseline or median
            rows.append((name, processes, median, median / baseline, got["parameters"]))
            print(f"{name}: {median * 1000:.0f} ms/step", file=sys.stderr, flush=True)
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"model tiny.yaml with 4 {args.layers} layers, global batch 8 × 256 tokens")
    print("\n| layout | processes | step (ms) | vs 1 process | parameter elements on rank 0 |\n"
          "|---|---:|---:|---:|---:|")
    for name, processes, median, ratio, parameters in rows:
        print(f"| {name} | {processes} | {median * 1000:.0f} | {ratio:.2f}× | {parameters:,} |")


if __name__ == "__main__":
    main()
