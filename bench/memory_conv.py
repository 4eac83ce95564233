"""The memory's depthwise causal conv on CPU: `causal_depthwise_conv` against the grouped conv1d it equals.

    python bench/memory_conv.py --threads 1
    python bench/memory_conv.py --lengths 128 2048 32768 --channels 768 --batch 1

Forward and backward of one call over (batch, length + k - 1, channels) inputs, both implementations timed
in the same rounds (one call of each in turn per round; medians), and the time per token against the first
length: what the conv costs as a sequence grows (LMM convolves a whole sequence at once, MAC one segment).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_throughput import git_revision, median  # noqa: E402

from titans.memory import causal_depthwise_conv  # noqa: E402


def grouped_conv1d(window: Tensor, weight: Tensor) -> Tensor:
    return F.conv1d(window.transpose(1, 2), weight, groups=weight.shape[0]).transpose(1, 2)


def time_rounds(fns: list[Callable[[Tensor, Tensor], Tensor]], window: Tensor, weight: Tensor,
                repeats: int) -> list[float]:
    """Median seconds of forward + backward per function, timed in rounds."""
    x, w = window.requires_grad_(), weight.requires_grad_()
    grad = torch.randn(window.shape[0], window.shape[1] - weight.shape[-1] + 1, window.shape[2])
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats + 1):  # the first round warms up
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn(x, w).backward(grad)
            if round_:
                times[i].append(time.perf_counter() - start)
    return [median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 2048, 8192, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=768, help="3 × dim: q, k and v are convolved at once")
    parser.add_argument("--kernel", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# command: python {shlex.join(sys.argv)}  (commit {git_revision()})")
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.channels} channels, kernel {args.kernel}, median of {args.repeats}")
    print("\n| length | conv1d ms | ours ms | speedup | ours µs/token | × µs/token at "
          f"{args.lengths[0]} |\n|---:|---:|---:|---:|---:|---:|")
    first = None
    for length in args.lengths:
        torch.manual_seed(0)
        window = torch.randn(args.batch, length + args.kernel - 1, args.channels)
        weight = torch.randn(args.channels, 1, args.kernel)
        conv, ours = time_rounds([grouped_conv1d, causal_depthwise_conv], window, weight, args.repeats)
        per_token = ours / (args.batch * length)
        first = first or per_token
        print(f"| {length} | {conv * 1e3:.2f} | {ours * 1e3:.2f} | {conv / ours:.2f} | "
              f"{per_token * 1e6:.2f} | {per_token / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
