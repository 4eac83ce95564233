"""Model throughput: forward+backward tokens/s, achieved FLOP/s and memory per variant, and time per token
vs length.

    python bench/model_throughput.py                 # the fixed config of the issue, all variants
    python bench/model_throughput.py --lengths 2048 4096 --repeats 2
    python bench/model_throughput.py --kernels torch,analytic --lengths   # the memory kernels side by side

Table 1 (dim 256, 4 layers, 4 heads of 64, seq 1024, batch 2): tokens/s of a training step (forward,
backward), its ratio against the SWA baseline run in the same process (every row's step is timed once per
round, in turn, so that the machine's drifting speed hits all rows alike), achieved FLOP/s (titans.flops'
count per token × tokens/s, the count MFU uses in training), that as a fraction of the "roof" (a large
matmul timed in the same process, in the dtype the steps compute in: float32 on CPU, bf16 under autocast on
CUDA) and against SWA's, and memory: on CUDA the peak allocated bytes; on CPU the bytes autograd saved for
backward (the activation memory; CPU PyTorch has no allocator statistics). With `--kernels`, the memory
variants run once per chunk-step kernel, with the step time against the torch kernel's. Table 2: time per
token at 2K → 32K tokens for LMM and MAC, with the ratio against the shortest length, at batch 1 or at equal
tokens per step (`--tokens-per-step`), every length of a variant timed in the same rounds. If
`titans-pytorch` is installed (`pip install -e .[bench]`), its MemoryAsContextTransformer runs at the
like-for-like config with one residual stream (hyper-connections off) and with its default four, and
ours/theirs tokens/s is printed with its ceiling (the roof over their FLOP/s); the knobs it cannot match
are listed. An empty `--variants` runs table 2 only. After each table, `# target:` lines judge it against
the CPU targets (MAC's FLOP/s against SWA's at its faster setting and against the roof; ours against
titans-pytorch with one residual stream; time per token at the longest length against the shortest).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.compile import compile_blocks  # noqa: E402
from pretrain.cpu_allocator import CPU_ALLOCATORS, use_cpu_allocator  # noqa: E402
from pretrain.loss import causal_lm_loss  # noqa: E402
from titans.flops import training_flops_per_token  # noqa: E402
from titans.kernels.toolchain import inductor_cpu_problem  # noqa: E402
from titans.memory import CHUNK_STEPS  # noqa: E402
from titans.model import TitansConfig, TitansLM  # noqa: E402

VARIANTS = ["swa", "mac", "mag", "mal", "lmm"]
ROOF_SIZE = 2048  # the roof matmul: (n × n) @ (n × n)
# The CPU targets each table is judged against: MAC's FLOP/s against SWA's and as a fraction of the roof,
# ours against titans-pytorch with one residual stream, and time per token at the longest length against
# the shortest (the targets name 32K against 2K)
TARGET_SWA_FLOPS, TARGET_ROOF, TARGET_PEER, TARGET_LENGTH = 0.8, 0.5, 3.0, 1.2
LossFn = Callable[[torch.Tensor], torch.Tensor]


def bench_config(layers: str, args: argparse.Namespace, kernel: str | None = None) -> TitansConfig:
    return TitansConfig(
        vocab_size=args.vocab, dim=256, n_layers=4, n_heads=4, head_dim=64, layers=layers,
        window=args.window, segment_len=args.window, n_persistent=16, memory_chunk=args.chunk,
        memory_depth=2, recompute_memory=not args.no_recompute, mac_memory_tokens=args.mac_memory_tokens,
        memory_kernel=kernel or args.kernel,
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


def train_step(loss_fn: LossFn, tokens: torch.Tensor, counter: SavedBytes | None = None) -> None:
    hooks = (torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t) if counter
             else contextlib.nullcontext())
    with hooks:
        loss = loss_fn(tokens)
    loss.backward()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


Entry = tuple[torch.nn.Module, LossFn, bool]  # a model, its loss, whether to count its saved bytes


def measure_rounds(entries: list[Entry], batch: int, seq: int, vocab: int, repeats: int,
                   device: torch.device, roof: bool = False, shapes: list[tuple[int, int]] | None = None
                   ) -> tuple[list[tuple[float, int]], float | None]:
    """Median seconds per training step and memory of every entry, timed in rounds: one step of each
    entry per round (and with `roof`, then a roof matmul), so that the machine's drifting speed hits every
    row alike and their ratios hold. Memory: CUDA's peak allocated in an entry's first timed step, else
    the bytes autograd saved (0 without counting: torch.func, which titans-pytorch uses, refuses
    saved-tensor hooks). An entry's loss(tokens of seq + 1) is ours or titans-pytorch's, timed the same way.
    `shapes` gives each entry its own (batch, seq) (default: all `batch` × `seq`).
    Returns [(seconds, memory)] in the entries' order and the median roof (FLOP/s) or None."""
    shapes = shapes or [(batch, seq)] * len(entries)
    batches = [torch.randint(0, vocab, (b, s + 1), device=device) for b, s in shapes]
    cuda = device.type == "cuda"
    memories, times, roofs = [0] * len(entries), [[] for _ in entries], []
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for i, (_, loss_fn, count_saved) in enumerate(entries):  # warm-up (and the CPU memory count)
            counter = SavedBytes() if not cuda and count_saved else None
            train_step(loss_fn, batches[i], counter)
            memories[i] = counter.total if counter else 0
        for round_ in range(repeats):
            for i, (_, loss_fn, _) in enumerate(entries):
                if cuda and round_ == 0:
                    synchronize(device)
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                train_step(loss_fn, batches[i])
                synchronize(device)
                times[i].append(time.perf_counter() - start)
                if cuda and round_ == 0:
                    memories[i] = torch.cuda.max_memory_allocated()
            if roof:
                roofs.append(matmul_roof(device)[0])
    for model, _, _ in entries:
        model.zero_grad(set_to_none=True)
    return [(median(t), m) for t, m in zip(times, memories, strict=True)], median(roofs) if roof else None


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def measure(model: torch.nn.Module, loss_fn: LossFn, batch: int, seq: int, vocab: int, repeats: int,
            device: torch.device, count_saved: bool = True) -> tuple[float, int]:
    """Median seconds per training step of one model, and its memory (as `measure_rounds`)."""
    (result,), _ = measure_rounds([(model, loss_fn, count_saved)], batch, seq, vocab, repeats, device)
    return result


