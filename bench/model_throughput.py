"""Model throughput: forward+backward tokens/s and memory per variant, and time per token vs length.

    python bench/model_throughput.py                 # the fixed config of the issue, all variants
    python bench/model_throughput.py --lengths 2048 4096 --repeats 2

Table 1 (dim 256, 4 layers, 4 heads of 64, seq 1024, batch 2): tokens/s of a training step (forward,
backward), its ratio against the SWA baseline run in the same process, and memory: on CUDA the peak
allocated bytes; on CPU the bytes autograd saved for backward (the activation memory; CPU PyTorch has
no allocator statistics). Table 2: time per token at 2K → 32K tokens (batch 1) for LMM and MAC, with
the ratio against the shortest length. If `titans-pytorch` is installed, its MemoryAsContextTransformer
runs on the closest config and the ratio of tokens/s is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.loss import causal_lm_loss  # noqa: E402
from titans.model import TitansConfig, TitansLM  # noqa: E402

VARIANTS = ["swa", "mac", "mag", "mal", "lmm"]


def bench_config(layers: str, args: argparse.Namespace) -> TitansConfig:
    return TitansConfig(
        vocab_size=args.vocab, dim=256, n_layers=4, n_heads=4, head_dim=64, layers=layers,
        window=args.window, segment_len=args.window, n_persistent=16, memory_chunk=args.chunk,
        memory_depth=2, recompute_memory=not args.no_recompute, mac_memory_tokens=args.mac_memory_tokens,
    )


class SavedBytes:
    """Counts the bytes autograd saves for backward (unique storages): activation memory on CPU."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def train_step(model: TitansLM, tokens: torch.Tensor, counter: SavedBytes | None = None) -> None:
    hooks = (torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t) if counter
             else contextlib.nullcontext())
    with hooks:
        loss = causal_lm_loss(model, tokens[:, :-1], tokens[:, 1:])
    loss.backward()


def measure(model: torch.nn.Module, batch: int, seq: int, vocab: int, repeats: int,
            device: torch.device) -> tuple[float, int]:
    """Median seconds per training step, and memory (CUDA peak allocated, else saved activations)."""
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    counter = SavedBytes() if device.type == "cpu" else None
    with autocast:
        train_step(model, tokens, counter)  # warm-up (and the CPU memory count)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            train_step(model, tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else counter.total
    return sorted(times)[len(times) // 2], memory


def titans_pytorch_baseline(args: argparse.Namespace, device: torch.device) -> float | None:
    """tokens/s of lucidrains' titans-pytorch MAC on the closest config, if it is installed."""
    try:
        from titans_pytorch import MemoryAsContextTransformer
    except ImportError:
        return None
    model = MemoryAsContextTransformer(
        num_tokens=args.vocab, dim=256, depth=4, heads=4, dim_head=64, segment_len=args.window,
        num_persist_mem_tokens=16, num_longterm_mem_tokens=0, neural_memory_segment_len=args.chunk,
    ).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    model(tokens, return_loss=True).backward()
    start = time.perf_counter()
    for _ in range(args.repeats):
        model(tokens, return_loss=True).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch * args.seq * args.repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="*", default=VARIANTS, help="block kinds for table 1")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--window", type=int, default=256, help="SWA window = MAC segment length")
    parser.add_argument("--chunk", type=int, default=64, help="memory chunk size b")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--long-variants", nargs="+", default=["lmm", "mac"])
    parser.add_argument("--no-recompute", action="store_true",
                        help="plain autograd through the memory scan instead of the recomputing backward")
    parser.add_argument("--mac-memory-tokens", type=int, default=0,
                        help="MAC long-term memory tokens: 0 = one per segment token (v1), N = N probes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    mem_label = "peak MiB" if device.type == "cuda" else "saved-for-backward MiB"
    print(f"# device: {name} ({device.type}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"# dim 256, 4 layers, 4 heads × 64, seq {args.seq}, batch {args.batch}, window/segment "
          f"{args.window}, memory chunk {args.chunk}, vocab {args.vocab}, MAC memory tokens "
          f"{args.mac_memory_tokens or 'per token'}, recompute {not args.no_recompute}")
    print(f"| variant | tokens/s | step s | × SWA step time | {mem_label} |")
    print("|---|---|---|---|---|")
    results = {}
    for kind in args.variants:
        torch.manual_seed(0)
        model = TitansLM(bench_config(kind, args)).to(device)
        seconds, memory = measure(model, args.batch, args.seq, args.vocab, args.repeats, device)
        results[kind] = seconds
        base = results.get("swa")
        ratio = f"{seconds / base:.2f}" if base else "-"
        print(f"| {kind} | {args.batch * args.seq / seconds:,.0f} | {seconds:.3f} | {ratio} | "
              f"{memory / 2**20:,.0f} |", flush=True)

    baseline = titans_pytorch_baseline(args, device)
    if baseline is not None and "mac" in results:
        ours = args.batch * args.seq / results["mac"]
        print(f"\ntitans-pytorch MAC: {baseline:,.0f} tokens/s; ours {ours:,.0f}: {ours / baseline:.2f}×")
    elif baseline is None:
        print("\n(titans-pytorch not installed: no external baseline)")

    if not args.lengths:
        return
    print(f"\n| variant | length | tokens/s | µs/token | × µs/token at {args.lengths[0]} | {mem_label} |")
    print("|---|---|---|---|---|---|")
    for kind in args.long_variants:
        torch.manual_seed(0)
        model = TitansLM(bench_config(kind, args)).to(device)
        first = None
        for length in args.lengths:
            seconds, memory = measure(model, 1, length, args.vocab, max(1, args.repeats - 1), device)
            per_token = seconds / length
            first = first or per_token
            print(f"| {kind} | {length} | {length / seconds:,.0f} | {per_token * 1e6:.1f} | "
                  f"{per_token / first:.2f} | {memory / 2**20:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
