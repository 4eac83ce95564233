"""Does TF32 in the memory's float32 matmuls change training? Emulated on CPU, on the default run.

On a GPU the Triton memory kernel is fast only with TF32 dots (`train.fp32_matmul=tf32`; `bench/RESULTS.md`),
and the memory's state and update run in float32 even under bf16 autocast: a test-time-training loop whose
errors could compound over chunks. A CPU has no TF32, so this emulates it where the memory computes: every
float32 matmul of the chunk step (reads, weighted gradients) rounds both operands to TF32 first (10 mantissa
bits, round to nearest even), as a tensor core reads them, and accumulates in float32. The backward's
products use the rounded saved operands but exact incoming gradients, so the emulation rounds less than
a GPU's backward does.

    python bench/tf32_memory.py                        # configs/tiny.yaml, 300 steps, both precisions
    python bench/tf32_memory.py train.steps=100        # overrides for both runs

Prints, per precision, the train loss (mean of the last 10 steps) and the validation losses, and the
largest difference of the validation losses between the two runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import titans.memory as memory_module  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.train import train  # noqa: E402

MATMULS = {torch.matmul, torch.bmm, torch.mm, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.bmm}


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x with its float32 mantissa rounded to TF32's 10 bits (nearest, ties to even); the gradient passes
    straight through, as the rounding is the hardware's, not the model's."""
    bits = x.detach().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return x + (rounded.view(torch.float32) - x).detach()


class TF32Matmuls(TorchFunctionMode):
    """Rounds the float32 operands of every matmul called inside it to TF32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            args = tuple(round_to_tf32(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
                         for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def tf32_chunk_step() -> Iterator[None]:
    """The torch chunk step with its matmuls in emulated TF32, for the duration."""
    exact = memory_module.memory_chunk_step

    def step(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with TF32Matmuls():
            return exact(*args)

    memory_module.memory_chunk_step = step
    try:
        yield
    finally:
        memory_module.memory_chunk_step = exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, e.g. train.steps=100")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("ieee", "tf32"):
            cfg = load_config(args.config, [*args.overrides, f"train.out_dir={tmp}/{precision}",
                                            "model.memory_kernel=torch"])
            with tf32_chunk_step() if precision == "tf32" else contextlib.nullcontext():
                results[precision] = train(cfg)
    print(f"\n# {args.config} {' '.join(args.overrides)}: the memory's chunk-step matmuls exact (ieee) or "
          "with TF32-rounded operands (emulated)")
    steps = sorted(results["ieee"].val_losses)
    print("| memory matmuls | train loss (last 10) | " + " | ".join(f"val @ {s}" for s in steps) + " |")
    print("|---|---:|" + "---:|" * len(steps))
    for precision, r in results.items():
        last = r.losses[-10:]
        print(f"| {precision} | {sum(last) / len(last):.4f} | "
              + " | ".join(f"{r.val_losses[s]:.4f}" for s in steps) + " |")
    gap = max(abs(results["tf32"].val_losses[s] - results["ieee"].val_losses[s]) for s in steps)
    print(f"\nlargest validation difference: {gap:.4f}")


if __name__ == "__main__":
    main()