def ours_loss(model: TitansLM) -> LossFn:
    return lambda t: causal_lm_loss(model, t[:, :-1], t[:, 1:])


def ours_entry(cfg: TitansConfig, device: torch.device, compile_blocks_with: str | None = None,
               seq_len: int | None = None) -> Entry:
    """A fresh model of `cfg` (seed 0) with its loss, for `measure_rounds`; with `compile_blocks_with` (a
    torch.compile backend) its blocks compiled as `train.compile` does, and its saved bytes not counted
    (the hooks that count them would be traced into the compiled graphs)."""
    torch.manual_seed(0)
    model = TitansLM(cfg).to(device)
    if compile_blocks_with:
        compile_blocks(model, compile_blocks_with, seq_len)
    return model, ours_loss(model), not compile_blocks_with


def roof_dtype(device: torch.device) -> torch.dtype:
    """The dtype the training steps compute in: bf16 under autocast on CUDA, float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def matmul_roof(device: torch.device, dtype: torch.dtype | None = None, size: int = ROOF_SIZE,
                iters: int | None = None, repeats: int = 5) -> tuple[float, torch.dtype]:
    """FLOP/s of a (size × size) @ (size × size) matmul, the median of `repeats` timings of `iters`
    back-to-back products, in the dtype the training steps compute in (default: bf16 on CUDA, float32 on
    CPU): what this device reaches on the best-case op, so a variant's FLOP/s reads as a fraction of it.
    Several products per timing on CUDA (default 10): one 2048³ product on an H100 takes about as long as
    the synchronisation around it."""
    dtype = dtype or roof_dtype(device)
    iters = iters or (10 if device.type == "cuda" else 1)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(2):  # warm-up
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        synchronize(device)
        times.append((time.perf_counter() - start) / iters)
    return 2 * size**3 / sorted(times)[len(times) // 2], dtype


def titans_pytorch_kwargs(cfg: TitansConfig) -> tuple[dict, list[str]]:
    """Constructor arguments of titans-pytorch's MemoryAsContextTransformer matching `cfg` knob for knob,
    and the differences it has no argument for (printed with the comparison)."""
    ff_mult = cfg.ffn_hidden * 3 / (2 * cfg.dim)  # theirs: GEGLU of hidden int(dim · mult · 2/3)
    kwargs = dict(
        num_tokens=cfg.vocab_size, dim=cfg.dim, depth=cfg.n_layers, heads=cfg.n_heads, dim_head=cfg.head_dim,
        segment_len=cfg.segment_len, num_persist_mem_tokens=cfg.n_persistent,
        num_longterm_mem_tokens=cfg.mac_memory_tokens, neural_memory_segment_len=cfg.memory_chunk,
        ff_mult=ff_mult,
        neural_memory_kwargs=dict(
            heads=cfg.memory_heads, dim_head=cfg.memory_head_dim, momentum=True,
            max_grad_norm=cfg.memory_max_grad_norm, mem_model_norm_add_residual=cfg.memory_residual_norm,
            qk_rmsnorm=True, post_rmsnorm=True,
            default_model_kwargs=dict(depth=cfg.memory_depth,
                                      expansion_factor=cfg.memory_hidden / cfg.memory_head_dim),
        ),
    )
    unmatched = [
        f"FFN: ours SwiGLU of {cfg.ffn_hidden}, theirs GEGLU of {int(cfg.dim * ff_mult * 2 / 3)} (ff_mult "
        f"{ff_mult:g})",
        "memory q/k: ours l2-normalised, theirs RMSNorm (qk_rmsnorm=True)",
        f"memory q/k/v depthwise causal conv (ours kernel {cfg.memory_conv_kernel}; theirs has none)",
        f"memory gradient horizon {cfg.memory_grad_horizon} chunks and recomputing backward "
        f"{cfg.recompute_memory} (ours only)",
        "theirs only: axial positional embedding, value residual across layers"
        + (", untied output head" if cfg.tie_embeddings else ""),
    ]
    if not cfg.mac_memory_tokens:
        unmatched.insert(0, "MAC long-term tokens: ours one per segment token (v1); theirs 0 "
                            "(set --mac-memory-tokens N for N on both sides)")
    return kwargs, unmatched


def compare_titans_pytorch(cfg: TitansConfig, args: argparse.Namespace, device: torch.device) -> None:
    """ours/theirs tokens/s against lucidrains' titans-pytorch MAC with hyper-connections off (one
    residual stream, like ours) and at its default of four streams, our MAC (kernel `cfg.memory_kernel`)
    and both of theirs timed in the same rounds.

    Also the ceiling of that ratio: both models do the same dense work per token (embeddings, attention
    and FFN projections, the vocabulary head, the memory MLP), so ours cannot beat theirs by more than
    the roof over their FLOP/s (that work counted by titans.flops at our config, over their step time):
    the ratio our step would reach at the matmul roof, with the memory's cost at zero included."""
    try:
        from titans_pytorch import MemoryAsContextTransformer
    except ImportError:
        print("\n(titans-pytorch not installed: no external baseline; pip install -e .[bench])")
        return
    kwargs, unmatched = titans_pytorch_kwargs(cfg)
    labels = ["1 residual stream (hyper-connections off)", "4 streams (default)"]
    entries = [ours_entry(cfg, device, args.compile, args.seq)]
    for streams in (1, 4):
        torch.manual_seed(0)
        model = MemoryAsContextTransformer(**kwargs, num_residual_streams=streams).to(device)
        entries.append((model, lambda t, m=model: m(t, return_loss=True), False))
    results, roof = measure_rounds(entries, args.batch, args.seq, args.vocab, args.repeats, device, roof=True)
    ours = args.batch * args.seq / results[0][0]
    print(f"\ntitans-pytorch {version('titans-pytorch')} MemoryAsContextTransformer; ours MAC "
          f"{ours:,.0f} tokens/s (kernel {cfg.memory_kernel}, timed in the same rounds); not matched:")
    for line in unmatched:
        print(f"#   {line}")
    flops_per_token = training_flops_per_token(cfg, args.seq)
    print("| titans-pytorch | tokens/s | step s | ours / theirs tokens/s | their GFLOP/s (our count) | "
          "ceiling: ours at the roof / theirs |")
    print("|---|---|---|---|---|---|")
    ratios = []  # (ours / theirs, its ceiling) per label
    for label, (seconds, _) in zip(labels, results[1:], strict=True):
        theirs = args.batch * args.seq / seconds
        their_flops = flops_per_token * theirs
        ratios.append((ours / theirs, roof / their_flops))
        print(f"| {label} | {theirs:,.0f} | {seconds:.3f} | {ratios[-1][0]:.2f} | {their_flops / 1e9:,.1f} | "
              f"{ratios[-1][1]:.2f} |", flush=True)
    ratio, ceiling = ratios[0]  # the target is against one residual stream, like ours
    print(f"# target: ours / titans-pytorch with hyper-connections off {ratio:.2f} (>= {TARGET_PEER:.2f}): "
          f"{verdict(ratio, TARGET_PEER)}; its ceiling here {ceiling:.2f}"
          + (" (out of reach: ours at the matmul roof would not meet it)" if ceiling < TARGET_PEER else ""))


