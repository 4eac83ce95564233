"""How many tensor ops does one training step dispatch, per variant, and where? Exact, on any device.

Why: at small widths (the long-context research recipe: dim 64, chunk 16) a MAC step is bound by
per-op overhead, not FLOPs, and on a GPU every op that is not a view is a kernel launch whose host-side
cost (several µs) is paid whatever the kernel's size. The count does not depend on the machine, so it is
measured here and explains time there: ops inside the chunk step's forward, inside its explicit backward
(the recomputing scan calls it per chunk; `analytic`), and everywhere else (projections, gates, the chunk
layout, the segment loop, attention, and the backward of all of it). A fused chunk kernel (`triton`)
removes the first two columns' ops but not the third's. (One CPU-only difference: the memory's depthwise
conv runs on CPU as shifted products, about 30 more launching ops per conv, forward and backward, than a
GPU's one convolution each way.)

    python bench/op_count.py                                  # the research recipe and the 760M's layout
    python bench/op_count.py --presets research --variants swa mac --kernels torch
    python bench/op_count.py --presets research --kernels torch analytic compiled --repeats 5   # and time
    python bench/op_count.py --presets research --kernels torch --repeats 5 --compile-blocks  # compiled

Prints a table per preset: ops and launching ops (not views) per step, split as above, and the total
against SWA's. With `--repeats N` also the median time of N steps (after two warm-up steps, which compile
the `compiled` kernel), against SWA's in the same process; the `compiled` kernel runs outside aten's
dispatch, so it gets a time and no count.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import titans.memory as memory_module  # noqa: E402
from parallel.compile import compile_blocks  # noqa: E402
from titans.model import TitansConfig, TitansLM  # noqa: E402

# (config, batch): the long-context recipe (configs/compare_long/), and one layer with the 760M MAC's
# sequence, segment, chunk, probes and persistent tokens (configs/paper/mac-760m.yaml) at a small width:
# the op count depends on the layout, not on the width.
PRESETS: dict[str, tuple[dict[str, Any], int]] = {
    "research": (dict(vocab_size=257, dim=64, n_layers=2, n_heads=4, segment_len=64, window=64,
                      n_persistent=4, memory_chunk=16, memory_depth=2), 4),
    "760m-layout": (dict(vocab_size=256, dim=128, n_layers=1, n_heads=2, segment_len=512, window=512,
                         mac_memory_tokens=256, n_persistent=128, memory_chunk=64, memory_depth=2), 1),
}
SEQ_LEN = {"research": 2048, "760m-layout": 4096}
PLACES = ("chunk step", "explicit backward", "elsewhere")
COUNTABLE = ("torch", "analytic")  # eager chunk steps: a compiled one runs outside aten's dispatch


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside it, and the non-view ones, by the place they run in."""

    def __init__(self) -> None:
        super().__init__()
        self.place = ["elsewhere"]
        self.ops: collections.Counter[str] = collections.Counter()
        self.launching: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.place[-1]] += 1
        if not func.is_view:
            self.launching[self.place[-1]] += 1
        return func(*args, **(kwargs or {}))

    def within(self, place: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.place.append(place)
            try:
                return fn(*args, **kwargs)
            finally:
                self.place.pop()
        return counted


@contextlib.contextmanager
def counting_kernels(counter: OpCounter) -> Iterator[None]:
    """The memory's kernel lookups return the kernels wrapped so that their ops count as theirs."""
    step_of, backward_of = memory_module.chunk_step, memory_module.chunk_step_backward_of
    memory_module.chunk_step = lambda kernel: counter.within("chunk step", step_of(kernel))
    memory_module.chunk_step_backward_of = lambda kernel: (
        None if backward_of(kernel) is None else counter.within("explicit backward", backward_of(kernel)))
    try:
        yield
    finally:
        memory_module.chunk_step, memory_module.chunk_step_backward_of = step_of, backward_of


def make_step(preset: str, variant: str, kernel: str, blocks_compiled: bool = False) -> Callable[[], None]:
    """One forward + backward of the preset's model (recomputing memory backward, as trained); with
    `blocks_compiled`, its blocks compiled as `train.compile` does (inductor)."""
    fields, batch = PRESETS[preset]
    torch.manual_seed(0)
    model = TitansLM(TitansConfig(**fields, layers=variant, memory_kernel=kernel, recompute_memory=True))
    if blocks_compiled:
        compile_blocks(model, seq_len=SEQ_LEN[preset])
    tokens = torch.randint(fields["vocab_size"], (batch, SEQ_LEN[preset] + 1))

    def step() -> None:
        logits = model(tokens[:, :-1])
        logits = logits[0] if isinstance(logits, tuple) else logits
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return step


def count_step(preset: str, variant: str, kernel: str) -> OpCounter:
    """The ops of one training step, by place."""
    step, counter = make_step(preset, variant, kernel), OpCounter()
    with counting_kernels(counter), counter:
        step()
    return counter


def time_step(preset: str, variant: str, kernel: str, repeats: int, blocks_compiled: bool = False) -> float:
    """Median seconds of `repeats` training steps after two warm-up steps."""
    step = make_step(preset, variant, kernel, blocks_compiled)
    step(), step()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def table(preset: str, variants: list[str], kernels: list[str], repeats: int = 0,
          blocks_compiled: bool = False) -> list[str]:
    fields, batch = PRESETS[preset]
    lines = [f"{preset}: batch {batch} × {SEQ_LEN[preset]} tokens, {fields['n_layers']} layer(s), segment / "
             f"window {fields['segment_len']}, chunk {fields['memory_chunk']}",
             "| variant | kernel | ops | launching ops | in the chunk step | in its explicit backward | "
             "elsewhere | launching elsewhere | ops × SWA |" + (" step s | × SWA step |" if repeats else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if repeats else "")]
    swa_count = count_step(preset, "swa", "torch")
    swa = sum(swa_count.ops.values())
    swa_time = time_step(preset, "swa", "torch", repeats) if repeats else 0.0
    for variant in variants:
        for kernel in kernels if variant not in ("swa", "full") else ["torch"]:
            if kernel in COUNTABLE:
                c = swa_count if variant == "swa" else count_step(preset, variant, kernel)
                total = sum(c.ops.values())
                cells = [f"{total:,}", f"{sum(c.launching.values()):,}", *(f"{c.ops[p]:,}" for p in PLACES),
                         f"{c.launching['elsewhere']:,}", f"{total / swa:.1f}"]
            else:
                cells = ["-"] * 7
            if repeats:
                seconds = swa_time if variant == "swa" else time_step(preset, variant, kernel, repeats)
                cells += [f"{seconds:.3f}", f"{seconds / swa_time:.2f}"]
            lines.append(f"| {variant} | {kernel} | " + " | ".join(cells) + " |")
            if repeats and blocks_compiled:
                seconds = time_step(preset, variant, kernel, repeats, blocks_compiled=True)
                lines.append(f"| {variant} | {kernel}, blocks compiled | " + " | ".join(["-"] * 7)
                             + f" | {seconds:.3f} | {seconds / swa_time:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--variants", nargs="+", default=["swa", "mac", "mag", "mal", "lmm"])
    parser.add_argument("--kernels", nargs="+", default=list(COUNTABLE), choices=[*COUNTABLE, "compiled"],
                        help="compiled: timed only (it runs outside aten's dispatch); needs --repeats")
    parser.add_argument("--repeats", type=int, default=0, help="also time N steps each (0: count only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile-blocks", action="store_true",
                        help="with --repeats, also time each row with its blocks compiled (train.compile; "
                             "the warm-up steps compile, for minutes); against eager SWA")
    args = parser.parse_args()
    if args.compile_blocks and not args.repeats:
        parser.error("--compile-blocks is timed, not counted: give --repeats N")
    if "compiled" in args.kernels and not args.repeats:
        parser.error("--kernels compiled is timed, not counted: give --repeats N")
    torch.set_num_threads(args.threads)
    for preset in args.presets:
        lines = table(preset, args.variants, args.kernels, args.repeats, args.compile_blocks)
        print("\n".join(lines), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
