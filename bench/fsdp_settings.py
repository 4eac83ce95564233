"""FSDP's settings under bf16 autocast: parameters gathered in float32 or bfloat16
(`parallel.fsdp_param_dtype`), gradients reduced in float32 or bfloat16 (`parallel.fsdp_reduce_dtype`),
blocks freed after every forward or kept to their backward (`parallel.fsdp_reshard`): the bytes each
rank's all-gathers and reduce-scatters carry per step, the step time, peak memory, and how far the losses
move.

    python bench/fsdp_settings.py                   # 2 processes, tiny.yaml with 4 MAC layers, 30 steps
    python bench/fsdp_settings.py --layers mag --steps 60
    python bench/fsdp_settings.py --steps 200 --set train.seed=1 --only "FSDP dp=2, gather bf16, reduce bf16"

Each setting is a `torch.distributed.run` launch of the training job (`pretrain.train`) on a small dataset
built from this repository's sources, FSDP over 2 dp ranks on a global batch of 8 × 256 tokens. The
precision settings are compared with gathering in float32 (the weights autocast reads, as one process
does), the reshard settings with the default (they change no arithmetic); two 1-process runs give the
scale of such differences, bf16 autocast against float32 (the 1-process runs read other batches than the
2-rank ones: compare within each group). Printed per setting: MiB a step
that rank 0's all-gathers assemble and its reduce-scatters split (the whole tensors, by dtype; counted at
torch.distributed's calls, `parallel.fsdp.CollectiveBytes`; the last validation's gathers included), the
median step time of the last steps, the mean and largest |loss − reference| / reference over the steps,
and the last validation loss. On a CPU, bf16 matmuls are not faster than float32 and gloo's transfers are
memory copies: the bytes are the result here, the times are not a GPU's.
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

MIB = 2**20
AUTOCAST = "1 process, bf16 autocast"
FSDP_FP32 = "FSDP dp=2, gather fp32, reduce fp32"
DEFAULT = "FSDP dp=2, gather bf16, reduce fp32 (default)"
SETTINGS = {  # name: (processes, overrides, the setting its losses are compared with)
    AUTOCAST: (1, [], AUTOCAST),
    "1 process, fp32": (1, ["train.precision=fp32"], AUTOCAST),  # bf16's own effect
    FSDP_FP32: (2, ["parallel.fsdp_param_dtype=float32"], FSDP_FP32),  # autocast's weights, as 1 process
    DEFAULT: (2, [], FSDP_FP32),
    "FSDP dp=2, gather bf16, reduce bf16": (2, ["parallel.fsdp_reduce_dtype=bfloat16"], FSDP_FP32),
    "FSDP dp=2, default, blocks freed after every forward": (2, ["parallel.fsdp_reshard=always"], DEFAULT),
    "FSDP dp=2, default, blocks kept to their backward": (2, ["parallel.fsdp_reshard=never"], DEFAULT),
}


def worker(out: Path, overrides: list[str]) -> None:
    """One rank: train, counting FSDP's collective bytes; rank 0 writes its figures."""
    from parallel.fsdp import CollectiveBytes
    from pretrain.config import load_config
    from pretrain.train import train

    with CollectiveBytes() as moved:
        result = train(load_config(str(ROOT / "configs" / "tiny.yaml"), overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps({"steps": result.step_seconds, "losses": result.losses,
                                   "val": result.val_losses[max(result.val_losses)],
                                   "gathered": sum(moved.gathered.values()),
                                   "reduced": sum(moved.reduced.values())}))
    os._exit(0)  # gloo can abort at interpreter exit after the work is done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="mac", help="block pattern (model.layers)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timed", type=int, default=10, help="median step time over the last N steps")
    parser.add_argument("--only", nargs="*", default=None,
                        help="setting names to run (with the ones they are compared with)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every setting (e.g. train.seed=1); repeatable")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, rest)
        return
    unknown = sorted(set(args.only or []) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown setting {unknown[0]!r}; the settings: {', '.join(SETTINGS)}")
    chosen = set(args.only or SETTINGS) | {SETTINGS[name][2] for name in args.only or SETTINGS}
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        common = [*source_dataset(tmp / "data", 256), f"model.layers={args.layers}",
                  "model.n_layers=4", f"train.steps={args.steps}", "train.warmup_steps=2",
                  "train.precision=bf16", "parallel.fsdp=true", f"train.eval_every={args.steps}",
                  "train.eval_batches=2", f"train.checkpoint_every={args.steps}", *args.set]
        for i, (name, (processes, extra, _)) in enumerate(SETTINGS.items()):
            if name not in chosen:
                continue
            overrides = [*common, *extra, f"data.batch_size={8 // processes}",
                         f"train.out_dir={tmp / str(i)}"]
            results[name] = run_ranks(Path(__file__), processes, tmp / f"{i}.json", overrides, name)
            print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; tiny.yaml "
          f"with 4 {args.layers} layers, global batch 8 × 256 tokens, {args.steps} steps", *args.set)
    print("\n| setting | MiB gathered / step | MiB reduced / step | step (ms) | losses against "
          "| mean |Δloss| / loss | max |Δloss| / loss | last val loss |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, got in results.items():
        against = SETTINGS[name][2]
        errors = [abs(a - b) / b for a, b in zip(got["losses"], results[against]["losses"], strict=True)]
        step_ms = statistics.median(got["steps"][-args.timed:]) * 1000
        gathered, reduced = (got[key] / args.steps / MIB for key in ("gathered", "reduced"))
        print(f"| {name} | {gathered:.2f} | {reduced:.2f} | {step_ms:.0f} | {against} "
              f"| {statistics.mean(errors):.1e} "
              f"| {max(errors):.1e} | {got['val']:.4f} |")


if __name__ == "__main__":
    main()