def git_revision() -> str:
    """The commit the numbers belong to (with '+dirty' when the tree has local changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="*", default=VARIANTS,
                        help="block kinds for table 1 (none: skip table 1 and titans-pytorch)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--window", "--segment", type=int, default=256,
                        help="SWA window = MAC segment length")
    parser.add_argument("--chunk", type=int, default=64, help="memory chunk size b")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--long-variants", nargs="+", default=["lmm", "mac"])
    parser.add_argument("--tokens-per-step", type=int, default=0,
                        help="table 2 at equal tokens per step (batch = this // length); 0: batch 1")
    parser.add_argument("--no-recompute", action="store_true",
                        help="plain autograd through the memory scan instead of the recomputing backward")
    parser.add_argument("--mac-memory-tokens", type=int, default=0,
                        help="MAC long-term memory tokens: 0 = one per segment token (v1), N = N probes")
    parser.add_argument("--kernel", choices=CHUNK_STEPS, default="torch",
                        help="memory chunk-step kernel of every benchmarked config (triton: CUDA only)")
    parser.add_argument("--kernels", type=lambda s: s.split(","), default=None,
                        help="comma-separated kernels to run table 1's memory variants with, each against "
                             "the torch kernel's step time (e.g. torch,analytic); default: --kernel")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--cpu-allocator", choices=CPU_ALLOCATORS, default="reuse",
                        help="host memory on CPU, as train.cpu_allocator: reuse (freed blocks stay in the "
                             "process for the next step) or system (malloc as configured)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="also compile our models' blocks as train.compile does (table 1: every row "
                             "eager and compiled; the titans-pytorch comparison: ours compiled; the "
                             "warm-up step compiles), with this backend (default inductor)")
    args = parser.parse_args()
    args.kernels = args.kernels or [args.kernel]
    for kernel in {args.kernel, *args.kernels}:
        if kernel not in CHUNK_STEPS:
            parser.error(f"unknown kernel {kernel!r}; expected one of {', '.join(CHUNK_STEPS)}")
        if kernel == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("the triton kernel needs a CUDA device (on CPU only in Triton's interpreter: "
                         "set TRITON_INTERPRET=1, which measures the interpreter, not the kernel)")
    inductor = [flag for flag, used in (("the compiled kernel", "compiled" in {args.kernel, *args.kernels}),
                                        ("--compile", args.compile == "inductor")) if used]
    if inductor and not torch.cuda.is_available() and (problem := inductor_cpu_problem()):
        parser.error(f"{' and '.join(inductor)}: inductor cannot build C++ for the CPU here ({problem}); "
                     "install a C++ compiler (g++), or use the torch kernel and no --compile")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cpu_allocator(args.cpu_allocator, device.type)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    mem_label = "peak MiB" if device.type == "cuda" else "saved-for-backward MiB"
    print(f"# command: python {shlex.join(sys.argv)}  (commit {git_revision()})")
    print(f"# device: {name} ({device.type}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"autocast {'bf16' if device.type == 'cuda' else 'off'}"
          + ("" if device.type == "cuda" else f", allocator {args.cpu_allocator}"))
    print(f"# dim 256, 4 layers, 4 heads × 64, seq {args.seq}, batch {args.batch}, window/segment "
          f"{args.window}, memory chunk {args.chunk}, vocab {args.vocab}, MAC memory tokens "
          f"{args.mac_memory_tokens or 'per token'}, recompute {not args.no_recompute}, kernels "
          f"{','.join(args.kernels)} (table 2: {args.kernel}), repeats {args.repeats} (median), blocks "
          + (f"eager and compiled ({args.compile}; table 2 eager)" if args.compile else "eager"))
    print(f"# config: {bench_config('mac', args)}")
    dtype = str(roof_dtype(device)).split(".")[-1]
    print(f"# roof: {ROOF_SIZE}×{ROOF_SIZE} @ {ROOF_SIZE}×{ROOF_SIZE} {dtype} matmul, timed once per round "
          "of each table")
    if args.variants:
        variant_table(args, device, mem_label)
        compare_titans_pytorch(bench_config("mac", args), args, device)

    if args.lengths:
        time_per_token_by_length(args, device, mem_label)


def variant_table(args: argparse.Namespace, device: torch.device, mem_label: str) -> None:
    """Table 1: every variant (and memory kernel) at the fixed config, all timed in the same rounds. With
    --compile every row runs eager and compiled, and its FLOP/s is given against SWA's both ways: compiling
    is a per-model choice, so a compiled MAC is compared with SWA compiled and eager (on CPU the faster)."""
    backends = [None, args.compile] if args.compile else [None]
    rows = [(kind, kernel, backend) for kind in args.variants for backend in backends
            for kernel in (["torch"] if kind in ("swa", "full") else args.kernels)]
    configs = [bench_config(kind, args, kernel) for kind, kernel, _ in rows]
    entries = [ours_entry(cfg, device, row[2], args.seq) for cfg, row in zip(configs, rows, strict=True)]
    results, roof = measure_rounds(entries, args.batch, args.seq, args.vocab, args.repeats, device, roof=True)
    seconds_of = {row: seconds for row, (seconds, _) in zip(rows, results, strict=True)}
    tokens = args.batch * args.seq

    def flops_per_s(cfg: TitansConfig, seconds: float | None) -> float | None:
        return seconds and training_flops_per_token(cfg, args.seq) * tokens / seconds

    swa_cfg = bench_config("swa", args)
    swa_flops_of = {backend: flops_per_s(swa_cfg, seconds_of.get(("swa", "torch", backend)))
                    for backend in backends}
    eager_swa = swa_flops_of[None]
    against_eager = bool(args.compile and eager_swa)
    # The targets judge MAC against SWA as it runs fastest in this table (eager or compiled): compiling is a
    # choice a run makes for each model, so MAC at its best setting has to match SWA at its best.
    best_backend = max(backends, key=lambda backend: swa_flops_of[backend] or 0.0)
    best_swa, targets = swa_flops_of[best_backend], []
    print(f"\nroof (median over the rounds): {roof / 1e9:,.1f} GFLOP/s")
    print("\n| variant | blocks | kernel | tokens/s | step s | × SWA step time | × torch-kernel step time | "
          f"GFLOP/s | of roof | × SWA FLOP/s |{' × eager SWA FLOP/s |' * against_eager} {mem_label} |")
    print("|---" * (11 + against_eager) + "|")
    for (kind, kernel, backend), cfg, (seconds, memory) in zip(rows, configs, results, strict=True):
        blocks = "compiled" if backend else "eager"
        swa, torch_kernel = (seconds_of.get((name, "torch", backend)) for name in ("swa", kind))
        flops = flops_per_s(cfg, seconds)
        print(f"| {kind} | {blocks} | {kernel} | {tokens / seconds:,.0f} | "
              f"{seconds:.3f} | {_ratio(seconds, swa)} | {_ratio(seconds, torch_kernel)} | "
              f"{flops / 1e9:,.1f} | {flops / roof:.3f} | {_ratio(flops, swa_flops_of[backend])} |"
              f"{f' {_ratio(flops, eager_swa)} |' * against_eager} {memory / 2**20:,.0f} |", flush=True)
        if kind == "mac" and best_swa:
            against_swa, of_roof = flops / best_swa, flops / roof
            met = against_swa >= TARGET_SWA_FLOPS and of_roof >= TARGET_ROOF
            targets.append(f"# target: MAC ({blocks}, kernel {kernel}) FLOP/s {against_swa:.2f}× SWA's "
                           f"({'compiled' if best_backend else 'eager'}, the faster; "
                           f">= {TARGET_SWA_FLOPS:.2f}) and {of_roof:.3f} of the roof "
                           f"(>= {TARGET_ROOF:.2f}): {'met' if met else 'NOT met'}")
    if targets:
        print("\n".join(targets))


def time_per_token_by_length(args: argparse.Namespace, device: torch.device, mem_label: str) -> None:
    """Table 2. Batch 1 at every length, or with --tokens-per-step N a batch of N // length sequences:
    equal tokens per step separate the cost of length (the scan, the segment loop) from the cost of a
    larger working set (a 2K batch-1 step's activations fit the CPU's caches, a 32K one's do not), and is
    how long-context runs are scheduled (fewer, longer sequences per step)."""
    print(f"\n| variant | length | batch | tokens/s | µs/token | × µs/token at {args.lengths[0]} "
          f"| {mem_label} |")
    print("|---|---|---|---|---|---|---|")
    shapes = [(max(1, args.tokens_per_step // length), length) for length in args.lengths]
    lines = []
    for kind in args.long_variants:
        torch.manual_seed(0)
        model = TitansLM(bench_config(kind, args)).to(device)
        entry = (model, ours_loss(model), True)  # every length of a variant in each round
        results, _ = measure_rounds([entry] * len(shapes), 1, 1, args.vocab, max(1, args.repeats - 1),
                                    device, shapes=shapes)
        first = None
        for (batch, length), (seconds, memory) in zip(shapes, results, strict=True):
            per_token = seconds / (batch * length)
            first = first or per_token
            print(f"| {kind} | {length} | {batch} | {batch * length / seconds:,.0f} | "
                  f"{per_token * 1e6:.1f} | {per_token / first:.2f} | {memory / 2**20:,.0f} |", flush=True)
        growth = per_token / first
        lines.append(f"# target: {kind} µs/token at {shapes[-1][1]} / at {shapes[0][1]} {growth:.2f} "
                     f"(<= {TARGET_LENGTH:.2f}): {verdict(growth, TARGET_LENGTH, at_most=True)}")
    print("\n".join(lines))


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


def verdict(value: float, bound: float, at_most: bool = False) -> str:
    """'met' or 'NOT met': `value` at least `bound` (at most, with `at_most`)."""
    return "met" if (value <= bound if at_most else value >= bound) else "NOT met"


if __name__ == "__main__":
    main()
