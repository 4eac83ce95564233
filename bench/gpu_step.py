"""One GPU, the paper-scale models at 4K tokens: tokens/s, MFU and peak memory of a training step of the
340M and 760M MAC / MAG / MAL against SWA of the same size, in bf16 with flash attention (flash-attn, or
torch's FlexAttention where flash-attn is not installed) and the Triton memory kernel.

    python bench/gpu_step.py                         # both sizes, every variant, on the CUDA device
    python bench/gpu_step.py --sizes 760m --batch 2 --check
    python bench/gpu_step.py --check-only            # the GPU correctness checks only
    python bench/gpu_step.py --check-only triton     # only the Triton ones (or: attention)
    python bench/gpu_step.py --chunk-step --sizes 760m   # the memory's chunk step alone, torch and Triton
    python bench/gpu_step.py --sizes 760m --variants mac --profile 30   # and one step's top 30 ops
    python bench/gpu_step.py --device cpu --tiny     # the whole path on CPU with a tiny config, in seconds

Why: the targets of the paper-scale runs are stated per GPU (760M MAC at >= 40% MFU at 4K tokens in
bf16, and a MAC step at most 1.3x an SWA step of the same size); this script measures exactly those on
whatever card it runs on and prints them with a header that says how to reproduce them.

What it measures, per (size, variant): the median seconds of a training step (forward + backward, no
optimizer; `bench/model_throughput.measure`), tokens/s, model FLOP/s (`titans.flops.training_flops_per_token`
x tokens/s: activation checkpointing's recompute is not counted, as MFU is defined), MFU against the
card's dense bf16 peak (a table keyed by the device name, or `--peak-tflops`) and against a large bf16
matmul timed in the same process (the roof this card reaches in practice), peak allocated memory, and the
time per token against SWA's (the step-time ratio at equal batches). Models come from
`configs/paper/{mac,mag,mal}-{340m,760m}.yaml` (the `model:` section, `train.activation_checkpointing`
and, unless --batch is given, `data.batch_size`, halved until a step fits in memory); SWA is the same
config with `layers: swa` and its window set to the variant's attention span (MAC: its segment), so MAG
and MAL share one SWA baseline and MAC, whose FFN is 64 narrower, has its own.

`--check` first runs the GPU correctness checks: the Triton chunk step against the torch chunk step in
float32 (outputs and every gradient, several shapes, the paper's head included), NeuralMemory with the
Triton kernel against the torch path, and the flash-attn and FlexAttention paths of `titans.attention`
against its torch path (bf16, against a float32 reference). `bench/gpu_checks.sh` runs these, the compiled
Triton tests and both sizes with time limits.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from model_throughput import (  # noqa: E402
    git_revision,
    matmul_roof,
    measure,
    ours_loss,
    synchronize,
    train_step,
)

from parallel.compile import compile_blocks  # noqa: E402
from pretrain.config import ConfigError, RunConfig, load_config  # noqa: E402
from titans import attention  # noqa: E402
from titans.flops import training_flops_per_token  # noqa: E402
from titans.kernels.chunk_step_reference import example_step  # noqa: E402
from titans.memory import (  # noqa: E402
    CHUNK_STEPS,
    NeuralMemory,
    ScanOptions,
    chunk_step,
    chunk_step_backward_of,
    memory_chunk_step,
)
from titans.model import TitansConfig, TitansLM, num_parameters  # noqa: E402

SIZES = ("340m", "760m")
VARIANTS = ("mac", "mag", "mal")
CONFIG_DIR = ROOT / "configs" / "paper"
# Dense bf16 tensor-core peak in TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name();
# the first match wins, so the specific names come first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
TARGET_MFU = 0.40  # 760M MAC at 4K tokens in bf16
TARGET_SWA_RATIO = 1.30  # a MAC step against an SWA step of the same size
# --tiny: the paper configs shrunk until a CPU runs a step in well under a second (every block kind, the
# memory, activation checkpointing and the config loader still on the path)
TINY_OVERRIDES = ("model.vocab_size=256", "model.dim=64", "model.n_layers=1", "model.n_heads=2",
                  "model.ffn_hidden=null", "model.window=32", "model.segment_len=32", "model.n_persistent=4",
                  "model.mac_memory_tokens=8", "model.memory_chunk=16")
TINY_SEQ = 128


# ------------------------------------------------------------------------------------------ configs


def load_variant(size: str, variant: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of configs/paper/<variant>-<size>.yaml, through the training job's own loader (so a
    config the job would refuse is refused here too)."""
    return load_config(CONFIG_DIR / f"{variant}-{size}.yaml", list(overrides))


def swa_config(cfg: TitansConfig) -> TitansConfig:
    """The SWA baseline of a memory variant: the same widths, depth and persistent tokens, `layers: swa`,
    and the variant's attention span as the window (MAC attends within its segment). MAC-only fields go
    back to their defaults so that every variant with the same widths shares one baseline."""
    defaults = {f.name: f.default for f in dataclasses.fields(TitansConfig) if f.init}
    span = cfg.segment_len if "mac" in cfg.layer_kinds else cfg.window
    return dataclasses.replace(cfg, layers="swa", window=span, segment_len=defaults["segment_len"],
                               mac_memory_tokens=defaults["mac_memory_tokens"],
                               memory_kernel=defaults["memory_kernel"])


