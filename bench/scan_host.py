"""What the host spends per chunk to run the memory's Triton scan: a launch per chunk against one launch
for the whole scan, on any machine (the kernels are stubbed out, so only the host's work is timed).

    python bench/scan_host.py                  # the 760M MAC's scan: 96 rows, 64 chunks (4,096 tokens)
    python bench/scan_host.py --chunks 512     # a 32K-token sequence

Why: on a GPU the host has to stay ahead of the kernels. Each chunk launched on its own costs the host its
argument checks, output allocations and Python; where that exceeds the chunk's kernel time, the GPU idles
between chunks. The MAC-step target (at most 1.3× an SWA step) leaves the 760M memory about 70 µs per
chunk for forward and backward together (bench/RESULTS.md, session 15), so the host cost per chunk
decides whether a launch per chunk can meet it at all. Timed here with the same calls the recomputing
scan makes (`bench/gpu_step.time_triton_scan`, which times the kernels on a GPU), the launches replaced by
a no-op, in Triton's interpreter mode so that CPU tensors pass the kernels' checks.

With the kernels stubbed the host's work does not depend on the tensors' sizes, only on how many calls
and ops it makes, so the defaults are the 760M's row and chunk counts at the kernels' smallest tiles: at
full size the CPU would spend its time faulting in fresh pages for the state buffers, which a GPU's
caching allocator hands out untouched. Prints ms per chunk: the mean of `--repeats` scans after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors pass the kernels' checks

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_step import time_triton_scan  # noqa: E402

from titans.kernels.chunk_step_reference import example_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96, help="batch × memory heads (760M: 4 × 24)")
    parser.add_argument("--chunk", type=int, default=16, help="tokens per chunk (the kernels' smallest)")
    parser.add_argument("--head", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=64, help="chunks per scan (760M: 4,096 / 64)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    import titans.kernels.chunk_step_triton as kernels

    torch.set_num_threads(1)
    opts, inputs = example_step(2, True, False, n_rows=args.rows, b=args.chunk, dim=args.head,
                                hidden=args.hidden)
    inputs = [t.float() for t in inputs]
    launch, kernels._launch = kernels._launch, lambda kernel, rows, meta, *launch_args: None  # host only
    try:
        times = time_triton_scan(opts, inputs, args.chunks, torch.device("cpu"), args.repeats)
    finally:
        kernels._launch = launch
    print(f"host ms per chunk, kernels stubbed: {args.rows} rows, chunk {args.chunk}, head {args.head}, "
          f"hidden {args.hidden}, depth 2, {args.chunks} chunks a scan; mean of {args.repeats} scans",
          "| direction | a launch per chunk | one launch per scan |", "|---|---:|---:|",
          f"| forward | {times[0]:.4f} | {times[1]:.4f} |",
          f"| backward (the recomputing scan's) | {times[2]:.4f} | {times[3]:.4f} |", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
