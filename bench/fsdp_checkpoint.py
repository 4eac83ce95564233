"""An FSDP checkpoint gathered on rank 0 against one written in slices by every rank
(`parallel.fsdp_checkpoint`): the save's time and the host memory it takes, per rank.

    python bench/fsdp_checkpoint.py                         # 4 processes, dim 768, 8 MAC layers
    python bench/fsdp_checkpoint.py --processes 2 --dim 1024 --layers 12

Each mode is a `torch.distributed.run` launch (gloo) that builds the training engine under FSDP over every
rank, takes one optimizer step (so AdamW's moments exist), then saves its checkpoint three times into
fresh folders (`engine.save`: the collective part and this rank's files; then rank 0's state.pt, which
holds the whole state when gathered). Printed: the median save time, the most host memory any rank
added while saving (private resident memory, sampled, above what it held before) and rank 0's, and the
largest file a rank wrote (rank 0's state.pt included). On a CPU machine with fewer cores than processes
the ranks share cores: read the times as an upper bound.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from ranks import run_ranks  # noqa: E402


def anonymous_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """The most private resident memory this process holds while inside, above what it held at entry."""

    def __enter__(self) -> PeakMemory:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that reuse does not hide growth
        self.base = self.peak = anonymous_bytes()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, anonymous_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.added = max(self.peak, anonymous_bytes()) - self.base


def worker(out: Path, folder: Path, overrides: list[str]) -> None:
    """One rank: the engine, one step, three saves; every rank's figures gathered to rank 0."""
    import torch

    from parallel.mesh import init_mesh
    from pretrain.batch import Batch
    from pretrain.config import load_config
    from pretrain.engine import build_engine

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides)
    mesh = init_mesh()
    engine = build_engine(cfg, mesh, "fp32")
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(mesh.rank))
    engine.forward_backward(Batch(tokens, None), 1.0, last=True)
    engine.step(1.0, apply=True)
    seconds, added = [], []
    for attempt in range(3):
        directory = folder / f"save{attempt}"
        mesh.barrier()
        started = time.perf_counter()
        with PeakMemory() as memory:
            state = engine.save(directory)
            if mesh.is_main:  # what rank 0 puts into state.pt: the whole model and optimizer when gathered
                directory.mkdir(parents=True, exist_ok=True)
                torch.save(state, directory / "state.pt")
            mesh.barrier()
        seconds.append(time.perf_counter() - started)
        added.append(memory.added)
        del state
    files = [f.stat().st_size for f in (folder / "save0").rglob("*.pt")]
    report = mesh.gather_objects({"seconds": statistics.median(seconds), "added": max(added),
                                  "largest": max(files, default=0)})
    if mesh.is_main:
        out.write_text(json.dumps(report))
    os._exit(0)  # gloo can abort at interpreter exit after the work is done


def run_mode(mode: str, processes: int, common: list[str], tmp: Path) -> list[dict]:
    out, folder = tmp / f"{mode}.json", tmp / mode
    return run_ranks(Path(__file__), processes, out, ["--folder", str(folder), *common, "parallel.fsdp=true",
                                                       f"parallel.fsdp_checkpoint={mode}"], mode, threads=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, args.folder, rest)
        return
    from pretrain.config import load_config
    from titans.model import num_parameters

    common = [f"model.dim={args.dim}", f"model.n_layers={args.layers}", "data.seq_len=64",
              "data.batch_size=1"]
    parameters = num_parameters(load_config(str(ROOT / "configs" / "tiny.yaml"), common).model)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("gathered", "sharded"):
            rows[mode] = run_mode(mode, args.processes, common, Path(tmp))
            print(f"{mode}: {rows[mode][0]['seconds']:.2f} s", file=sys.stderr, flush=True)
    mib = 2**20
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; tiny.yaml at "
          f"dim {args.dim}, {args.layers} layers ({parameters / 1e6:.1f}M parameters), FSDP over "
          f"{args.processes} ranks")
    print("\n| checkpoint | save (s) | host memory added, most of any rank (MiB) | on rank 0 (MiB) "
          "| largest file (MiB) |\n|---|---:|---:|---:|---:|")
    for mode, ranks in rows.items():
        added = max(r["added"] for r in ranks) / mib
        seconds = max(r["seconds"] for r in ranks)
        print(f"| {mode} | {seconds:.2f} | {added:.0f} | {ranks[0]['added'] / mib:.0f} "
              f"| {max(r['largest'] for r in ranks) / mib:.0f} |")


if __name__ == "__main__":
    main()
