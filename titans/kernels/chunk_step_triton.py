"""Triton kernels for the neural memory's chunk step, forward and analytic backward (docs/DESIGN.md §2).

`triton_chunk_step(opts, q, k, v, d, c, eta_prod, beta, gamma, *state)` has the signature and outputs
of `titans.memory.memory_chunk_step`, so it can stand in for it inside the chunk scan.

Layout: one program per row N (one batch·head memory) and one chunk. The program loads q, k, v as
(b, D) blocks, d and c as (b,), the three chunk scalars, and the whole state (W_l, S_l: (D, H) and
(H, D) for depth 2 with H = hidden, (D, D) for depth 1) as blocks, and does every matmul with `tl.dot`
in IEEE precision (no TF32: the results must equal the torch path to fp32 rounding). The forward
reads y = M(q), runs the per-token backward of ‖M(k_i) − v_i‖² (`token_backward`), applies the
optional surprise clipping and writes the new weights and momentum; per-token gradients are never
formed, as in the torch path (one `X_lᵀ diag(w) G_l` matmul per layer and weighting).

The backward kernel recomputes those activations from the saved inputs (as `RecomputedScan` does per
chunk: nothing per token is kept between the passes) and walks the derivation written out in
`chunk_step_reference` (its module docstring), the plain-torch analytic backward this kernel mirrors
statement for statement and which is checked against autograd. It produces the gradients of q, k, v,
d, c, eta_prod, beta, gamma and of the start state.

Limits: depth 1 or 2; float32 or float64; b, head_dim and hidden must be powers of two and at least 16
(`tl.arange` needs powers of two, `tl.dot` tiles of at least 16). The whole state of a row is held by
one program, which only suits small heads: at head_dim 64 and hidden 256 each of the four state
matrices is 64 KiB in float32, beyond one program's registers, so a fast GPU kernel would tile the
hidden dimension (and the backward's 23 block matmuls) across programs or loop over it. Verified only
in Triton's CPU interpreter so far; `memory_kernel: triton` (`ScanOptions.kernel`) runs it in the scans.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from titans.memory import NORM_EPS, ScanOptions

MIN_BLOCK = 16  # tl.dot's smallest tile side


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _sum_all(x):
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _silu_parts(z):
    """SiLU(z), SiLU'(z), SiLU''(z)."""
    s = 1.0 / (1.0 + tl.exp(-z))
    return z * s, s * (1.0 + z * (1.0 - s)), s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


@triton.jit
def _normalise(h, eps, D: tl.constexpr):
    """n = (h − μ)/σ, σ = √(var h + eps) (σ as (b, 1)): the parameter-free LayerNorm."""
    centred = h - (tl.sum(h, axis=1) / D)[:, None]
    sigma = tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)[:, None]
    return centred / sigma, sigma


@triton.jit
def _norm_vjp(n, sigma, g, D: tl.constexpr):
    """J·g for the symmetric LayerNorm Jacobian J = ∂n/∂h."""
    mean_g = tl.sum(g, axis=1) / D
    mean_gn = tl.sum(g * n, axis=1) / D
    return (g - mean_g[:, None] - n * mean_gn[:, None]) / sigma


@triton.jit
def _load_row(ptr, pid, R: tl.constexpr, C: tl.constexpr):
    """Row pid's (R, C) block of a contiguous (N, R, C) tensor."""
    offs = pid * R * C + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    return tl.load(ptr + offs)


@triton.jit
def _store_row(ptr, pid, x, R: tl.constexpr, C: tl.constexpr):
    offs = pid * R * C + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    tl.store(ptr + offs, x)


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, s1_ptr, const_ptr,
                pid, B: tl.constexpr, D: tl.constexpr, H: tl.constexpr):
    """Row pid's chunk inputs and first-layer state, and the constants: NORM_EPS and max_grad_norm in the
    data's dtype (exact in float64). Both kernels start from these."""
    rb = tl.arange(0, B)
    q = _load_row(q_ptr, pid, B, D)
    k = _load_row(k_ptr, pid, B, D)
    v = _load_row(v_ptr, pid, B, D)
    d = tl.load(d_ptr + pid * B + rb)
    c = tl.load(c_ptr + pid * B + rb)
    eta, beta, gamma = tl.load(eta_ptr + pid), tl.load(beta_ptr + pid), tl.load(gamma_ptr + pid)
    w1 = _load_row(w1_ptr, pid, D, H)
    s1 = _load_row(s1_ptr, pid, D, H)
    return tl.load(const_ptr), tl.load(const_ptr + 1), q, k, v, d, c, eta, beta, gamma, w1, s1


