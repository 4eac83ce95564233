"""NeuralMemory: Titans' long-term memory, a small MLP trained at test time (docs/DESIGN.md §2, paper §3).

Per head, the memory is an MLP `M` whose weights are *state*. Every token writes to it by one step of
gradient descent with momentum ("surprise") and weight decay ("forgetting") on the associative loss
`‖M(k_t) − v_t‖²`; every token reads it with `M(q_t)`.

Chunk-causal semantics: the sequence is split into chunks of `b` tokens; inside chunk c every gradient
is taken at the chunk-start weights `M_{c-1}` and the queries of chunk c read `M_{c-1}` (b = 1 is the
token-level recurrence). The b token steps of a chunk then collapse into gradients of two *weighted*
chunk losses (coefficients `c_i`, `d_i` below), so per-token gradients are never materialised: per
memory layer the update is one matmul `X_inᵀ · diag(w) · G_out` over the chunk.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# LayerNorm epsilon of the memory's residual-norm output. Not the usual 1e-5: the forget gate pulls the
# memory's weights toward 0, where the MLP's output is tiny and the LayerNorm's slope is 1/sqrt(eps); at
# 1e-5 that slope makes each chunk's update amplify the state's gradient, which then grows exponentially
# backwards through the chunks (NaN beyond ~1,000 chunks). At 1e-3, with surprise clipping, it stays
# bounded (docs/DESIGN.md §2.6).
NORM_EPS = 1e-3


@dataclass(frozen=True)
class ScanOptions:
    """The static settings of the chunk scan."""

    n_layers: int
    residual_norm: bool = True
    max_grad_norm: float | None = None  # clip each token's gradient ‖∇ℓ_i‖ to this (None: no clipping)
    grad_horizon: int | None = None  # chunks: the state's gradient is cut at every multiple (None: never)
    kernel: str = "torch"  # which chunk step runs: one of CHUNK_STEPS

    def cuts_before(self, chunk: int) -> bool:
        """Whether the weights' and momentum's gradient stops at the start of global chunk `chunk`."""
        return self.grad_horizon is not None and chunk > 0 and chunk % self.grad_horizon == 0


@dataclass
class MemoryState:
    """What a sequence leaves behind: the memory weights, their momentum, and the conv history.

    weights / momentum: one tensor per memory layer, shape (B, H, d_in, d_out), float32 (or float64).
    conv: the last `kernel - 1` raw q/k/v projections, (B, kernel - 1, 3·H·d), so a causal conv can
    continue exactly where the previous call stopped.
    chunks: how many chunks the sequence has written so far, i.e. the global index of the next chunk;
    the gradient horizon's cuts fall on its multiples wherever the sequence was split into calls.
    read_only: the rows fed next lie in the chunk this state begins, and only their reads are wanted (a
    stream's open chunk, titans/streaming.py): chunk-causal reads use the chunk's start weights, so the
    memory reads them from `weights` and moves only `conv` on, writing nothing.
    """

    weights: list[Tensor]
    momentum: list[Tensor]
    conv: Tensor | None
    chunks: int = 0
    read_only: bool = False

    def detach(self) -> MemoryState:
        """Cut the autograd graph (truncated backprop across calls)."""
        return self.map(Tensor.detach)

    def map(self, fn: Callable[[Tensor], Tensor]) -> MemoryState:
        """The same state with `fn` applied to each of its tensors."""
        return replace(self, weights=[fn(w) for w in self.weights], momentum=[fn(s) for s in self.momentum],
                       conv=None if self.conv is None else fn(self.conv))

    def tensors(self) -> list[Tensor]:
        """Weights, momentum and conv history (if any), in that order."""
        return [*self.weights, *self.momentum, *([] if self.conv is None else [self.conv])]


# --------------------------------------------------------------------------------------------
# The memory MLP and its explicit, weighted backward pass.
# --------------------------------------------------------------------------------------------


def silu_derivative(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def memory_mlp(weights: list[Tensor], x: Tensor, residual_norm: bool = True) -> Tensor:
    """Apply the memory: an MLP (SiLU between layers, no biases), and with `residual_norm` the output
    `x + LayerNorm(MLP(x))` (LayerNorm without parameters). weights[l]: (N, d_in, d_out); x: (N, b, d).

    Why the residual norm: a plain deep MLP trained by test-time gradient steps has curvature growing
    with its own weights, so once they grow the inner loop diverges (seen on real text within 30 outer
    steps); normalising the output makes the loss's gradient shrink as the weights grow.
    """
    h = x
    for layer, w in enumerate(weights):
        h = h @ w
        if layer < len(weights) - 1:
            h = F.silu(h)
    return x + F.layer_norm(h, h.shape[-1:], eps=NORM_EPS) if residual_norm else h


def mlp_activations(weights: list[Tensor], x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer its input X_l and pre-activation z_l = X_l W_l (the last z is the MLP's output h)."""
    inputs, pre = [x], []
    for layer, w in enumerate(weights):
        pre.append(inputs[-1] @ w)
        if layer < len(weights) - 1:
            inputs.append(F.silu(pre[-1]))
    return inputs, pre


class TokenActivations(NamedTuple):
    """What `token_backward` computes on the way, per layer: an explicit backward of the chunk step needs
    it all, and taking it once matters because inductor does not merge repeated matmuls."""

    inputs: list[Tensor]  # x_l, the layer inputs (x_0 = k)
    pre: list[Tensor]  # z_l = x_l W_l (the last is the MLP's output h)
    grad_outs: list[Tensor]  # g_l, the per-token loss gradients of z_l
    grad_hidden: list[Tensor]  # g_{l+1} W_{l+1}ᵀ, those of the hidden activations x_{l+1} (l < L − 1)


def token_activations(
    weights: list[Tensor], k: Tensor, v: Tensor, residual_norm: bool = True
) -> TokenActivations:
    """`token_backward` with its intermediates (`TokenActivations`)."""
    inputs, pre_acts = mlp_activations(weights, k)
    h = pre_acts[-1]
    if residual_norm:
        sigma = torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + NORM_EPS)
        normed = (h - h.mean(-1, keepdim=True)) / sigma
        g = 2 * (k + normed - v)  # dℓ_i/dM(k_i), unweighted
        # backward of the parameter-free LayerNorm
        grad_out = (g - g.mean(-1, keepdim=True) - normed * (g * normed).mean(-1, keepdim=True)) / sigma
    else:
        grad_out = 2 * (h - v)  # (N, b, d)
    grad_outs, grad_hidden = [grad_out], []  # last layer first
    for layer in reversed(range(1, len(weights))):
        grad_hidden.append(grad_out @ weights[layer].transpose(-1, -2))
        grad_out = grad_hidden[-1] * silu_derivative(pre_acts[layer - 1])
        grad_outs.append(grad_out)
    return TokenActivations(inputs, pre_acts, grad_outs[::-1], grad_hidden[::-1])


