"""The analytic backward of `titans.memory.memory_chunk_step`, in plain torch (docs/DESIGN.md §2.2–2.3).

Why: autograd through the chunk step records every small op of the step and replays them; an explicit
backward needs no recorded graph (it recomputes the few activations it needs), and it is the
specification the Triton kernel (`chunk_step_triton.py`) mirrors statement for statement. It is checked
against autograd (`tests/test_triton_chunk_step.py`, gradcheck in float64).

Notation per row (one batch·head memory), L layers, X_l (b, d_in) the inputs of layer l, z_l = X_l W_l
its pre-activations (X_{l+1} = SiLU(z_l), h = z_L), G_l (b, d_out) the output gradients of the
per-token losses (`token_backward`), and with residual norm n = (h − μ)/σ, σ = √(var h + eps).

Forward:  y = M(q);  S'_l = E S_l − X_lᵀ diag(w^d) G_l;  W'_l = β W_l + γ S_l − X_lᵀ diag(w^c) G_l,
          w^d = d ⊙ s, w^c = c ⊙ s, s_i = min(1, τ / r_i), r_i = √max(ρ_i, 1e-30), ρ_i = Σ_l ‖X_l,i‖²‖G_l,i‖²
          (s = 1 without clipping), E = eta_prod, τ = max_grad_norm.
Backward, given ȳ and the end state's gradients A_l := S̄'_l (momentum), B_l := W̄'_l (weights):
  state:    S̄_l = E A_l + γ B_l;  W̄_l = β B_l + (read) + (write);  Ē = Σ⟨S_l, A_l⟩, β̄ = Σ⟨W_l, B_l⟩,
            γ̄ = Σ⟨S_l, B_l⟩.
  weights:  w̄^d_i = −Σ_l (X_l A_l)_i·G_l,i,  w̄^c_i = −Σ_l (X_l B_l)_i·G_l,i;  d̄ = w̄^d s, c̄ = w̄^c s.
  sums:     X̄_l = −(w^d ⊙ G_l A_lᵀ + w^c ⊙ G_l B_lᵀ),  Ḡ_l = −(w^d ⊙ X_l A_l + w^c ⊙ X_l B_l).
  clipping: s̄ = w̄^d d + w̄^c c; through s = min(1, τ/r) (gradient where τ/r ≤ 1, torch's clamp) and
            r = √max(ρ, 1e-30): ρ̄ = −s̄ (τ/r) / (2 r²) (0 where ρ < 1e-30); X̄_l += 2 ρ̄ ‖G_l‖² X_l,
            Ḡ_l += 2 ρ̄ ‖X_l‖² G_l.
  G chain:  G_l = (G_{l+1} W_{l+1}ᵀ) ⊙ SiLU'(z_l), walked l = 1..L−1: p̄ = Ḡ_l ⊙ SiLU'(z_l),
            Ḡ_{l+1} += p̄ W_{l+1}, W̄_{l+1} += p̄ᵀ G_{l+1}, z̄_l += Ḡ_l ⊙ (G_{l+1}W_{l+1}ᵀ) ⊙ SiLU''(z_l).
  G_L:      without norm G_L = 2(h − v): h̄ = 2R, v̄ = −2R (R := Ḡ_L). With norm G_L = J g, g = 2(k + n − v),
            J = ∂n/∂h = (I − 11ᵀ/D − nnᵀ/D)/σ symmetric, so with m = mean(g n):
            ḡ = J R;  n̄ = 2ḡ − (m R + mean(R n) g)/σ;  σ̄ = −⟨R, G_L⟩/σ;  h̄ = J n̄ + σ̄ n / D;
            k̄ += 2ḡ, v̄ = −2ḡ.
  MLP:      the ordinary backward of z_l = X_l W_l, X_{l+1} = SiLU(z_l) with X̄_l added at each layer;
            the read y = q + LN(M(q)) is the same walk with ȳ (q̄ += ȳ, h̄ = J ȳ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from titans.memory import (
    NORM_EPS,
    ScanOptions,
    TokenActivations,
    chunk_coefficients,
    memory_chunk_step,
    mlp_activations,
    silu_derivative,
    token_activations,
    token_backward,
    token_grad_norms,
)


def silu_second_derivative(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def normalise(h: Tensor) -> tuple[Tensor, Tensor]:
    """n = (h − μ)/σ and σ = √(var h + eps), the parameter-free LayerNorm of `memory_mlp`."""
    sigma = torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + NORM_EPS)
    return (h - h.mean(-1, keepdim=True)) / sigma, sigma


def norm_vjp(n: Tensor, sigma: Tensor, grad: Tensor) -> Tensor:
    """J·grad for J = ∂n/∂h, which is symmetric: the LayerNorm's backward."""
    return (grad - grad.mean(-1, keepdim=True) - n * (grad * n).mean(-1, keepdim=True)) / sigma


