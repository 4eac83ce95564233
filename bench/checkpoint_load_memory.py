"""Host memory of the processes of one node loading the same checkpoint, memory-mapped or read whole.

    python bench/checkpoint_load_memory.py                   # 4 processes, a ~100M-parameter state
    python bench/checkpoint_load_memory.py --processes 8 --dim 1024 --layers 16

Every rank of a resumed run reads the checkpoint's state.pt (model and AdamW state: 12 bytes a parameter).
Read whole (`torch.load` without `mmap`), each process holds its own copy while it loads; memory-mapped
(`pretrain.checkpoint.load_checkpoint`), the processes share the file's pages in the page cache and each
holds only what it copies out (its model and optimizer). Each process loads the checkpoint into a model
and an AdamW optimizer as the training job does; printed: the memory the node had in use at its peak
(MemTotal − MemAvailable, sampled) above the idle node's, and each process's private (anonymous) memory
once loaded, for both ways, in the same invocation.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(dim: int, layers: int) -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)])


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def anonymous_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def load_one(file: str, mapped: bool, dim: int, layers: int, start: mp.Event, out: mp.Queue) -> None:
    from pretrain.checkpoint import load_checkpoint
    from pretrain.engine import copy_mapped_optimizer_state

    model = build(dim, layers)
    optimizer = torch.optim.AdamW(model.parameters())
    start.wait()
    state = load_checkpoint(file) if mapped else torch.load(file, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    copy_mapped_optimizer_state(optimizer)
    out.put(anonymous_bytes())
    time.sleep(1.0)  # every process holds what it loaded at once


def node_peak(file: str, mapped: bool, processes: int, dim: int, layers: int) -> tuple[int, list[int]]:
    os.posix_fadvise(os.open(file, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)  # (best effort)
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=load_one, args=(file, mapped, dim, layers, start, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    time.sleep(3.0)  # the processes have imported torch and built their models
    idle = meminfo("MemTotal") - meminfo("MemAvailable")
    peak, done = idle, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, meminfo("MemTotal") - meminfo("MemAvailable"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start.set()
    private = [out.get() for _ in procs]
    for p in procs:
        p.join()
    done.set()
    sampler.join()
    return peak - idle, private


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=96, help="dim × dim matrices (96 × 1024²: 100M)")
    args = parser.parse_args()
    model = build(args.dim, args.layers)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, args.dim)).sum().backward()
    optimizer.step()
    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        file = str(Path(tmp) / "state.pt")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, file)
        size = Path(file).stat().st_size
        del model, optimizer
        rows = [(name, *node_peak(file, mapped, args.processes, args.dim, args.layers))
                for name, mapped in (("read whole", False), ("memory-mapped", True))]
    params = args.dim * args.dim * args.layers
    print(f"\n{params:,} parameters, state.pt {size / gib:.2f} GiB, {args.processes} processes, "
          f"{os.cpu_count()} cores\n")
    print("| load | node memory at peak, above idle (GiB) | per process once loaded, private (GiB) |")
    print("|---|---:|---:|")
    for name, peak, private in rows:
        print(f"| {name} | {peak / gib:.2f} | {max(private) / gib:.2f} |")


if __name__ == "__main__":
    main()