def token_backward(
    weights: list[Tensor], k: Tensor, v: Tensor, residual_norm: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer, the inputs x_i and output gradients g_i of `ℓ_i = ‖M(k_i) − v_i‖²`: token i's gradient
    for that layer is the outer product x_iᵀ g_i, never formed here. Shapes (N, b, ·)."""
    acts = token_activations(weights, k, v, residual_norm)
    return acts.inputs, acts.grad_outs


def token_grad_norms(inputs: list[Tensor], grad_outs: list[Tensor]) -> Tensor:
    """‖∇ℓ_i‖ over all layers, (N, b): the Frobenius norm of an outer product is ‖x_i‖·‖g_i‖."""
    sq_norm = sum(x.square().sum(-1) * g.square().sum(-1) for x, g in zip(inputs, grad_outs))
    return torch.sqrt(sq_norm.clamp_min(1e-30))  # clamped: a finite gradient at zero-norm tokens


def weighted_loss_grads(
    weights: list[Tensor], k: Tensor, v: Tensor, token_weights: Tensor, residual_norm: bool = True,
    max_grad_norm: float | None = None,
) -> list[Tensor]:
    """Gradients of `Σ_i w_ri ‖M(k_i) − v_i‖²` for R weightings at once, by an explicit backward pass.

    token_weights: (N, R, b). Returns per layer (N, R, d_in, d_out). Written with plain tensor ops so
    autograd can differentiate through it (the outer model learns through the memory's updates).

    With `max_grad_norm`, token i's gradient is scaled by min(1, max / ‖∇ℓ_i‖) ("surprise clipping"),
    at no extra cost (`token_grad_norms`), so it bounds every token's step without materialising a
    per-token gradient.
    """
    inputs, grad_outs = token_backward(weights, k, v, residual_norm)
    if max_grad_norm is not None:
        scale = (max_grad_norm / token_grad_norms(inputs, grad_outs)).clamp(max=1.0)  # (N, b)
        token_weights = token_weights * scale.unsqueeze(1)
    grads = []
    for x_in, g in zip(inputs, grad_outs):
        weighted_in = x_in.unsqueeze(1) * token_weights.unsqueeze(-1)  # (N, R, b, d_in)
        grads.append(weighted_in.transpose(-1, -2) @ g.unsqueeze(1))
    return grads


def chunk_coefficients(theta: Tensor, log_eta: Tensor, log_keep: Tensor, valid: Tensor | None = None
                       ) -> tuple[Tensor, ...]:
    """Collapse b token steps of surprise/forgetting into per-chunk coefficients (docs/DESIGN.md §2).

    All inputs (..., b): θ_i, log η_i, log(1 − α_i). With β_i = Π_{j≤i}(1 − α_j) and gradients u_i taken
    at the chunk-start weights:
        S_end = (Π η) S_0 − Σ d_i u_i,                 d_i = θ_i Π_{j>i} η_j
        M_end = β_b M_0 + γ S_0 − Σ c_i u_i,           c_i = θ_i Σ_{m≥i} (β_b/β_m) Π_{i<j≤m} η_j
        γ = Σ_m (β_b/β_m) Π_{j≤m} η_j
    Everything is an exponential of a non-positive log sum, so no ratio of tiny numbers is ever formed.
    `valid` (..., b) marks real tokens (None: all are): padding (θ = 0, η = 1, α = 0) leaves S unchanged
    but would still add S to M at every padded step, so padded steps m are left out of the sums over m.
    Returns d, c (..., b) and eta_prod, beta, gamma (...,).
    """
    cum_eta = log_eta.cumsum(-1)
    cum_keep = log_keep.cumsum(-1)
    eta_end, keep_end = cum_eta[..., -1:], cum_keep[..., -1:]
    d = theta * torch.exp(eta_end - cum_eta)
    # per m: log(β_b/β_m) + log Π_{j≤m} η_j, the terms of γ; exponent[i, m] = that - log Π_{j≤i} η_j
    # = log(β_b/β_m) + log Π_{i<j≤m} η_j, for m ≥ i
    per_m = keep_end - cum_keep + cum_eta
    exponent = per_m.unsqueeze(-2) - cum_eta.unsqueeze(-1)
    b = theta.shape[-1]
    hidden = torch.ones(b, b, dtype=torch.bool, device=theta.device).tril(-1)  # m < i
    if valid is not None:
        hidden = hidden | ~valid.unsqueeze(-2)
        per_m = per_m.masked_fill(~valid, float("-inf"))
    c = theta * torch.exp(exponent.masked_fill(hidden, float("-inf"))).sum(-1)
    gamma = torch.exp(per_m).sum(-1)
    return d, c, torch.exp(eta_end[..., 0]), torch.exp(keep_end[..., 0]), gamma


def memory_chunk_step(
    opts: ScanOptions, q: Tensor, k: Tensor, v: Tensor, d: Tensor, c: Tensor,
    eta_prod: Tensor, beta: Tensor, gamma: Tensor, *state: Tensor,
) -> tuple[Tensor, ...]:
    """One chunk: read with the chunk-start weights, then apply the chunk's collapsed update.

    q, k, v: (N, b, d); d, c: (N, b); eta_prod, beta, gamma: (N,); state: L weights then
    L momenta, each (N, d_in, d_out). Returns (y, *new_weights, *new_momenta).
    """
    weights, momentum = list(state[: opts.n_layers]), list(state[opts.n_layers :])
    y = memory_mlp(weights, q, opts.residual_norm)
    grads = weighted_loss_grads(weights, k, v, torch.stack([d, c], dim=1), opts.residual_norm,
                                opts.max_grad_norm)
    eta_prod, beta, gamma = (t[:, None, None] for t in (eta_prod, beta, gamma))
    new_momentum = [eta_prod * s - g[:, 0] for s, g in zip(momentum, grads, strict=True)]
    new_weights = [beta * w + gamma * s - g[:, 1] for w, s, g in zip(weights, momentum, grads, strict=True)]
    return (y, *new_weights, *new_momentum)


# The kernels' modules and functions by name, imported on first use: they import this module, triton is
# optional, and a copy of this file without them (the Hugging Face export) must stay importable.
KERNEL_FUNCTIONS = {"analytic": ("titans.kernels.chunk_step_reference", "analytic_chunk_step"),
                    "compiled": ("titans.kernels.chunk_step_compiled", "compiled_chunk_step"),
                    "triton": ("titans.kernels.chunk_step_triton", "triton_chunk_step")}
CHUNK_STEPS = ("torch", *KERNEL_FUNCTIONS)
# The kernels with an explicit backward, by name: that backward alone, with `chunk_step_backward`'s
# signature (titans/kernels/chunk_step_reference.py). The recomputing scan's backward calls it directly,
# so it runs no forward per chunk to rebuild autograd's graph.
KERNEL_BACKWARDS = {"analytic": ("titans.kernels.chunk_step_reference", "chunk_step_backward"),
                    "compiled": ("titans.kernels.chunk_step_compiled", "compiled_chunk_step_backward"),
                    "triton": ("titans.kernels.chunk_step_triton", "triton_chunk_step_backward")}


# The kernels that also run a whole scan in one call, by name: (forward, backward) with `triton_scan`'s and
# `triton_scan_backward`'s signatures (titans/kernels/chunk_step_triton.py). On a GPU a launch per chunk
# costs host time per chunk and leaves the device idle between them; one launch walks every chunk.
KERNEL_SCANS = {"triton": ("titans.kernels.chunk_step_triton", "triton_scan", "triton_scan_backward")}


def chunk_step(kernel: str) -> Callable[..., tuple[Tensor, ...]]:
    """The chunk step by name, all with `memory_chunk_step`'s signature and outputs: "torch" (autograd
    through it), "analytic" (its explicit backward, titans/kernels/chunk_step_reference.py), "compiled"
    (it through torch.compile, titans/kernels/chunk_step_compiled.py) or "triton" (fused forward and
    backward kernels for GPUs, titans/kernels/chunk_step_triton.py)."""
    if kernel == "torch":
        return memory_chunk_step
    if kernel not in KERNEL_FUNCTIONS:
        raise ValueError(f"unknown memory kernel {kernel!r}; expected one of {', '.join(CHUNK_STEPS)}")
    return _import(*KERNEL_FUNCTIONS[kernel])


def chunk_step_backward_of(kernel: str) -> Callable[..., Sequence[Tensor]] | None:
    """The explicit backward of the chunk step `kernel`, or None where autograd's graph is its backward."""
    return _import(*KERNEL_BACKWARDS[kernel]) if kernel in KERNEL_BACKWARDS else None


def scan_kernel_of(kernel: str) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """The whole-scan forward and backward of the chunk step `kernel`, or None where it runs per chunk."""
    if kernel not in KERNEL_SCANS:
        return None
    module, forward, backward = KERNEL_SCANS[kernel]
    return _import(module, forward), _import(module, backward)


def _import(module: str, function: str) -> Callable:
    return getattr(importlib.import_module(module), function)


def compiling() -> bool:
    """Whether torch.compile is tracing this call (our own name for it, so a test can take the compiled
    branches eagerly without patching torch)."""
    return torch.compiler.is_compiling()


def has_scan_op() -> bool:
    """Registers the scan's custom ops for torch.compile (titans/scan_op.py); False where that module is
    absent (a copy of this file in the Hugging Face export), and compiling then breaks the graph there."""
    try:
        importlib.import_module("titans.scan_op")
    except ImportError:
        return False
    return True


def scan_chunks(
    opts: ScanOptions, inputs: tuple[Tensor, ...], state: list[Tensor], first_chunk: int = 0
) -> tuple[Tensor, ...]:
    """Run the chunks in order with plain autograd. inputs, chunk-major: q, k, v (n, N, b, d), then d, c
    (n, N, b) and eta_prod, beta, gamma (n, N); `first_chunk`: the global index of the first chunk (where
    the gradient horizon's cuts fall). Returns (y (n, N, b, d), *end_state)."""
    # unbind, not indexing: the backward of x[i] writes into a zero tensor of x's full size per chunk
    # (quadratic in length); unbind's backward stacks the chunk gradients once.
    outputs, step = [], chunk_step(opts.kernel)
    for i, chunk in enumerate(zip(*(t.unbind(0) for t in inputs), strict=True)):
        if opts.cuts_before(first_chunk + i):
            state = [s.detach() for s in state]
        y, *state = step(opts, *chunk, *state)
        outputs.append(y)
    return (torch.stack(outputs), *state)


def recomputed_scan(opts: ScanOptions, inputs: Sequence[Tensor], state: Sequence[Tensor]
                    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The chunks in order without a graph. Returns y (n, N, b, d), the end state and the boundary states
    (the state at each chunk's start, chunk by chunk: n · len(state) tensors), which are all that
    `recomputed_scan_backward` needs."""
    boundaries, outputs, step = [], [], chunk_step(opts.kernel)
    state = list(state)
    for chunk in zip(*(t.unbind(0) for t in inputs), strict=True):
        boundaries += state
        y, *state = step(opts, *chunk, *state)
        outputs.append(y)
    return torch.stack(outputs), state, boundaries


def recomputed_scan_backward(
    opts: ScanOptions, first_chunk: int, inputs: Sequence[Tensor], boundaries: Sequence[Tensor],
    grad_y: Tensor, grad_state: Sequence[Tensor], needed: Sequence[bool],
) -> tuple[list[Tensor | None], list[Tensor]]:
    """The backward of `recomputed_scan`, last chunk first, with the gradient horizon's cuts of a scan
    starting at global chunk `first_chunk`. Each chunk is recomputed from its start state with autograd (a
    kernel with an explicit backward gets that called directly instead). Returns the gradients of the 8
    inputs (None where not `needed`) and of the start state."""
    n = len(grad_state)
    chunk_grads: list[list[Tensor]] = [[] for _ in inputs]  # last chunk first
    grad_state, step = list(grad_state), chunk_step(opts.kernel)
    explicit_backward = chunk_step_backward_of(opts.kernel)
    for i in reversed(range(inputs[0].shape[0])):
        chunk, start = [t[i] for t in inputs], boundaries[i * n : (i + 1) * n]
        if explicit_backward is not None:
            every = explicit_backward(opts, *chunk, start, grad_y[i], grad_state)
            grads = iter([g for g, need in zip(every[:8], needed, strict=True) if need] + list(every[8:]))
        else:
            with torch.enable_grad():
                chunk = [t.detach().requires_grad_(need) for t, need in zip(chunk, needed, strict=True)]
                start = [s.detach().requires_grad_() for s in start]
                y, *end = step(opts, *chunk, *start)
                wanted = [t for t in (*chunk, *start) if t.requires_grad]
                grads = iter(torch.autograd.grad([y, *end], wanted, [grad_y[i], *grad_state]))
        for need, collected in zip(needed, chunk_grads, strict=True):
            if need:
                collected.append(next(grads))
        grad_state = list(grads)
        if opts.cuts_before(first_chunk + i):
            grad_state = [torch.zeros_like(g) for g in grad_state]
    # one stack per input at the end, not a write into a zero tensor per chunk
    grads_in = [torch.stack(g[::-1]) if need else None for g, need in zip(chunk_grads, needed, strict=True)]
    return grads_in, grad_state


class RecomputedScan(torch.autograd.Function):
    """The chunk scan with a backward that keeps only the chunk-boundary states.

    Forward runs without building a graph and saves the inputs and the state at each chunk start
    (the memory's size per chunk, nothing per token). Backward walks the chunks in reverse: it
    recomputes one chunk from its saved start state with autograd and pulls the output and end-state
    gradients through it (a kernel with an explicit backward gets that called directly instead), so
    activation memory is one chunk's worth plus the boundary states. At the gradient horizon's cuts the
    state's gradient is dropped, as `scan_chunks`' detach drops it.
    """

    @staticmethod
    def forward(ctx, opts: ScanOptions, first_chunk: int, *tensors: Tensor  # type: ignore[override]
                ) -> tuple[Tensor, ...]:
        inputs = tensors[:8]
        y, end, boundaries = recomputed_scan(opts, inputs, tensors[8:])
        ctx.opts, ctx.first_chunk = opts, first_chunk
        ctx.save_for_backward(*inputs, *boundaries)
        return (y, *end)

    @staticmethod
    def backward(ctx, grad_y: Tensor, *grad_state: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        grads_in, grad_start = recomputed_scan_backward(ctx.opts, ctx.first_chunk, saved[:8], saved[8:],
                                                        grad_y, grad_state, ctx.needs_input_grad[2:10])
        return (None, None, *grads_in, *grad_start)


class KernelScan(torch.autograd.Function):
    """The chunk scan run by a whole-scan kernel (`scan_kernel_of`): every chunk in one call each way. The
    forward keeps the chunk-boundary states and the backward recomputes from them, as `RecomputedScan`
    does chunk by chunk; the gradient horizon's cuts are the kernel's to apply."""

    @staticmethod
    def forward(ctx, opts: ScanOptions, first_chunk: int, *tensors: Tensor  # type: ignore[override]
                ) -> tuple[Tensor, ...]:
        inputs = tensors[:8]
        y, boundaries = scan_kernel_of(opts.kernel)[0](opts, inputs, tensors[8:])  # each (n + 1, N, ·)
        ctx.opts, ctx.first_chunk = opts, first_chunk
        ctx.save_for_backward(*inputs, *boundaries)
        return (y, *(b[-1].clone() for b in boundaries))  # a copy: outputs must not alias what is saved

    @staticmethod
    def backward(ctx, grad_y: Tensor, *grad_state: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        inputs, boundaries = saved[:8], saved[8:]
        grads, grad_start = scan_kernel_of(ctx.opts.kernel)[1](ctx.opts, ctx.first_chunk, inputs, boundaries,
                                                               grad_y, grad_state)
        needed = ctx.needs_input_grad[2:10]
        return (None, None, *(g if need else None for g, need in zip(grads, needed, strict=True)),
                *grad_start)


def init_memory_parameter(
    name: str, param: Tensor, std: float, generator: torch.Generator | None = None
) -> None:
    """The initial value of a NeuralMemory parameter, by its name inside the module.

    Gate biases are laid out [θ (H) ‖ η (H) ‖ α (H)]: a small inner lr (θ ≈ 0.12·θ_max: momentum
    multiplies the step by up to 1/(1−η)), strong momentum (η ≈ 0.9) and slow forgetting (α ≈ 1e-3, a
    half-life of ~700 tokens; α ≈ 0.02 would erase the memory within a few hundred tokens before
    training starts).
    """
    if param.is_meta:
        return
    if name.startswith("init_weights."):  # M_0 (H, d_in, d_out): unit-scale outputs
        param.normal_(0.0, 1.0 / math.sqrt(param.shape[-2]), generator=generator)
    elif name == "conv.weight":  # depthwise: fan-in = kernel (PyTorch's Conv1d default bound)
        bound = 1.0 / math.sqrt(param.shape[-1])
        param.uniform_(-bound, bound, generator=generator)
    elif name == "to_gates.bias":
        theta, eta, alpha = param.chunk(3)
        theta.fill_(-2.0)
        eta.fill_(2.2)
        alpha.fill_(-7.0)
    elif param.dim() == 1:  # norm gains
        param.fill_(1.0)
    else:  # projections
        param.normal_(0.0, std, generator=generator)


# --------------------------------------------------------------------------------------------
# The module.
# --------------------------------------------------------------------------------------------


def causal_depthwise_conv(window: Tensor, weight: Tensor) -> Tensor:
    """The depthwise convolution `F.conv1d(window.transpose(1, 2), weight, groups=C).transpose(1, 2)`:
    window (B, T + k - 1, C), weight (C, 1, k) → (B, T, C). On CPU as a sum of shifted products over
    blocks of tokens (`ShiftedProductConv`); on a GPU as the convolution, one kernel each way. Under
    torch.compile on CPU as the plain sum, which inductor fuses into one loop (and cannot trace the
    Function's blocks)."""
    if window.is_cuda:
        return F.conv1d(window.transpose(1, 2), weight, groups=weight.shape[0]).transpose(1, 2)
    if compiling():
        taps, length = weight.squeeze(1).t(), window.shape[1] - weight.shape[-1] + 1
        return sum(window[:, j : j + length] * taps[j] for j in range(taps.shape[0]))
    return ShiftedProductConv.apply(window, weight)


class ShiftedProductConv(torch.autograd.Function):
    """out[:, t] = Σ_j window[:, t + j] · taps[j], written block by block into one output (and backward
    likewise, in place). CPU's grouped conv1d is slow for a few taps; a sum of whole-length shifted
    products is faster at a few thousand tokens but makes temporaries of the whole length, which at tens
    of thousands of tokens no longer stay in cache. Blocks of `BLOCK_ELEMENTS` keep every temporary
    cache-sized at any length."""

    BLOCK_ELEMENTS = 2**18

    @staticmethod
    def block_rows(window: Tensor) -> int:
        return max(1, ShiftedProductConv.BLOCK_ELEMENTS // (window.shape[0] * window.shape[2]))

    @staticmethod
    def forward(ctx, window: Tensor, weight: Tensor) -> Tensor:
        taps = weight.squeeze(1).t()  # (k, C)
        k = taps.shape[0]
        length = window.shape[1] - k + 1
        out = window.new_empty(window.shape[0], length, window.shape[2],
                               dtype=torch.result_type(window, weight))
        rows = ShiftedProductConv.block_rows(window)
        for start in range(0, length, rows):
            end = min(start + rows, length)
            block = out[:, start:end]
            torch.mul(window[:, start:end], taps[0], out=block)
            for j in range(1, k):
                block.addcmul_(window[:, start + j:end + j], taps[j])
        ctx.save_for_backward(window, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        window, weight = ctx.saved_tensors
        taps = weight.squeeze(1).t()
        k = taps.shape[0]
        length = grad_out.shape[1]
        grad_window = torch.zeros_like(window) if ctx.needs_input_grad[0] else None
        grad_taps = torch.zeros_like(taps, dtype=torch.result_type(grad_out, window)) \
            if ctx.needs_input_grad[1] else None
        rows = ShiftedProductConv.block_rows(window)
        for start in range(0, length, rows):
            end = min(start + rows, length)
            g = grad_out[:, start:end]
            for j in range(k):
                if grad_window is not None:
                    grad_window[:, start + j:end + j].addcmul_(g, taps[j])
                if grad_taps is not None:
                    grad_taps[j] += (g * window[:, start + j:end + j]).sum((0, 1))
        grad_weight = None if grad_taps is None else grad_taps.t().unsqueeze(1).to(weight.dtype)
        return grad_window, grad_weight


class NeuralMemory(nn.Module):
    """Multi-head neural long-term memory with the chunked fast path and the state API.

    `forward(x, state=None) -> (y, state)`: x (B, T, dim) writes to and reads from the memory; feeding
    a sequence in two chunk-aligned pieces with the carried state equals feeding it whole.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        depth: int = 2,
        hidden: int | None = None,
        chunk_size: int = 16,
        conv_kernel: int = 4,
        theta_max: float | None = None,
        recompute: bool = False,
        residual_norm: bool = True,
        max_grad_norm: float | None = None,
        grad_horizon: int | None = None,
        kernel: str = "torch",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"memory depth must be >= 1, got {depth}")
        if chunk_size < 1:
            raise ValueError(f"memory chunk_size must be >= 1, got {chunk_size}")
        if conv_kernel < 1:
            raise ValueError(f"memory conv_kernel must be >= 1, got {conv_kernel}")
        chunk_step(kernel)  # an unknown name fails here, not at the first forward
        if grad_horizon is not None and grad_horizon < 1:
            raise ValueError(f"memory grad_horizon must be >= 1 chunk (or None: never cut), "
                             f"got {grad_horizon}")
        self.heads, self.head_dim, self.depth = heads, head_dim, depth
        self.hidden = hidden or 4 * head_dim
        self.chunk_size, self.conv_kernel = chunk_size, conv_kernel
        # A chunk applies the sum of b gradients taken at one point: θ ≤ 1/b keeps that step bounded.
        self.theta_max = theta_max if theta_max is not None else 1.0 / chunk_size
        self.recompute = recompute
        self.residual_norm = residual_norm  # M(x) = x + LayerNorm(MLP(x)); see memory_mlp
        # The state's gradient is cut every grad_horizon chunks (docs/DESIGN.md §2.6): the update is
        # gradient descent on a non-convex loss, so its Jacobian grows some directions at every chunk and
        # the exact gradient through thousands of chunks overflows; the forward pass is unchanged.
        self.scan_options = ScanOptions(depth, residual_norm, max_grad_norm, grad_horizon, kernel)
        self.compilable = has_scan_op()
        # Diagnostics for logging: when record_stats is set, forward leaves the surprise (momentum)
        # norm per sequence and the mean gates θ, η, α of its last call in `stats` (detached).
        self.record_stats = False
        self.stats: dict[str, Tensor] = {}
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        # Depthwise causal conv over the concatenated q/k/v projections (channels [q ‖ k ‖ v]).
        self.conv = nn.Conv1d(3 * inner, 3 * inner, conv_kernel, groups=3 * inner, bias=False)
        # Data-dependent gates per token and head: θ (inner lr), η (momentum decay), α (forgetting),
        # laid out [θ (H) ‖ η (H) ‖ α (H)].
        self.to_gates = nn.Linear(dim, 3 * heads)
        sizes = [head_dim] + [self.hidden] * (depth - 1) + [head_dim]
        self.init_weights = nn.ParameterList([nn.Parameter(torch.empty(heads, a, b))
                                              for a, b in zip(sizes[:-1], sizes[1:])])
        self.out_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for name, param in self.named_parameters():
            init_memory_parameter(name, param, std)

    # -- projections ---------------------------------------------------------------------------

    def project(self, x: Tensor, conv_cache: Tensor | None, cuts: list[int] | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v (B, T, H, d) = SiLU(causal depthwise conv(x W)); q, k ℓ2-normalised. Also the new cache.
        `cuts`: token offsets where the gradient horizon cuts: the conv reads the rows before one detached."""
        B, T, _ = x.shape
        raw = torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], dim=-1)  # (B, T, 3·inner)
        pad = self.conv_kernel - 1
        if conv_cache is None:
            conv_cache = raw.new_zeros(B, pad, raw.shape[-1])
        history = torch.cat([conv_cache.to(raw.dtype), raw], dim=1)
        bounds = [0, *(cuts or []), T]  # output rows [lo, hi) of each piece
        if len(bounds) == 2:
            mixed = causal_depthwise_conv(history, self.conv.weight)
        else:
            # Split, not sliced: a slice's backward zero-fills the whole history, once per piece (quadratic
            # in T). Piece i reads the `pad` rows before it, then its own rows, parts[i + 1].
            parts = history.split([pad] + [hi - lo for lo, hi in zip(bounds, bounds[1:])], dim=1)
            detached = history.detach()
            pieces = []
            for i, lo in enumerate(bounds[:-1]):
                before = parts[0] if i == 0 else detached[:, lo : lo + pad]  # a cut: no gradient before it
                window = torch.cat([before, parts[i + 1]], dim=1)
                pieces.append(causal_depthwise_conv(window, self.conv.weight))
            mixed = torch.cat(pieces, dim=1)
        mixed = F.silu(mixed)
        # heads from the local width (-1): a tensor-parallel shard holds a subset of the heads
        mixed = mixed.reshape(B, T, 3, -1, self.head_dim)  # a view of the CPU layout
        q, k = F.normalize(mixed[:, :, :2], dim=-1).unbind(2)  # q and k in one call: half the ops
        new_cache = history[:, history.shape[1] - pad :].to(self.state_dtype())  # float32 under autocast
        return q, k, mixed[:, :, 2], new_cache

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """θ, log η, log(1 − α), each (B, T, H). Log-sigmoids keep the extremes finite."""
        theta_logit, eta_logit, alpha_logit = self.to_gates(x).chunk(3, dim=-1)
        theta = self.theta_max * torch.sigmoid(theta_logit)
        return theta, F.logsigmoid(eta_logit), F.logsigmoid(-alpha_logit)

    # -- state --------------------------------------------------------------------------------

    def state_dtype(self) -> torch.dtype:
        """The memory recurrence runs in float32 at least (float64 when the module is float64)."""
        return torch.promote_types(self.init_weights[0].dtype, torch.float32)

    def initial_state(self, batch: int) -> MemoryState:
        dtype = self.state_dtype()
        weights = [w.to(dtype).unsqueeze(0).expand(batch, *w.shape) for w in self.init_weights]
        return MemoryState(weights, [torch.zeros_like(w) for w in weights], None)

    def cut_gradient(self, state: MemoryState) -> MemoryState:
        """The state, detached if its next chunk starts a gradient horizon (a reader of the state before
        the scan, MAC's segment read, must see the same cut as the scan)."""
        return state.detach() if self.scan_options.cuts_before(state.chunks) else state

    def cuts_within(self, first_chunk: int, length: int) -> list[int]:
        """Token offsets inside a call of `length` tokens from global chunk `first_chunk` where the
        gradient horizon cuts (the call's start is `cut_gradient`'s)."""
        n_chunks = -(-length // self.chunk_size)
        cuts = self.scan_options.cuts_before
        return [i * self.chunk_size for i in range(1, n_chunks) if cuts(first_chunk + i)]

    def cut_phase(self, first_chunk: int, length: int) -> int:
        """The smallest chunk index from which a call of `length` tokens is cut where one from
        `first_chunk` is (at its start and inside it): all that the call's computation depends on."""
        horizon, cuts = self.scan_options.grad_horizon, self.scan_options.cuts_before
        if horizon is None:
            return 0
        n_chunks = -(-length // self.chunk_size)
        pattern = [cuts(first_chunk + i) for i in range(n_chunks)]
        return next(c for c in range(horizon + 1) if [cuts(c + i) for i in range(n_chunks)] == pattern)

    def read(self, q: Tensor, state: MemoryState) -> Tensor:
        """Retrieve M(q) without writing: q (B, N, H, d) unit-norm queries → (B, N, dim)."""
        return self.output(self.read_heads(q, state))

    def read_heads(self, q: Tensor, state: MemoryState) -> Tensor:
        """The per-head reads (B, N, H, d) of unit-norm queries q (B, N, H, d), before `output`."""
        B, N, H, d = q.shape
        with torch.autocast(q.device.type, enabled=False):
            weights = [w.reshape(B * H, *w.shape[2:]) for w in state.weights]
            q = q.to(weights[0].dtype).transpose(1, 2).reshape(B * H, N, d)
            return memory_mlp(weights, q, self.residual_norm).reshape(B, H, N, d).transpose(1, 2)

    def output(self, y: Tensor) -> Tensor:
        """Per-head RMSNorm of the retrieved values, then the output projection. y: (B, T, H, d)."""
        return self.to_out(self.out_norm(y.to(self.to_out.weight.dtype)).flatten(2))

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor, state: MemoryState | None = None, project_out: bool = True
                ) -> tuple[Tensor, MemoryState]:
        """`project_out=False` returns the per-head reads (B, T, H, d) before `output`: MAC calls the memory
        once per segment and projects every segment's reads at once after its loop."""
        B, T, _ = x.shape
        state = self.cut_gradient(state) if state is not None else self.initial_state(B)
        if state.read_only:  # the rest of an open chunk: its reads, from its start weights; nothing written
            if self.chunk_size < T:
                raise ValueError(f"a read-only memory state reads rows of one chunk ({self.chunk_size}), "
                                 f"got {T}")
            q, _, _, conv_cache = self.project(x, state.conv)
            y = self.read_heads(q, state)
            return (self.output(y) if project_out else y), replace(state, conv=conv_cache)
        q, k, v, conv_cache = self.project(x, state.conv, self.cuts_within(state.chunks, T))
        theta, log_eta, log_keep = self.gates(x)
        with torch.autocast(x.device.type, enabled=False):
            y, weights, momentum = self.scan(q, k, v, theta, log_eta, log_keep, state)
        if self.record_stats:
            with torch.no_grad():
                self.stats = {
                    "surprise_norm": torch.stack([s.float().norm() for s in momentum]).norm() / B,
                    "theta": theta.float().mean(),
                    "eta": log_eta.float().exp().mean(),
                    "alpha": -torch.expm1(log_keep.float()).mean(),
                }
        n_chunks = -(-T // self.chunk_size)
        state = MemoryState(weights, momentum, conv_cache, state.chunks + n_chunks)
        return (self.output(y) if project_out else y), state

    def chunk_inputs(
        self, q: Tensor, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_keep: Tensor,
        dtype: torch.dtype,
    ) -> tuple[Tensor, ...]:
        """The scan's inputs, chunk-major: q, k, v as (n_chunks, B·H, b, d), then the chunk coefficients
        d, c (n_chunks, B·H, b) and eta_prod, beta, gamma (n_chunks, B·H). Inputs (B, T, H, ·).
        Chunk-major so that each chunk is one contiguous block: a kernel takes it without a copy."""
        B, T, H, _ = q.shape
        b = self.chunk_size
        n_chunks = -(-T // b)
        pad = n_chunks * b - T

        def chunk_major(t: Tensor) -> Tensor:
            # (..., B, T, H, d) → (..., n_chunks, B·H, b, d); padded tokens get θ = 0, η = 1, α = 0: identity
            # steps. (No pad call when none is needed: a zero pad is still a copy, forward and backward.)
            t = F.pad(t.to(dtype), (0, 0, 0, 0, 0, pad)) if pad else t.to(dtype)
            lead = t.shape[:-4]
            t = t.reshape(*lead, B, n_chunks, b, H, -1)
            n = len(lead)
            t = t.permute(*range(n), n + 1, n, n + 3, n + 2, n + 4)
            return t.reshape(*lead, n_chunks, B * H, b, -1)

        # the three gates laid out together, one copy: (3, n_chunks, B·H, b), then each a contiguous view
        gates = chunk_major(torch.stack([theta, log_eta, log_keep]).unsqueeze(-1)).squeeze(-1).unbind(0)
        valid = None if not pad else (torch.arange(n_chunks * b, device=q.device) < T).view(n_chunks, 1, b)
        return (chunk_major(q), chunk_major(k), chunk_major(v), *chunk_coefficients(*gates, valid))

    def scan(
        self, q: Tensor, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_keep: Tensor,
        state: MemoryState,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Run the chunked recurrence. Inputs (B, T, H, ·); returns y (B, T, H, d) and the end state."""
        B, T, H, d = q.shape
        inputs = self.chunk_inputs(q, k, v, theta, log_eta, log_keep, state.weights[0].dtype)
        n_chunks, _, b, _ = inputs[0].shape
        flat = [t.reshape(B * H, *t.shape[2:]) for t in (*state.weights, *state.momentum)]
        opts, whole = self.scan_options, scan_kernel_of(self.scan_options.kernel)
        if compiling() and self.compilable and (whole is not None or self.recompute):
            # one opaque node of the compiled graph, with its own backward (titans/scan_op.py)
            y, *rest = torch.ops.titans.memory_scan(list(inputs), flat, state.chunks, *astuple(opts))
            flat = rest[: len(flat)]
        elif compiling() and whole is None and not self.recompute:
            # every chunk's activations kept: the chunk loop traced as the torch step, which the compiler
            # fuses (the other per-chunk kernels are eager-mode forms of that same function)
            y, *flat = scan_chunks(replace(opts, kernel="torch"), inputs, flat, state.chunks)
        elif whole is not None and torch.is_grad_enabled():
            # whatever `recompute` says: the per-chunk form of such a kernel recomputes in backward too
            y, *flat = KernelScan.apply(opts, state.chunks, *inputs, *flat)
        elif whole is not None:  # inference: one call, no boundary states kept
            y, ends = whole[0](opts, inputs, flat, keep_boundaries=False)
            flat = [end[-1] for end in ends]
        elif self.recompute and torch.is_grad_enabled():
            y, *flat = RecomputedScan.apply(opts, state.chunks, *inputs, *flat)
        else:
            y, *flat = scan_chunks(opts, inputs, flat, state.chunks)
        # (n_chunks, B·H, b, d) → (B, T, H, d)
        y = y.view(n_chunks, B, H, b, d).permute(1, 0, 3, 2, 4).reshape(B, n_chunks * b, H, d)[:, :T]
        unflat = [t.reshape(B, H, *t.shape[1:]) for t in flat]
        return y, unflat[: self.depth], unflat[self.depth :]