def describe(cfg: TitansConfig) -> str:
    """The fields that set a step's cost, for the reproducible header."""
    kinds = set(cfg.layer_kinds)
    parts = [f"dim {cfg.dim}", f"{cfg.n_layers} layers", f"{cfg.n_heads} heads x {cfg.head_dim}",
             f"ffn {cfg.ffn_hidden}", f"vocab {cfg.vocab_size}", f"persistent {cfg.n_persistent}"]
    if "mac" in kinds:
        parts += [f"segment {cfg.segment_len}", f"memory tokens {cfg.mac_memory_tokens or 'per token'}"]
    else:
        parts.append(f"window {cfg.window}")
    if kinds - {"swa", "full"}:
        parts.append(f"memory {cfg.memory_heads} heads x {cfg.memory_head_dim}, hidden {cfg.memory_hidden}, "
                     f"depth {cfg.memory_depth}, chunk {cfg.memory_chunk}, kernel {cfg.memory_kernel}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------ device and peaks


def card_peak_flops(device_name: str, override_tflops: float | None) -> tuple[float | None, str]:
    """The card's dense bf16 peak in FLOP/s, and where it came from (None when the name is unknown)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12, f"table entry {key!r}"
    return None, "unknown card: pass --peak-tflops"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def triton_status() -> str | None:
    """None when the Triton kernels can be imported, else why not."""
    try:
        import titans.kernels.chunk_step_triton  # noqa: F401
    except Exception as err:  # ImportError, or a triton that fails to initialise on this machine
        return f"triton is not importable ({type(err).__name__}: {first_line(err)})"
    return None


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when they were
    first imported): there they are checked, never timed."""
    from titans.kernels.chunk_step_triton import interpreted

    return interpreted()


@contextlib.contextmanager
def attention_paths(flash: Callable | None, flex: Callable | None) -> Iterator[None]:
    """titans.attention's flash-attn and FlexAttention entry points replaced for the duration (None: that
    path off; both None: the torch path)."""
    saved = attention.flash_attn_func, attention.flex_attention_func
    attention.flash_attn_func, attention.flex_attention_func = flash, flex
    try:
        yield
    finally:
        attention.flash_attn_func, attention.flex_attention_func = saved


# ------------------------------------------------------------------------------------------ checks


@dataclass
class Check:
    name: str
    passed: bool | None  # None: skipped
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"check {self.name}: {verdict}  {self.detail}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def max_rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(rel_err(a, b) for a, b in zip(got, want, strict=True))


def step_outputs_and_grads(step: Callable, opts: ScanOptions, inputs: list[torch.Tensor]
                           ) -> list[torch.Tensor]:
    """A chunk step's outputs and the gradients of all its inputs for fixed random output gradients."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    outputs = step(opts, *inputs)
    gen = torch.Generator().manual_seed(1)
    probes = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outputs]
    grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outputs, probes)), inputs)
    return [t.detach() for t in (*outputs, *grads)]


# (depth, chunk b, head_dim, hidden, rows, clip): small ones and the paper's (b 64, head 64, hidden 256),
# there with clipping only: the models' default, and each float32 specialisation at that shape takes
# minutes to compile, which the memory check and the timed steps then find in Triton's cache
CHUNK_STEP_SHAPES = ((1, 16, 16, 16, 4, True), (2, 16, 16, 32, 4, False), (2, 64, 64, 256, 16, True))
SMALL_CHUNK_STEP_SHAPES = CHUNK_STEP_SHAPES[:2]


def check_triton_chunk_step(device: torch.device, shapes: Sequence[tuple] = CHUNK_STEP_SHAPES) -> list[Check]:
    """The Triton chunk step in float32 against the torch chunk step in float32 (same device) and both
    against float64: passes when the kernel is within max(2e-5, 4x the torch step's own float32 error)
    of float64 over the outputs and every input's gradient."""
    from titans.kernels.chunk_step_triton import triton_chunk_step

    checks = []
    for depth, b, dim, hidden, rows, clip in shapes:
        name = f"triton chunk step depth {depth}, b {b}, head {dim}, hidden {hidden}, clip {clip}"
        try:
            opts, inputs = example_step(depth, True, clip, n_rows=rows, b=b, dim=dim, hidden=hidden)
            exact = step_outputs_and_grads(memory_chunk_step, opts, inputs)
            inputs32 = [t.float().to(device) for t in inputs]
            torch32 = step_outputs_and_grads(memory_chunk_step, opts, inputs32)
            kernel = step_outputs_and_grads(triton_chunk_step, opts, inputs32)
            synchronize(device)
        except Exception as err:  # a kernel that fails to compile or launch is a failed check, not a crash
            checks.append(Check(name, False, f"raised {type(err).__name__}: {first_line(err)}"))
            continue
        err_kernel, err_torch = max_rel_err(kernel, exact), max_rel_err(torch32, exact)
        tol = max(2e-5, 4 * err_torch)
        checks.append(Check(name, err_kernel <= tol,
                            f"max rel err vs float64: kernel {err_kernel:.2e}, torch fp32 {err_torch:.2e} "
                            f"(tol {tol:.1e}); kernel vs torch fp32 {max_rel_err(kernel, torch32):.2e}"))
    return checks


def check_triton_memory(device: torch.device, small: bool = False) -> Check:
    """NeuralMemory with memory_kernel "triton" against the torch path in float32: output, end state and
    every gradient, across chunks, a partial last chunk and a gradient cut (the scan's use of the kernel)."""
    shape = (1, 32, 2, 16, 32, 16, 40, 2) if small else (2, 256, 4, 64, 256, 64, 1000, 4)
    batch, dim, heads, head, hidden, chunk, length, horizon = shape
    name = f"triton NeuralMemory (head {head}, hidden {hidden}, chunk {chunk}, {length} tokens)"
    try:
        results = []
        torch.manual_seed(1)
        x = torch.randn(batch, length, dim, device=device)
        for kernel in ("torch", "triton"):
            torch.manual_seed(0)
            memory = NeuralMemory(dim=dim, heads=heads, head_dim=head, depth=2, hidden=hidden,
                                  chunk_size=chunk, recompute=True, max_grad_norm=1.0, grad_horizon=horizon,
                                  kernel=kernel).to(device)
            xg = x.clone().requires_grad_()
            y, state = memory(xg)
            loss = y.square().sum() + sum(w.square().sum() for w in state.weights)
            results.append([y, *state.weights, *torch.autograd.grad(loss, [xg, *memory.parameters()])])
        synchronize(device)
    except Exception as err:
        return Check(name, False, f"raised {type(err).__name__}: {first_line(err)}")
    err = max_rel_err(results[1], results[0])
    return Check(name, err <= 1e-4, f"max rel err vs torch path {err:.2e} (tol 1.0e-04)")


def check_no_host_sync(device: torch.device) -> Check:
    """A training step of a small MAC model on the Triton kernel (after a warm-up step) under CUDA's sync
    debug mode: no op may make the host wait for the GPU. One that did (a tensor built from host values
    per chunk step, an .item()) would leave the GPU idle while the host prepares every next chunk."""
    name = "no host-device sync in a MAC training step (triton kernel)"
    if device.type != "cuda":
        return Check(name, None, "needs a CUDA device")
    try:
        run = load_variant("340m", "mac", TINY_OVERRIDES)
        model = build_model(dataclasses.replace(run.model, memory_kernel="triton"), device, True)
        tokens = torch.randint(0, run.model.vocab_size, (1, 4 * TINY_SEQ + 1), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            train_step(ours_loss(model), tokens)
            synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                train_step(ours_loss(model), tokens)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        synchronize(device)
    except Exception as err:
        return Check(name, False, f"raised {type(err).__name__}: {first_line(err)}")
    return Check(name, True, "no synchronising op")


# (name, T, window, persistent P, memory tokens N, memory tokens causal): the block kinds' attention calls
ATTENTION_CASES = (("swa (window, no extra keys)", 1024, 512, 0, 0, False),
                   ("mag/mal (window + persistent)", 1024, 512, 128, 0, False),
                   ("mac segment (persistent + probe tokens)", 512, None, 128, 256, False),
                   ("mac v1 (persistent + causal memory tokens)", 512, None, 16, 512, True),
                   ("full causal", 1024, None, 0, 0, False))
# small: T 128, the shortest the FlexAttention path takes (a causal memory token per query: N = T)
SMALL_ATTENTION_CASES = tuple((name, 128, None if w is None else 32, min(p, 8), 128 if c else min(n, 64), c)
                              for name, _, w, p, n, c in ATTENTION_CASES)


def attention_outputs_and_grads(inputs: list[torch.Tensor | None], window: int | None, causal: bool
                                ) -> list[torch.Tensor]:
    """windowed_attention's output and the gradients of its inputs for a fixed output gradient."""
    q, k, v, pk, pv, ek, ev = (None if t is None else t.detach().requires_grad_() for t in inputs)
    out = attention.windowed_attention(q, k, v, window, pk, pv, ek, ev, extra_causal=causal)
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(out.shape, generator=gen).to(out)
    leaves = [t for t in (q, k, v, pk, pv, ek, ev) if t is not None]
    return [out.detach(), *torch.autograd.grad((out * probe).sum(), leaves)]


def fused_attention_function(path: str) -> Callable | None:
    """titans.attention's entry point of the fused path "flash" or "flex" (None: not available)."""
    return {"flash": attention.flash_attn_func, "flex": attention.flex_attention_func}[path]


def check_fused_attention(device: torch.device, path: str = "flash", cases: Sequence[tuple] = ATTENTION_CASES,
                          dtype: torch.dtype = torch.bfloat16, batch: int = 2, heads: int = 4,
                          head_dim: int = 64) -> list[Check]:
    """titans.attention's flash-attn or FlexAttention path (`path`, bf16) against its torch path, both
    against the torch path in float32: passes when the fused path's max relative error over the output
    and every gradient is within max(3e-2, 4x the bf16 torch path's): a few bf16 roundings, while a wrong
    mask or a lost gradient term is off by tenths. Also fails when that path is not taken."""
    fused = fused_attention_function(path)
    if fused is None:
        why = "flash-attn is not importable" if path == "flash" else "this torch has no FlexAttention"
        return [Check(f"{path} attention", None, f"{why}: nothing to check")]
    # flash-attn is taken before FlexAttention, so checking flex turns flash off
    only = (fused, None) if path == "flash" else (None, fused)
    taken = attention._use_flash if path == "flash" else attention._use_flex
    checks = []
    for name, length, window, n_persistent, n_memory, causal in cases:
        gen = torch.Generator().manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(device)  # noqa: B023 (used in this iteration)

        inputs: list[torch.Tensor | None] = [randn(batch, heads, length, head_dim) for _ in range(3)]
        inputs += [randn(heads, n_persistent, head_dim) for _ in range(2)] if n_persistent else [None, None]
        inputs += [randn(batch, heads, n_memory, head_dim) for _ in range(2)] if n_memory else [None, None]
        low = [None if t is None else t.to(dtype) for t in inputs]
        label = f"{path} attention {name}, T {length}, window {window}"
        try:
            with attention_paths(None, None):
                want = attention_outputs_and_grads(inputs, window, causal)
                torch_low = attention_outputs_and_grads(low, window, causal)
            with attention_paths(*only):
                if not taken(low[0]):
                    checks.append(Check(label, False, f"the {path} path is not taken for these inputs"))
                    continue
                got = attention_outputs_and_grads(low, window, causal)
            synchronize(device)
        except Exception as err:
            checks.append(Check(label, False, f"raised {type(err).__name__}: {first_line(err)}"))
            continue
        err_fused, err_torch = max_rel_err(got, want), max_rel_err(torch_low, want)
        tol = max(3e-2, 4 * err_torch)
        checks.append(Check(label, err_fused <= tol,
                            f"max rel err vs float32 (output, {len(got) - 1} gradients): {path} "
                            f"{err_fused:.2e}, torch {str(dtype).split('.')[-1]} {err_torch:.2e} "
                            f"(tol {tol:.1e})"))
    return checks


CHECK_GROUPS = ("triton", "attention")


def run_checks(device: torch.device, small: bool, groups: Sequence[str] = CHECK_GROUPS) -> Iterator[Check]:
    """Every correctness check of `groups` this device can run, each as it finishes (a slow one shows
    which, under a time limit); the others are listed as skipped, with why. Groups, so that a short GPU
    lease can run the Triton checks (which fill Triton's cache for the timed steps) apart from the
    attention ones."""
    if "triton" in groups:
        yield from triton_checks(device, small)
    if "attention" in groups:
        yield from attention_checks(device, small)


def triton_checks(device: torch.device, small: bool) -> Iterator[Check]:
    reason = triton_status()
    if reason is None and device.type != "cuda" and not triton_interpreted():
        reason = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
    if reason is None and device.type == "cuda" and triton_interpreted():
        reason = "TRITON_INTERPRET=1 is set: unset it (or set 0) to check the compiled kernels"
    if reason:
        yield Check("triton chunk step", None, reason)
    else:
        for shape in SMALL_CHUNK_STEP_SHAPES if small else CHUNK_STEP_SHAPES:
            yield from check_triton_chunk_step(device, [shape])
        yield check_triton_memory(device, small)
        yield check_no_host_sync(device)


def attention_checks(device: torch.device, small: bool) -> Iterator[Check]:
    for path in ("flash", "flex"):
        if device.type != "cuda":
            yield Check(f"{path} attention", None, "needs a CUDA device")
        elif fused_attention_function(path) is None:
            yield from check_fused_attention(device, path, [])  # the one "skipped", with why
        else:
            for case in SMALL_ATTENTION_CASES if small else ATTENTION_CASES:
                yield from check_fused_attention(device, path, [case])


# ------------------------------------------------------------------------------- the chunk step alone


def chunk_step_inputs(cfg: TitansConfig, rows: int, device: torch.device
                      ) -> tuple[ScanOptions, list[torch.Tensor]]:
    """Float32 inputs of one chunk step at `cfg`'s memory shape, `rows` = batch x memory heads: example_step's
    16 rows tiled (its clip threshold sits between two of their token norms; the first seed with a clear
    gap)."""
    for seed in range(8):
        try:
            opts, inputs = example_step(cfg.memory_depth, cfg.memory_residual_norm,
                                        cfg.memory_max_grad_norm is not None, n_rows=16, b=cfg.memory_chunk,
                                        dim=cfg.memory_head_dim, hidden=cfg.memory_hidden, seed=seed)
            break
        except ValueError:
            continue
    else:
        raise ValueError("no seed of example_step gives a clip threshold with a clear gap at this shape")
    tiles = -(-rows // 16)
    return opts, [t.float().repeat(tiles, *[1] * (t.dim() - 1))[:rows].contiguous().to(device)
                  for t in inputs]


def time_chunk_step(kernel: str, opts: ScanOptions, inputs: list[torch.Tensor], device: torch.device,
                    repeats: int) -> list[float | None]:
    """[forward ms, forward + backward ms, backward alone ms] of one chunk step, each the mean of `repeats`
    calls after a warm-up. The backward alone is the explicit one that the recomputing scan calls per chunk
    (None for kernels whose backward is autograd's graph)."""
    step, backward = chunk_step(kernel), chunk_step_backward_of(kernel)
    leaves = [t.detach().requires_grad_() for t in inputs]

    def forward() -> None:
        with torch.no_grad():
            step(opts, *leaves)

    def forward_backward() -> None:
        torch.autograd.grad(sum(o.sum() for o in step(opts, *leaves)), leaves)

    def backward_alone() -> None:  # the output gradients of forward_backward's sum: ones
        backward(opts, *inputs[:8], inputs[8:], ones[0], ones[1:])

    if backward:
        ones = [torch.ones_like(o) for o in step(opts, *inputs)]

    calls = (forward, forward_backward, backward_alone if backward else None)
    return [None if call is None else mean_ms(call, device, repeats) for call in calls]


def mean_ms(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Mean milliseconds of `repeats` calls after a warm-up call, the device synchronised around them."""
    call()
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(repeats):
        call()
    synchronize(device)
    return (time.perf_counter() - begin) / repeats * 1e3


class OneLaunchScan(NamedTuple):
    chunked: list[torch.Tensor]  # the chunk-major scan inputs
    forward: Callable[[], Any]
    backward: Callable[[], Any]  # the recomputing scan's: from the boundary states and output gradients
    boundaries: list[torch.Tensor]
    grad_y: torch.Tensor
    grad_end: list[torch.Tensor]


def one_launch_scans(opts: ScanOptions, inputs: list[torch.Tensor], n_chunks: int) -> OneLaunchScan:
    """A scan of `n_chunks` chunks (the chunk's inputs repeated) for the Triton whole-scan kernels, with
    its forward and backward as calls. The forward runs once here, for the boundary states."""
    from titans.kernels.chunk_step_triton import triton_scan, triton_scan_backward

    chunked = [t.unsqueeze(0).expand(n_chunks, *t.shape).contiguous() for t in inputs[:8]]
    start = inputs[8:]
    with torch.no_grad():
        y, boundaries = triton_scan(opts, chunked, start)
    grad_y, grad_end = torch.ones_like(y), [torch.ones_like(s) for s in start]
    return OneLaunchScan(chunked, lambda: triton_scan(opts, chunked, start),
                         lambda: triton_scan_backward(opts, 0, chunked, boundaries, grad_y, grad_end),
                         boundaries, grad_y, grad_end)


def time_triton_scan(opts: ScanOptions, inputs: list[torch.Tensor], n_chunks: int, device: torch.device,
                     repeats: int) -> list[float]:
    """ms per chunk of a scan of `n_chunks` chunks (the chunk's inputs repeated) with the Triton kernels:
    [forward, a launch per chunk; forward, one launch; backward, a launch per chunk; backward, one
    launch], as the recomputing scan calls them (the backward alone), each the mean of `repeats` scans
    after a warm-up."""
    from titans.kernels.chunk_step_triton import triton_chunk_step, triton_chunk_step_backward

    chunked, forward, backward, boundaries, grad_y, grad_end = one_launch_scans(opts, inputs, n_chunks)
    start = inputs[8:]
    starts = [[b[i] for b in boundaries] for i in range(n_chunks)]

    def forward_per_chunk() -> None:
        state = start
        for i in range(n_chunks):
            _, *state = triton_chunk_step(opts, *(t[i] for t in chunked), *state)

    def backward_per_chunk() -> None:
        grad_state = grad_end
        for i in reversed(range(n_chunks)):
            grad_state = triton_chunk_step_backward(opts, *(t[i] for t in chunked), starts[i], grad_y[i],
                                                    grad_state)[8:]

    calls = (forward_per_chunk, forward, backward_per_chunk, backward)
    with torch.no_grad():
        return [mean_ms(call, device, repeats) / n_chunks for call in calls]


# (hidden tile, warps) of the scan kernels' launch, timed by --scan-launches: the launcher's choice from the
# compiler's register report (titans.kernels.cuda_frontend --resources), the launch before it, neighbours,
# and 16 warps (the IEEE backward spills least there)
SCAN_LAUNCHES = ((16, 8), (64, 4), (32, 8), (16, 4), (16, 16))


def time_scan_launch(opts: ScanOptions, inputs: list[torch.Tensor], n_chunks: int, device: torch.device,
                     repeats: int, tile: int, warps: int) -> tuple[float, float, str]:
    """ms per chunk of the one-launch scan, forward and (the recomputing scan's) backward, launched with
    hidden tile `tile` on `warps` warps, and the launch that ran when the card refused it ("" if none)."""
    from titans.kernels import chunk_step_triton as kernels

    saved = kernels.BLOCK_HIDDEN, kernels.NUM_WARPS, kernels._FITTING_LAUNCH
    kernels.BLOCK_HIDDEN, kernels.NUM_WARPS, kernels._FITTING_LAUNCH = tile, warps, {}
    try:
        asked = (kernels.hidden_tile(opts.n_layers, inputs[8].shape[-1]), warps)
        scan = one_launch_scans(opts, inputs, n_chunks)
        with torch.no_grad():
            forward = mean_ms(scan.forward, device, repeats)
            backward = mean_ms(scan.backward, device, repeats)
        ran = {(launch["BH"], launch["num_warps"]) for launch in kernels._FITTING_LAUNCH.values()}
    finally:
        kernels.BLOCK_HIDDEN, kernels.NUM_WARPS, kernels._FITTING_LAUNCH = saved
    shrunk = ", ".join(f"tile {t}, {w} warps" for t, w in sorted(ran - {asked}))
    return forward / n_chunks, backward / n_chunks, shrunk


def scan_launch_table(cfg: TitansConfig, rows: int, device: torch.device, repeats: int, seq: int = 4096,
                      launches: Sequence[tuple[int, int]] = SCAN_LAUNCHES) -> Iterator[str]:
    """A table's lines, as they come: the Triton scan of one `seq`-token sequence at `cfg`'s memory shape
    per launch (hidden tile, warps), TF32 dots first, then IEEE: which launch the kernels should make on
    this card. Each launch compiles first (seconds with TF32 dots; a minute or more with IEEE ones)."""
    opts, inputs = chunk_step_inputs(cfg, rows, device)
    n_chunks = -(-seq // cfg.memory_chunk)
    yield (f"Triton scan, one launch per direction: {rows} rows × {n_chunks} chunks, b {cfg.memory_chunk}, "
           f"head {cfg.memory_head_dim}, hidden {cfg.memory_hidden}; ms per chunk, mean of {repeats} scans "
           f"after a warm-up; × the first row of its precision")
    yield "| dots | hidden tile | warps | forward ms | backward ms | forward + backward × first | note |"
    yield "|---|---:|---:|---:|---:|---:|---|"
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        for precision in ("tf32", "ieee"):
            torch.backends.cuda.matmul.fp32_precision = precision
            first = None
            for tile, warps in launches:
                try:
                    forward, backward, shrunk = time_scan_launch(opts, inputs, n_chunks, device, repeats,
                                                                 tile, warps)
                except Exception as err:  # a launch that cannot run here is a row, not a crash
                    why = f"{type(err).__name__}: {first_line(err, 80)}"
                    yield f"| {precision} | {tile} | {warps} | {why} | | | |"
                    continue
                first = first or forward + backward
                note = f"the card refused it: ran {shrunk}" if shrunk else ""
                yield (f"| {precision} | {tile} | {warps} | {forward:.3f} | {backward:.3f} | "
                       f"{(forward + backward) / first:.2f} | {note} |")
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def chunk_step_table(cfg: TitansConfig, rows: int, device: torch.device, repeats: int, seq: int = 4096
                     ) -> list[str]:
    """The torch, analytic and (on CUDA) compiled and Triton chunk steps at `cfg`'s memory shape, with exact
    and (on CUDA) TF32 float32 matmuls: which kernel the memory should run on this card. The compiled step
    (inductor's own Triton kernels on CUDA) compiles for tens of seconds per precision first. With Triton,
    a second table times a `seq`-token scan with a launch per chunk against one launch for all chunks."""
    kernels = ["torch", "analytic"]
    if device.type == "cuda":
        kernels.append("compiled")
    if device.type == "cuda" and triton_status() is None and not triton_interpreted():
        kernels.append("triton")
    precisions = ("ieee", "tf32") if device.type == "cuda" else ("ieee",)
    opts, inputs = chunk_step_inputs(cfg, rows, device)
    lines = [f"chunk step: {rows} rows, b {cfg.memory_chunk}, head {cfg.memory_head_dim}, hidden "
             f"{cfg.memory_hidden}, depth {cfg.memory_depth}, clip {opts.max_grad_norm is not None}; mean of "
             f"{repeats} calls after a warm-up",
             "| chunk step | float32 matmuls | forward ms | forward + backward ms | backward alone ms |",
             "|---|---|---:|---:|---:|"]
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        for precision in precisions:
            torch.backends.cuda.matmul.fp32_precision = precision
            for kernel in kernels:
                try:
                    times = time_chunk_step(kernel, opts, inputs, device, repeats)
                    cells = " | ".join("-" if t is None else f"{t:.3f}" for t in times)
                    lines.append(f"| {kernel} | {precision} | {cells} |")
                except Exception as err:  # a kernel that cannot launch here is a row, not a crash
                    why = f"{type(err).__name__}: {first_line(err, 80)}"
                    lines.append(f"| {kernel} | {precision} | {why} | | |")
        if "triton" in kernels:  # the launch per chunk against one launch per scan, per chunk
            n_chunks = -(-seq // cfg.memory_chunk)  # one sequence's scan
            lines += ["", f"Triton scan of {n_chunks} chunks, ms per chunk (mean of {repeats} scans)",
                      "| float32 matmuls | forward, launch per chunk | forward, one launch | "
                      "backward, launch per chunk | backward, one launch |", "|---|---:|---:|---:|---:|"]
            for precision in ("tf32",):  # the GPU setting (with IEEE dots the kernels compile for minutes)
                torch.backends.cuda.matmul.fp32_precision = precision
                try:
                    times = time_triton_scan(opts, inputs, n_chunks, device, repeats)
                    lines.append(f"| {precision} | " + " | ".join(f"{t:.3f}" for t in times) + " |")
                except Exception as err:
                    lines.append(f"| {precision} | {type(err).__name__}: {first_line(err, 80)} | | | |")
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    return lines


def first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:limit]


# ------------------------------------------------------------------------------------------- timing


@dataclass
class Row:
    size: str
    variant: str
    cfg: TitansConfig
    batch: int
    seconds: float | None = None
    steps: int = 0
    memory: int = 0
    error: str | None = None
    note: str = ""


def build_model(cfg: TitansConfig, device: torch.device, checkpointing: bool,
                compile_backend: str | None = None, seq_len: int | None = None) -> TitansLM:
    """The model initialised where it runs (a 760M model initialised on the CPU first would take longer
    than its measurement); with `compile_backend`, its blocks compiled as `train.compile` does."""
    torch.manual_seed(0)
    with torch.device(device):
        model = TitansLM(cfg)
    model.checkpoint_blocks = checkpointing
    if compile_backend:
        compile_blocks(model, compile_backend, seq_len)
    return model


def time_step(cfg: TitansConfig, batch: int, device: torch.device, args: argparse.Namespace
              ) -> tuple[float, int, int]:
    """(median step seconds, steps timed, memory) of a fresh model: one timed step after a warm-up
    (compilation, autotuning, allocator growth), then, as far as --row-budget-s allows, `--repeats` more
    (`measure` warms up again before them)."""
    model = build_model(cfg, device, args.checkpointing, args.compile_backend, args.seq)
    try:
        loss = ours_loss(model)
        seconds, memory = measure(model, loss, batch, args.seq, cfg.vocab_size, 1, device)
        steps = min(args.repeats, int(args.row_budget_s / seconds) - 1)
        if steps >= 2:
            seconds, more = measure(model, loss, batch, args.seq, cfg.vocab_size, steps, device)
            memory = max(memory, more)
        if args.profile:
            profile_step(loss, batch, args.seq, cfg.vocab_size, device, args.profile)
        return seconds, max(steps, 1), memory
    finally:
        del model
        release(device)


def profile_step(loss: Callable, batch: int, seq: int, vocab: int, device: torch.device, top: int) -> None:
    """One more training step under torch.profiler: its `top` ops by device time (CPU: by CPU time), and
    on CUDA the kernel launches, whose count times a launch's cost says whether the step waits on the
    host (many small kernels) or on the GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.profiler.profile(activities=activities) as prof, autocast:
        begin = time.perf_counter()
        train_step(loss, tokens)
        synchronize(device)
        seconds = time.perf_counter() - begin
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# profile of one step ({seconds:.3f} s under the profiler), the top {top} ops by {key}:")
    print(averages.table(sort_by=key, row_limit=top, max_name_column_width=60))
    launches = [a for a in averages if "LaunchKernel" in a.key]
    if launches:
        print("# kernel launches: " + ", ".join(f"{a.key} {a.count:,} ({a.cpu_time_total / 1e6:.3f} s on the "
                                                "host)" for a in launches))


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(row: Row, device: torch.device, args: argparse.Namespace) -> None:
    """Time one row; a failure is recorded in the row. Out of memory: the batch is halved until it fits
    (down to 1). The Triton kernel failing for any other reason (one that cannot launch on this card):
    the row is timed with --fallback-kernel, as is every later row (the same shapes would fail again)."""
    while True:
        try:
            row.seconds, row.steps, row.memory = time_step(row.cfg, row.batch, device, args)
            return
        except Exception as err:
            oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
            error = f"{type(err).__name__}: {first_line(err, 100)}"
            traceback.print_exc(file=sys.stderr)
        release(device)  # here, not in the handler: the traceback's frames hold the failed model's tensors
        if oom and row.batch > 1:
            print(f"# {row.size} {row.variant}: out of memory at batch {row.batch}; trying {row.batch // 2}",
                  flush=True)
            row.note = join(row.note, f"out of memory at batch {row.batch}")
            row.batch //= 2
        elif not oom and row.cfg.memory_kernel == "triton" and args.fallback_kernel != "triton":
            print(f"# {row.size} {row.variant}: the triton kernel failed ({error}); timing it and every "
                  f"later row with the {args.fallback_kernel} kernel", flush=True)
            args.kernel = args.fallback_kernel
            row.note = join(row.note, f"triton failed: {error}")
            row.cfg = dataclasses.replace(row.cfg, memory_kernel=args.fallback_kernel)
        else:
            row.error = error
            return


def join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def table_header(device: torch.device) -> str:
    memory = "peak MiB" if device.type == "cuda" else "saved-for-backward MiB"
    return ("| size | variant | params | kernel | batch | step s | steps | tokens/s | model TFLOP/s "
            f"| MFU (card) | MFU (roof) | {memory} | x SWA time/token | note |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(row: Row, swa: Row | None, args: argparse.Namespace, card: float | None, roof: float) -> str:
    params = f"{num_parameters(row.cfg) / 1e6:,.1f}M"
    kernel = row.cfg.memory_kernel if row.variant in VARIANTS else "-"
    if row.seconds is None:
        return (f"| {row.size} | {row.variant} | {params} | {kernel} | {row.batch} | failed | | | | | | | | "
                f"{join(row.error or '', row.note)} |")
    tokens = row.batch * args.seq / row.seconds
    flops = training_flops_per_token(row.cfg, args.seq) * tokens
    mfu = f"{flops / card:.3f}" if card else "-"
    ratio = f"{per_token_ratio(row, swa):.2f}" if swa is not None and swa.seconds else "-"
    return (f"| {row.size} | {row.variant} | {params} | {kernel} | {row.batch} | {row.seconds:.4f} | "
            f"{row.steps} | {tokens:,.0f} | {flops / 1e12:,.3g} | {mfu} | {flops / roof:.3f} | "
            f"{row.memory / 2**20:,.1f} | {ratio} | {row.note} |")


def per_token_ratio(row: Row, swa: Row) -> float:
    """Seconds per token against SWA's: the step-time ratio at equal batches, and still comparable when
    an out-of-memory retry left the two at different batches."""
    return (row.seconds / row.batch) / (swa.seconds / swa.batch)


def targets(rows: list[tuple[Row, Row | None]], args: argparse.Namespace, card: float | None,
            roof: float) -> list[str]:
    """The issue's two targets, judged on the rows that ran: MFU of the 760M MAC (against the card's peak,
    or the roof when the card is unknown) and every MAC step against its SWA step."""
    lines = []
    for row, swa in rows:
        if row.variant != "mac" or row.seconds is None:
            continue
        if row.size == "760m":
            flops = training_flops_per_token(row.cfg, args.seq) * row.batch * args.seq / row.seconds
            mfu, against = (flops / card, "card peak") if card else (flops / roof, "matmul roof")
            verdict = "met" if mfu >= TARGET_MFU else "NOT met"
            lines.append(f"target: 760m MAC MFU {mfu:.3f} against the {against} (>= {TARGET_MFU:.2f}): "
                         f"{verdict}")
        if swa is not None and swa.seconds:
            ratio = per_token_ratio(row, swa)
            verdict = "met" if ratio <= TARGET_SWA_RATIO else "NOT met"
            lines.append(f"target: {row.size} MAC step / SWA step (per token) {ratio:.2f} "
                         f"(<= {TARGET_SWA_RATIO:.2f}): {verdict}")
    return lines


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every model, e.g. "
                                                     "model.mac_memory_tokens=0")
    parser.add_argument("--sizes", type=lambda s: s.split(","), default=list(SIZES),
                        help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                        help=f"comma-separated memory variants, of {', '.join(VARIANTS)} (SWA always runs)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when available; the full configs need it")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny config and sequence: the whole path in seconds, on CPU (a smoke test)")
    parser.add_argument("--seq", type=int, default=None, help=f"tokens per sequence (default 4096; --tiny "
                                                              f"{TINY_SEQ})")
    parser.add_argument("--batch", type=int, default=None,
                        help="sequences per step (default: the config's data.batch_size, halved on out of "
                             "memory; --tiny: 1)")
    parser.add_argument("--kernel", choices=CHUNK_STEPS, default=None,
                        help="memory chunk step (default: triton on CUDA when importable, else torch)")
    parser.add_argument("--fallback-kernel", choices=CHUNK_STEPS, default="torch",
                        help="kernel to time a row with when the triton kernel fails on it")
    parser.add_argument("--no-flash", action="store_true",
                        help="no flash-attn: attention on FlexAttention (or the torch path with --no-flex)")
    parser.add_argument("--no-flex", action="store_true",
                        help="no FlexAttention where flash-attn is missing: the torch path")
    parser.add_argument("--activation-checkpointing", choices=["config", "on", "off"], default="config",
                        help="per-block activation checkpointing (config: train.activation_checkpointing)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row, at most (median)")
    parser.add_argument("--row-budget-s", type=float, default=20.0,
                        help="seconds of timed steps per row: fewer repeats when a step is slow")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak, TFLOP/s (default: from the device name)")
    parser.add_argument("--check", action="store_true", help="run the correctness checks before timing")
    parser.add_argument("--check-only", nargs="?", const="all", choices=["all", *CHECK_GROUPS], default=None,
                        help="run the correctness checks (all, or one group), no timing")
    parser.add_argument("--chunk-step", action="store_true",
                        help="time the chunk step alone (torch, analytic; on CUDA also compiled and "
                             "Triton, with exact and TF32 float32 matmuls) at each size's memory shape and "
                             "batch, no model steps")
    parser.add_argument("--scan-launches", action="store_true",
                        help="time the Triton scan (one launch per direction) at each size's memory shape "
                             "with each hidden tile and warps in SCAN_LAUNCHES, TF32 and IEEE dots, no "
                             "model steps")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after each row's timing, one more step under torch.profiler: its top N ops")
    args = parser.parse_args(argv)
    for name, values, allowed in (("--sizes", args.sizes, SIZES), ("--variants", args.variants, VARIANTS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"{name}: unknown {', '.join(bad)}; expected some of {', '.join(allowed)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (--device cpu --tiny: the smoke test)")
    if args.device == "cpu" and not args.tiny and not args.check_only:
        parser.error("the paper-scale configs at 4K tokens need a GPU; on CPU run --tiny (the smoke test)")
    args.seq = args.seq or (TINY_SEQ if args.tiny else 4096)
    if (args.batch is not None and args.batch < 1) or args.repeats < 1 or args.seq < 1:
        parser.error("--batch, --repeats and --seq must be >= 1")
    if args.batch is None and args.tiny:
        args.batch = 1
    return args


def choose_kernel(args: argparse.Namespace, device: torch.device, fp32_matmul: str) -> str | None:
    """The memory kernel to time with (None: it cannot run, and the error was printed). The default is
    the faster one measured on an H100 (bench/RESULTS.md): Triton with TF32 float32 matmuls, torch with
    exact ones (the Triton kernel's exact dots run on the FMA units, slower than the torch step). It falls
    back to torch with a note; a kernel asked for explicitly that cannot run is an error instead."""
    missing = triton_status()
    if args.kernel is None:
        if device.type == "cuda" and missing is None and fp32_matmul == "tf32":
            return "triton"
        if device.type == "cuda" and missing is None:
            print("# note: exact float32 matmuls (train.fp32_matmul=ieee): timing with the torch memory "
                  "kernel, faster than triton's there (--kernel triton to time it anyway)", flush=True)
        elif device.type == "cuda":
            print(f"# note: {missing}: timing with the torch memory kernel instead of triton", flush=True)
        return "torch"
    if args.kernel == "triton":
        if missing:
            print(f"error: --kernel triton: {missing}", file=sys.stderr)
            return None
        if device.type != "cuda" and not triton_interpreted():
            print("error: --kernel triton needs a CUDA device (or TRITON_INTERPRET=1, which times Triton's "
                  "interpreter, not the kernel)", file=sys.stderr)
            return None
        if device.type == "cuda" and triton_interpreted():
            print("error: TRITON_INTERPRET=1 would time Triton's interpreter on the GPU: unset it",
                  file=sys.stderr)
            return None
    return args.kernel


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0, 1 when a check failed or a row did not run, 2 on a usage or config error."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.no_flash:
        attention.flash_attn_func = None
    if args.no_flex:
        attention.flex_attention_func = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    flash_version = package_version("flash-attn")
    print(f"# command: python {shlex.join(sys.argv if argv is None else ['bench/gpu_step.py', *argv])}  "
          f"(commit {git_revision()})")
    extra = ""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        extra = (f", capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
                 f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    print(f"# device: {name} ({device.type}{extra}); torch {torch.__version__}, triton "
          f"{package_version('triton')}, flash-attn {flash_version}; python {platform.python_version()}")
    if device.type == "cuda" and attention.flash_attn_func is None:
        why = "--no-flash" if args.no_flash else f"flash-attn is not importable ({flash_version})"
        fallback = ("FlexAttention (compiled)" if attention.flex_attention_func is not None
                    else "the torch path (SDPA per query block)")
        print(f"# note: {why}: attention runs on {fallback}, not flash-attn", flush=True)

    status = 0
    if args.check or args.check_only:
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # the checks compare float32 paths to rounding
        begin = time.perf_counter()
        groups = CHECK_GROUPS if args.check_only in (None, "all") else (args.check_only,)
        for check in run_checks(device, small=args.tiny, groups=groups):
            print(f"{check.line()}  [{time.perf_counter() - begin:.0f} s]", flush=True)
            status = 1 if check.passed is False else status
        if args.check_only:
            return status

    try:
        overrides = [*(TINY_OVERRIDES if args.tiny else ()), *args.overrides]
        configs = {(size, variant): load_variant(size, variant, overrides)
                   for size in args.sizes for variant in args.variants}
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.chunk_step:
        for size in args.sizes:
            run = configs[size, args.variants[0]]
            rows = (args.batch or run.data.batch_size) * run.model.memory_heads
            table = chunk_step_table(run.model, rows, device, args.repeats, args.seq)
            print(f"\n# {size} {args.variants[0]}", *table, sep="\n", flush=True)
        return status
    if args.scan_launches:
        for size in args.sizes:
            run = configs[size, args.variants[0]]
            rows = (args.batch or run.data.batch_size) * run.model.memory_heads
            print(f"\n# {size} {args.variants[0]}", flush=True)
            for line in scan_launch_table(run.model, rows, device, args.repeats, args.seq):
                print(line, flush=True)  # as they come: the IEEE rows compile for minutes
        return status
    run_cfg = next(iter(configs.values()))
    kernel = choose_kernel(args, device, run_cfg.train.fp32_matmul)
    if kernel is None:
        return 2
    args.kernel = kernel
    # as the training job sets it (override train.fp32_matmul=tf32 for tensor-core float32 matmuls)
    torch.backends.cuda.matmul.fp32_precision = run_cfg.train.fp32_matmul
    args.checkpointing = (run_cfg.train.activation_checkpointing if args.activation_checkpointing == "config"
                          else args.activation_checkpointing == "on")
    args.compile_backend = run_cfg.train.compile_backend if run_cfg.train.compile else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    roof_size = 8192 if device.type == "cuda" else 256
    roof, _ = matmul_roof(device, dtype, roof_size)
    card, card_source = card_peak_flops(name, args.peak_tflops) if device.type == "cuda" else (
        None, "no card peak on CPU")
    flash = "torch path"
    if device.type == "cuda" and attention.flash_attn_func is not None:
        flash = "flash-attn"
    elif device.type == "cuda" and attention.flex_attention_func is not None:
        flash = "FlexAttention"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    batch = args.batch or "data.batch_size of the config (halved until it fits)"
    blocks = f"compiled ({args.compile_backend}, train.compile)" if args.compile_backend else "eager"
    print(f"# settings: seq {args.seq}, batch {batch}, {precision}, attention {flash}, memory kernel "
          f"{kernel} (fallback {args.fallback_kernel}), activation "
          f"checkpointing {'on' if args.checkpointing else 'off'}, blocks {blocks}, up to {args.repeats} "
          f"timed steps per row (median) within {args.row_budget_s:g} s, no optimizer step, float32 matmuls "
          f"{run_cfg.train.fp32_matmul} (train.fp32_matmul)")
    card_text = f"{card / 1e12:,.0f} TFLOP/s dense bf16 ({card_source})" if card else card_source
    print(f"# card peak: {card_text}; roof: {roof_size}^3 "
          f"{str(dtype).split('.')[-1]} matmul in this process, {roof / 1e12:,.2f} TFLOP/s")
    for (size, variant), run in configs.items():
        print(f"# {size} {variant}: configs/paper/{variant}-{size}.yaml{' ' if overrides else ''}"
              f"{' '.join(overrides)}: {describe(run.model)}")
    print(f"\n{table_header(device)}", flush=True)

    results: list[tuple[Row, Row | None]] = []
    for size in args.sizes:
        baselines: dict[str, Row] = {}  # SWA rows by config, so variants of equal widths share one
        for variant in args.variants:
            model_cfg = dataclasses.replace(configs[size, variant].model, memory_kernel=args.kernel)
            swa_cfg = swa_config(model_cfg)
            key = repr(swa_cfg)
            if key not in baselines:
                sharing = [v for v in args.variants if repr(swa_config(configs[size, v].model)) == key]
                swa = Row(size, "swa", swa_cfg, args.batch or configs[size, variant].data.batch_size,
                          note=f"baseline of {', '.join(sharing)}; window {swa_cfg.window}")
                run_row(swa, device, args)
                baselines[key] = swa
                print(table_row(swa, None, args, card, roof), flush=True)
            swa = baselines[key]
            row = Row(size, variant, model_cfg, args.batch or configs[size, variant].data.batch_size)
            run_row(row, device, args)
            results.append((row, swa))
            print(table_row(row, swa, args, card, roof), flush=True)
            status = 1 if row.seconds is None or swa.seconds is None else status
    print()
    for line in targets(results, args, card, roof):
        print(f"# {line}{' (CPU smoke run: not the targets setting)' if device.type != 'cuda' else ''}")
    return status


if __name__ == "__main__":
    sys.exit(main())