def mlp_vjp(
    weights: list[Tensor], inputs: list[Tensor], pre: list[Tensor], grad_pre: list[Tensor],
    grad_inputs: list[Tensor] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Backward of z_l = X_l W_l, X_{l+1} = SiLU(z_l). grad_pre[l] holds what z_l already received
    (modified in place); grad_inputs[l] what X_l received from elsewhere. Returns (x̄, [W̄_l])."""
    grad_w = [torch.zeros_like(w) for w in weights]
    grad_x = inputs[0].new_zeros(())
    for layer in reversed(range(len(weights))):
        grad_w[layer] = inputs[layer].transpose(-1, -2) @ grad_pre[layer]
        grad_x = grad_pre[layer] @ weights[layer].transpose(-1, -2)
        if grad_inputs is not None:
            grad_x = grad_x + grad_inputs[layer]
        if layer > 0:
            grad_pre[layer - 1] = grad_pre[layer - 1] + grad_x * silu_derivative(pre[layer - 1])
    return grad_x, grad_w


def read_vjp(
    opts: ScanOptions, weights: list[Tensor], q: Tensor, grad_y: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Backward of y = M(q) (with residual norm y = q + LN(h)). Returns (q̄, [W̄_l])."""
    inputs, pre = mlp_activations(weights, q)
    grad_pre = [torch.zeros_like(z) for z in pre]
    if opts.residual_norm:
        n, sigma = normalise(pre[-1])
        grad_pre[-1] = norm_vjp(n, sigma, grad_y)
    else:
        grad_pre[-1] = grad_y
    grad_q, grad_w = mlp_vjp(weights, inputs, pre, grad_pre)
    return (grad_q + grad_y if opts.residual_norm else grad_q), grad_w


def token_backward_vjp(
    opts: ScanOptions, weights: list[Tensor], k: Tensor, v: Tensor, acts: TokenActivations,
    grad_inputs: list[Tensor], grad_outs: list[Tensor],
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Backward of `token_backward` (its X_l, G_l) given X̄_l, Ḡ_l. Returns (k̄, v̄, [W̄_l])."""
    inputs, pre, outs = acts.inputs, acts.pre, acts.grad_outs
    n_layers = len(weights)
    grad_outs = list(grad_outs)
    grad_pre = [torch.zeros_like(z) for z in pre]
    grad_w_chain = [torch.zeros_like(w) for w in weights]
    # G_l = (G_{l+1} W_{l+1}ᵀ) ⊙ SiLU'(z_l) was computed for l = L−1 down to 1: reverse it upwards.
    for layer in range(n_layers - 1):
        grad_back = grad_outs[layer] * silu_derivative(pre[layer])
        grad_pre[layer] = grad_outs[layer] * acts.grad_hidden[layer] * silu_second_derivative(pre[layer])
        grad_outs[layer + 1] = grad_outs[layer + 1] + grad_back @ weights[layer + 1]
        grad_w_chain[layer + 1] = grad_back.transpose(-1, -2) @ outs[layer + 1]
    r = grad_outs[-1]
    if opts.residual_norm:  # G_L = J g, g = 2(k + n − v)
        n, sigma = normalise(pre[-1])
        g = 2 * (k + n - v)
        grad_g = norm_vjp(n, sigma, r)
        mean_gn, mean_rn = (g * n).mean(-1, keepdim=True), (r * n).mean(-1, keepdim=True)
        grad_n = 2 * grad_g - (mean_gn * r + mean_rn * g) / sigma
        grad_sigma = -(r * outs[-1]).sum(-1, keepdim=True) / sigma
        grad_pre[-1] = grad_pre[-1] + norm_vjp(n, sigma, grad_n) + grad_sigma * n / n.shape[-1]
        grad_k, grad_v = 2 * grad_g, -2 * grad_g
    else:  # G_L = 2(h − v)
        grad_pre[-1] = grad_pre[-1] + 2 * r
        grad_k, grad_v = torch.zeros_like(k), -2 * r
    grad_x, grad_w = mlp_vjp(weights, inputs, pre, grad_pre, grad_inputs)
    return grad_k + grad_x, grad_v, [a + b for a, b in zip(grad_w, grad_w_chain, strict=True)]


def chunk_step_backward(
    opts: ScanOptions, q: Tensor, k: Tensor, v: Tensor, d: Tensor, c: Tensor, eta_prod: Tensor,
    beta: Tensor, gamma: Tensor, state: tuple[Tensor, ...], grad_y: Tensor, grad_end: tuple[Tensor, ...],
) -> tuple[Tensor, ...]:
    """Gradients of `memory_chunk_step` w.r.t. (q, k, v, d, c, eta_prod, beta, gamma, *state), given the
    gradients of y and of the end state (L weights then L momenta). See the module docstring."""
    n_layers = opts.n_layers
    weights, momentum = list(state[:n_layers]), list(state[n_layers:])
    grad_new_w, grad_new_m = grad_end[:n_layers], grad_end[n_layers:]  # B_l, A_l of the docstring

    def dot(a: Tensor, b: Tensor) -> Tensor:  # per-row Frobenius product, (N,)
        return (a * b).sum((-1, -2))

    grad_eta = sum(dot(s, a) for s, a in zip(momentum, grad_new_m))
    grad_beta = sum(dot(w, b) for w, b in zip(weights, grad_new_w))
    grad_gamma = sum(dot(s, b) for s, b in zip(momentum, grad_new_w))
    grad_momentum = [eta_prod[:, None, None] * a + gamma[:, None, None] * b
                     for a, b in zip(grad_new_m, grad_new_w)]

    grad_q, grad_w_read = read_vjp(opts, weights, q, grad_y)

    acts = token_activations(weights, k, v, opts.residual_norm)
    inputs, outs = acts.inputs, acts.grad_outs
    scale = torch.ones_like(d)
    if opts.max_grad_norm is not None:
        norms = token_grad_norms(inputs, outs)
        scale = (opts.max_grad_norm / norms).clamp(max=1.0)
    wd, wc = (d * scale)[..., None], (c * scale)[..., None]
    xa = [x @ a for x, a in zip(inputs, grad_new_m)]
    xb = [x @ b for x, b in zip(inputs, grad_new_w)]
    grad_wd = -sum((t * g).sum(-1) for t, g in zip(xa, outs))
    grad_wc = -sum((t * g).sum(-1) for t, g in zip(xb, outs))
    grad_inputs = [-(wd * (g @ a.transpose(-1, -2)) + wc * (g @ b.transpose(-1, -2)))
                   for g, a, b in zip(outs, grad_new_m, grad_new_w)]
    grad_outs = [-(wd * ta + wc * tb) for ta, tb in zip(xa, xb)]
    if opts.max_grad_norm is not None:
        ratio = opts.max_grad_norm / norms
        grad_ratio = (grad_wd * d + grad_wc * c) * (ratio <= 1.0)
        sq = sum(x.square().sum(-1) * g.square().sum(-1) for x, g in zip(inputs, outs))
        grad_sq = (-grad_ratio * ratio / (2 * norms.square()) * (sq >= 1e-30))[..., None]
        grad_inputs = [gx + 2 * grad_sq * g.square().sum(-1, keepdim=True) * x
                       for gx, x, g in zip(grad_inputs, inputs, outs)]
        grad_outs = [gg + 2 * grad_sq * x.square().sum(-1, keepdim=True) * g
                     for gg, x, g in zip(grad_outs, inputs, outs)]
    grad_k, grad_v, grad_w_write = token_backward_vjp(opts, weights, k, v, acts, grad_inputs, grad_outs)

    grad_weights = [beta[:, None, None] * b + r + w
                    for b, r, w in zip(grad_new_w, grad_w_read, grad_w_write, strict=True)]
    return (grad_q, grad_k, grad_v, grad_wd * scale, grad_wc * scale, grad_eta, grad_beta, grad_gamma,
            *grad_weights, *grad_momentum)


class AnalyticChunkStep(torch.autograd.Function):
    """`memory_chunk_step` with the explicit backward above instead of autograd's graph."""

    @staticmethod
    def forward(ctx, opts: ScanOptions, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.opts = opts
        ctx.save_for_backward(*tensors)
        return memory_chunk_step(opts, *tensors)

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, *grad_end: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        inputs, state = saved[:8], saved[8:]
        grad_y = torch.zeros_like(inputs[0]) if grad_y is None else grad_y
        grad_end = tuple(torch.zeros_like(s) if g is None else g
                         for s, g in zip(state, grad_end, strict=True))
        grads = chunk_step_backward(ctx.opts, *inputs, state, grad_y, grad_end)
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:], strict=True)))