@triton.jit
def _chunk_forward_kernel(
    q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
    const_ptr, y_ptr, nw1_ptr, nw2_ptr, ns1_ptr, ns2_ptr,
    B: tl.constexpr, D: tl.constexpr, H: tl.constexpr, DEPTH: tl.constexpr, RESIDUAL: tl.constexpr,
    CLIP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    eps, max_norm, q, k, v, d, c, eta, beta, gamma, w1, s1 = _load_chunk(
        q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, s1_ptr, const_ptr, pid,
        B, D, H)
    if DEPTH == 2:
        w2 = _load_row(w2_ptr, pid, H, D)
        s2 = _load_row(s2_ptr, pid, H, D)

    # read: y = M(q) with the chunk-start weights
    hq = _dot(q, w1)
    if DEPTH == 2:
        xq2, _, _ = _silu_parts(hq)
        hq = _dot(xq2, w2)
    if RESIDUAL:
        nq, _ = _normalise(hq, eps, D)
        hq = q + nq
    _store_row(y_ptr, pid, hq, B, D)

    # per-token backward of ‖M(k_i) − v_i‖²: layer inputs X_l and output gradients G_l
    h = _dot(k, w1)
    if DEPTH == 2:
        x2, ds1, _ = _silu_parts(h)
        h = _dot(x2, w2)
    if RESIDUAL:
        n, sigma = _normalise(h, eps, D)
        g_last = _norm_vjp(n, sigma, 2.0 * (k + n - v), D)
    else:
        g_last = 2.0 * (h - v)
    g1 = g_last
    if DEPTH == 2:
        g1 = _dot(g_last, tl.trans(w2)) * ds1

    wd, wc = d, c
    if CLIP:  # ‖x_iᵀ g_i‖_F = ‖x_i‖·‖g_i‖ per layer
        sq = tl.sum(k * k, axis=1) * tl.sum(g1 * g1, axis=1)
        if DEPTH == 2:
            sq += tl.sum(x2 * x2, axis=1) * tl.sum(g_last * g_last, axis=1)
        scale = tl.minimum(max_norm / tl.sqrt(tl.maximum(sq, 1e-30)), 1.0)
        wd, wc = d * scale, c * scale

    kt = tl.trans(k)
    _store_row(ns1_ptr, pid, eta * s1 - _dot(kt, wd[:, None] * g1), D, H)
    _store_row(nw1_ptr, pid, beta * w1 + gamma * s1 - _dot(kt, wc[:, None] * g1), D, H)
    if DEPTH == 2:
        x2t = tl.trans(x2)
        _store_row(ns2_ptr, pid, eta * s2 - _dot(x2t, wd[:, None] * g_last), H, D)
        _store_row(nw2_ptr, pid, beta * w2 + gamma * s2 - _dot(x2t, wc[:, None] * g_last), H, D)


@triton.jit
def _chunk_backward_kernel(
    q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
    const_ptr, gy_ptr, gnw1_ptr, gnw2_ptr, gns1_ptr, gns2_ptr,
    gq_ptr, gk_ptr, gv_ptr, gd_ptr, gc_ptr, geta_ptr, gbeta_ptr, ggamma_ptr, gw1_ptr, gw2_ptr, gs1_ptr,
    gs2_ptr,
    B: tl.constexpr, D: tl.constexpr, H: tl.constexpr, DEPTH: tl.constexpr, RESIDUAL: tl.constexpr,
    CLIP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    eps, max_norm, q, k, v, d, c, eta, beta, gamma, w1, s1 = _load_chunk(
        q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, s1_ptr, const_ptr, pid,
        B, D, H)
    gy = _load_row(gy_ptr, pid, B, D)
    a1 = _load_row(gns1_ptr, pid, D, H)  # A_l: gradient of the new momentum
    b1 = _load_row(gnw1_ptr, pid, D, H)  # B_l: gradient of the new weights
    if DEPTH == 2:
        w2 = _load_row(w2_ptr, pid, H, D)
        s2 = _load_row(s2_ptr, pid, H, D)
        a2 = _load_row(gns2_ptr, pid, H, D)
        b2 = _load_row(gnw2_ptr, pid, H, D)

    # the linear state terms: S' = η̄ S − ..., W' = β W + γ S − ...
    geta = _sum_all(s1 * a1)
    gbeta = _sum_all(w1 * b1)
    ggamma = _sum_all(s1 * b1)
    _store_row(gs1_ptr, pid, eta * a1 + gamma * b1, D, H)
    gw1 = beta * b1
    if DEPTH == 2:
        geta += _sum_all(s2 * a2)
        gbeta += _sum_all(w2 * b2)
        ggamma += _sum_all(s2 * b2)
        _store_row(gs2_ptr, pid, eta * a2 + gamma * b2, H, D)
        gw2 = beta * b2
    tl.store(geta_ptr + pid, geta)
    tl.store(gbeta_ptr + pid, gbeta)
    tl.store(ggamma_ptr + pid, ggamma)

    # read: backward of y = M(q) (y = q + LN(h) with the residual norm)
    hq = _dot(q, w1)
    if DEPTH == 2:
        zq1 = hq
        xq2, dsq1, _ = _silu_parts(zq1)
        hq = _dot(xq2, w2)
    gq = tl.zeros_like(q)
    ghq = gy
    if RESIDUAL:
        nq, sigq = _normalise(hq, eps, D)
        ghq = _norm_vjp(nq, sigq, gy, D)
        gq = gy
    if DEPTH == 2:
        gw2 += _dot(tl.trans(xq2), ghq)
        ghq = _dot(ghq, tl.trans(w2)) * dsq1
    gw1 += _dot(tl.trans(q), ghq)
    gq += _dot(ghq, tl.trans(w1))
    _store_row(gq_ptr, pid, gq, B, D)

    # write: recompute the per-token backward (as in the forward kernel)
    h = _dot(k, w1)
    if DEPTH == 2:
        z1 = h
        x2, ds1, dds1 = _silu_parts(z1)
        h = _dot(x2, w2)
    if RESIDUAL:
        n, sigma = _normalise(h, eps, D)
        g = 2.0 * (k + n - v)
        g_last = _norm_vjp(n, sigma, g, D)
    else:
        g_last = 2.0 * (h - v)
    g1 = g_last
    if DEPTH == 2:
        back = _dot(g_last, tl.trans(w2))
        g1 = back * ds1
    wd, wc = d, c
    if CLIP:
        xx1 = tl.sum(k * k, axis=1)
        gg1 = tl.sum(g1 * g1, axis=1)
        sq = xx1 * gg1
        if DEPTH == 2:
            xx2 = tl.sum(x2 * x2, axis=1)
            gg2 = tl.sum(g_last * g_last, axis=1)
            sq += xx2 * gg2
        r = tl.sqrt(tl.maximum(sq, 1e-30))
        ratio = max_norm / r
        scale = tl.minimum(ratio, 1.0)
        wd, wc = d * scale, c * scale

    # backward of the weighted sums X_lᵀ diag(w) G_l (cotangents −A_l for w^d, −B_l for w^c)
    xa1 = _dot(k, a1)
    xb1 = _dot(k, b1)
    gwd = -tl.sum(xa1 * g1, axis=1)
    gwc = -tl.sum(xb1 * g1, axis=1)
    gx1 = -(wd[:, None] * _dot(g1, tl.trans(a1)) + wc[:, None] * _dot(g1, tl.trans(b1)))
    gg1_bar = -(wd[:, None] * xa1 + wc[:, None] * xb1)
    if DEPTH == 2:
        xa2 = _dot(x2, a2)
        xb2 = _dot(x2, b2)
        gwd -= tl.sum(xa2 * g_last, axis=1)
        gwc -= tl.sum(xb2 * g_last, axis=1)
        gx2 = -(wd[:, None] * _dot(g_last, tl.trans(a2)) + wc[:, None] * _dot(g_last, tl.trans(b2)))
        g_last_bar = -(wd[:, None] * xa2 + wc[:, None] * xb2)
    if CLIP:  # through scale = min(1, τ/r), r = √max(sq, 1e-30)
        gratio = tl.where(ratio <= 1.0, gwd * d + gwc * c, 0.0)
        gsq = tl.where(sq >= 1e-30, -gratio * ratio / (2.0 * r * r), 0.0)
        gx1 += (2.0 * gsq * gg1)[:, None] * k
        gg1_bar += (2.0 * gsq * xx1)[:, None] * g1
        if DEPTH == 2:
            gx2 += (2.0 * gsq * gg2)[:, None] * x2
            g_last_bar += (2.0 * gsq * xx2)[:, None] * g_last
        gwd, gwc = gwd * scale, gwc * scale
    rb = tl.arange(0, B)
    tl.store(gd_ptr + pid * B + rb, gwd)
    tl.store(gc_ptr + pid * B + rb, gwc)

    # G chain: G_1 = (G_2 W_2ᵀ) ⊙ SiLU'(z_1)
    if DEPTH == 2:
        gback = gg1_bar * ds1
        gz1 = gg1_bar * back * dds1
        g_last_bar += _dot(gback, w2)
        gw2 += _dot(tl.trans(gback), g_last)
    else:
        g_last_bar = gg1_bar

    # G_L from h, k, v
    if RESIDUAL:  # G_L = J g, g = 2(k + n − v)
        rr = g_last_bar
        gg = _norm_vjp(n, sigma, rr, D)
        mean_gn = (tl.sum(g * n, axis=1) / D)[:, None]
        mean_rn = (tl.sum(rr * n, axis=1) / D)[:, None]
        gn = 2.0 * gg - (mean_gn * rr + mean_rn * g) / sigma
        gsigma = -tl.sum(rr * g_last, axis=1)[:, None] / sigma
        gh = _norm_vjp(n, sigma, gn, D) + gsigma * n / D
        gk = 2.0 * gg
        gv = -2.0 * gg
    else:  # G_L = 2(h − v)
        gh = 2.0 * g_last_bar
        gk = tl.zeros_like(k)
        gv = -2.0 * g_last_bar
    _store_row(gv_ptr, pid, gv, B, D)

    # the MLP on k, with X̄_l added at each layer's input
    if DEPTH == 2:
        gw2 += _dot(tl.trans(x2), gh)
        gz1 += (_dot(gh, tl.trans(w2)) + gx2) * ds1
        _store_row(gw2_ptr, pid, gw2, H, D)
    else:
        gz1 = gh
    gw1 += _dot(tl.trans(k), gz1)
    gk += _dot(gz1, tl.trans(w1)) + gx1
    _store_row(gk_ptr, pid, gk, B, D)
    _store_row(gw1_ptr, pid, gw1, D, H)


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter: `triton.jit` decides once, at import, from
    TRITON_INTERPRET."""
    return not isinstance(_chunk_forward_kernel, triton.runtime.JITFunction)


def _is_block(n: int) -> bool:
    return n >= MIN_BLOCK and n & (n - 1) == 0


def _check(opts: ScanOptions, tensors: list[Tensor]) -> tuple[int, int, int]:
    """(b, D, H) of a chunk step the kernels can run; ValueError, naming why, otherwise. The kernels
    index raw pointers, so every shape is checked here: a wrong one would read out of bounds."""
    depth = opts.n_layers
    if depth not in (1, 2):
        raise ValueError(f"the Triton chunk step supports memory depth 1 or 2, got {depth}")
    if len(tensors) != 8 + 2 * depth:
        raise ValueError(f"expected 8 inputs and {2 * depth} state tensors, got {len(tensors)} tensors")
    q = tensors[0]
    if q.dtype not in (torch.float32, torch.float64) or any(t.dtype != q.dtype for t in tensors):
        raise ValueError(f"the Triton chunk step needs every input in float32 or every one in float64, "
                         f"got {sorted({str(t.dtype) for t in tensors})}")
    if q.device.type != "cuda" and not interpreted():
        raise ValueError("the Triton chunk step needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "importing it, to run the kernels on CPU in Triton's interpreter)")
    if q.dim() != 3 or tensors[8].dim() != 3:
        raise ValueError(f"q must be (N, b, d) and the state (N, d_in, d_out), got {tuple(q.shape)}")
    n_rows, b, dim = q.shape
    hidden = tensors[8].shape[-1]
    sizes = [dim] + [hidden] * (depth - 1) + [dim]
    layers = [(n_rows, i, o) for i, o in zip(sizes[:-1], sizes[1:])]
    expected = [(n_rows, b, dim)] * 3 + [(n_rows, b)] * 2 + [(n_rows,)] * 3 + layers * 2
    for index, (t, shape) in enumerate(zip(tensors, expected, strict=True)):
        if tuple(t.shape) != shape:
            raise ValueError(f"input {index} of the chunk step has shape {tuple(t.shape)}, expected {shape}")
    for name, size in (("chunk size", b), ("head_dim", dim), ("hidden", hidden)):
        if not _is_block(size):
            raise ValueError(f"the Triton chunk step needs {name} to be a power of two >= {MIN_BLOCK}, "
                             f"got {size}")
    return b, dim, hidden


def _prepare(opts: ScanOptions, tensors: tuple[Tensor, ...]) -> tuple[list[Tensor], Tensor, dict]:
    """Contiguous inputs, the constants tensor and the kernels' static arguments."""
    tensors = [t.contiguous() for t in tensors]
    b, dim, hidden = _check(opts, tensors)
    max_norm = 0.0 if opts.max_grad_norm is None else opts.max_grad_norm
    consts = torch.tensor([NORM_EPS, max_norm], dtype=tensors[0].dtype, device=tensors[0].device)
    meta = dict(B=b, D=dim, H=hidden, DEPTH=opts.n_layers, RESIDUAL=opts.residual_norm,
                CLIP=opts.max_grad_norm is not None)
    return tensors, consts, meta


def _layer_pair(tensors: list[Tensor], depth: int) -> list[Tensor]:
    """W_1, W_2, S_1, S_2 (layer-2 slots filled with layer 1's for depth 1; the kernel never reads them)."""
    weights, momentum = tensors[:depth], tensors[depth:]
    return [weights[0], weights[-1], momentum[0], momentum[-1]]


class TritonChunkStep(torch.autograd.Function):
    """`memory_chunk_step` as two Triton kernels: a fused forward and the analytic backward."""

    @staticmethod
    def forward(ctx, opts: ScanOptions, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        tensors, consts, meta = _prepare(opts, tensors)
        depth = opts.n_layers
        state = tensors[8:]
        y = torch.empty_like(tensors[0])
        new_state = [torch.empty_like(s) for s in state]
        out_pairs = _layer_pair(new_state, depth)
        _chunk_forward_kernel[(y.shape[0],)](
            *tensors[:8], *_layer_pair(state, depth), consts, y, *out_pairs, **meta)
        ctx.opts = opts
        ctx.save_for_backward(*tensors)
        return (y, *new_state)

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, *grad_end: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        tensors, consts, meta = _prepare(ctx.opts, saved)
        depth = ctx.opts.n_layers
        state = tensors[8:]
        grad_y = torch.zeros_like(tensors[0]) if grad_y is None else grad_y.contiguous()
        grad_end = [torch.zeros_like(s) if g is None else g.contiguous()
                    for s, g in zip(state, grad_end, strict=True)]
        grads = [torch.empty_like(t) for t in tensors]
        grad_pairs = _layer_pair(grads[8:], depth)
        _chunk_backward_kernel[(grad_y.shape[0],)](
            *tensors[:8], *_layer_pair(state, depth), consts, grad_y, *_layer_pair(grad_end, depth),
            *grads[:8], *grad_pairs, **meta)
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:], strict=True)))


def triton_chunk_step(
    opts: ScanOptions, q: Tensor, k: Tensor, v: Tensor, d: Tensor, c: Tensor,
    eta_prod: Tensor, beta: Tensor, gamma: Tensor, *state: Tensor,
) -> tuple[Tensor, ...]:
    """Drop-in for `memory_chunk_step` (same signature and outputs), run by the Triton kernels."""
    return TritonChunkStep.apply(opts, q, k, v, d, c, eta_prod, beta, gamma, *state)