def analytic_chunk_step(
    opts: ScanOptions, q: Tensor, k: Tensor, v: Tensor, d: Tensor, c: Tensor,
    eta_prod: Tensor, beta: Tensor, gamma: Tensor, *state: Tensor,
) -> tuple[Tensor, ...]:
    """Drop-in for `memory_chunk_step` (same signature and outputs) with the analytic backward."""
    return AnalyticChunkStep.apply(opts, q, k, v, d, c, eta_prod, beta, gamma, *state)


def example_step(depth: int, residual_norm: bool, clip: bool, n_rows: int = 3, b: int = 16, dim: int = 16,
                 hidden: int = 32, seed: int = 0) -> tuple[ScanOptions, list[Tensor]]:
    """Options and float64 inputs (q, k, v, d, c, eta_prod, beta, gamma, *weights, *momenta) of one chunk
    step: unit q, k as in the module, coefficients from random gates, and with `clip` a max_grad_norm
    halfway between the two middle token gradient norms, so half the tokens are clipped and none sits
    at the kink of min(1, max/‖u‖), where the two roundings or finite differences could disagree."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    sizes = [dim] + [hidden] * (depth - 1) + [dim]
    q, k = F.normalize(randn(n_rows, b, dim), dim=-1), F.normalize(randn(n_rows, b, dim), dim=-1)
    v = randn(n_rows, b, dim)
    theta = torch.sigmoid(randn(n_rows, b)) / b
    log_eta, log_keep = F.logsigmoid(randn(n_rows, b) + 2), F.logsigmoid(randn(n_rows, b) - 3)
    coeffs = chunk_coefficients(theta, log_eta, log_keep, torch.ones(b, dtype=torch.bool))
    weights = [randn(n_rows, i, o) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:])]
    momenta = [0.05 * randn(n_rows, i, o) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:])]
    max_norm = None
    if clip:
        norms = token_grad_norms(*token_backward(weights, k, v, residual_norm)).flatten().sort().values
        middle = norms.numel() // 2
        max_norm = (norms[middle - 1] + norms[middle]).item() / 2
        if norms[middle] - norms[middle - 1] <= 1e-4 * max_norm:
            raise ValueError("the two middle token norms are too close for a clip between them; change seed")
    return ScanOptions(depth, residual_norm, max_norm), [q, k, v, *coeffs, *weights, *momenta]
