"""Triton kernels for the neural memory's chunk step, forward and analytic backward (docs/DESIGN.md §2).

`triton_chunk_step(opts, q, k, v, d, c, eta_prod, beta, gamma, *state)` has the signature and outputs
of `titans.memory.memory_chunk_step`, so it can stand in for it inside the chunk scan.

`triton_scan` / `triton_scan_backward` run every chunk of a scan in one launch per direction (each
program walks its row's chunks through the same bodies): what training (`KernelScan`) and inference call,
so the host does not pay a launch's checks, allocations and Python per chunk.

Layout: one program per row N (one batch·head memory) and one chunk (or, in a scan, all its chunks). The
program loads q, k, v as (b, D) blocks, d and c as (b,) and the three chunk scalars; a depth-2 state
(W_l, S_l: (D, H) and (H, D) with H = hidden) is walked in tiles of BLOCK_HIDDEN hidden units (layer 1's
columns, layer 2's rows), so a program holds a few (D, BLOCK_HIDDEN) blocks at a time, never the whole
state (at the paper's head 64 and hidden 256 that would be 256 KiB in float32, beyond a program's
registers and shared memory); a depth-1 state (D, D) is loaded whole. Every matmul is a `tl.dot` in IEEE
precision (the results equal the torch path to fp32 rounding), or in TF32 on tensor cores when torch's
float32 matmuls are set to TF32 (`dot_precision`). The forward sums the read y = M(q) and M(k) over the
tiles, forms the per-token gradient of ‖M(k_i) − v_i‖² at the output (`_last_gradient`), takes a second
walk for the surprise clipping's norms when clipping is on, and a last one that writes each tile's new
weights and momentum; per-token gradients are never formed, as in the torch path (one `X_lᵀ diag(w) G_l`
matmul per layer and weighting).

The backward kernel recomputes those activations from the saved inputs (as `RecomputedScan` does per
chunk: nothing per token is kept between the passes) and walks the derivation written out in
`chunk_step_reference` (its module docstring), the plain-torch analytic backward this kernel mirrors
statement for statement and which is checked against autograd. It produces the gradients of q, k, v,
d, c, eta_prod, beta, gamma and of the start state.

Limits: depth 1 or 2; float32 or float64; b, head_dim and hidden must be powers of two and at least 16
(`tl.arange` needs powers of two, `tl.dot` tiles of at least 16). Recomputing the tile activations in
each walk trades FLOPs for registers; the tile and the warps come from the compiler's register report
(`BLOCK_HIDDEN`), and a GPU's timings of the alternatives are to confirm them.
Verified in Triton's CPU interpreter; `memory_kernel: triton` (`ScanOptions.kernel`) runs it in the scans.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from titans.memory import NORM_EPS, ScanOptions

MIN_BLOCK = 16  # tl.dot's smallest tile side
MIN_WARPS = 4
# The launch: hidden units per tile of a depth-2 state (a program holds a few (head_dim, BLOCK_HIDDEN) blocks
# at a time: W_1, W_2 and their momenta or gradients, never the whole state) and warps per program. Chosen
# from what the compiler reports for the paper's shape (chunk 64, head 64, hidden 256) on sm_90: a program
# holds about six (b, head_dim) float32 blocks (q, k, v, M's outputs, their gradients) besides its tiles,
# more than 4 warps' registers, and what does not fit spills to local memory on every chunk. 8 warps and
# tiles of 16 spill the least in three of the scan's four kernels (the IEEE backward, least on 16 warps,
# is second there) and fit an H100's shared memory (figures: bench/RESULTS.md, session 23). `python -m
# titans.kernels.cuda_frontend --resources` prints the table; `bench/gpu_step.py --scan-launches` times the
# launches on a GPU. Read at call time (tests and benchmarks set them).
BLOCK_HIDDEN = 16
NUM_WARPS = 8
# No software pipelining of the hidden-tile loops: Triton's default (3 stages on Hopper) keeps a copy of
# every tile a loop loads per stage in shared memory, which puts the paper's shape over an H100's limit;
# the loops run a few iterations, too few for prefetching to pay.
NUM_STAGES = 1


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with float32 inputs rounded as PREC says: "ieee" (exact float32) or "tf32" (tensor cores)."""
    return tl.dot(a, b, input_precision=PREC)


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
def _offsets(pid, R: tl.constexpr, C: tl.constexpr, r0, BR: tl.constexpr, c0, BC: tl.constexpr):
    """Offsets of rows r0..r0+BR and columns c0..c0+BC of row pid's (R, C) block of a contiguous
    (N, R, C) tensor."""
    return pid * R * C + (r0 + tl.arange(0, BR))[:, None] * C + c0 + tl.arange(0, BC)[None, :]


@triton.jit
def _load_row(ptr, pid, R: tl.constexpr, C: tl.constexpr):
    """Row pid's whole (R, C) block."""
    return tl.load(ptr + _offsets(pid, R, C, 0, R, 0, C))


@triton.jit
def _store_row(ptr, pid, x, R: tl.constexpr, C: tl.constexpr):
    tl.store(ptr + _offsets(pid, R, C, 0, R, 0, C), x)


@triton.jit
def _load_tile(l1_ptr, l2_ptr, pid, j, D: tl.constexpr, H: tl.constexpr, BH: tl.constexpr):
    """Hidden tile j..j+BH of a depth-2 state: layer 1's columns (D, BH) and layer 2's rows (BH, D)."""
    return (tl.load(l1_ptr + _offsets(pid, D, H, 0, D, j, BH)),
            tl.load(l2_ptr + _offsets(pid, H, D, j, BH, 0, D)))


@triton.jit
def _store_tile(l1_ptr, l2_ptr, pid, j, x1, x2, D: tl.constexpr, H: tl.constexpr, BH: tl.constexpr):
    tl.store(l1_ptr + _offsets(pid, D, H, 0, D, j, BH), x1)
    tl.store(l2_ptr + _offsets(pid, H, D, j, BH, 0, D), x2)


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, const_ptr,
                pid, B: tl.constexpr, D: tl.constexpr):
    """Row pid's chunk inputs, and the constants: NORM_EPS and max_grad_norm in the data's dtype (exact in
    float64). Both kernels start from these."""
    rb = tl.arange(0, B)
    q = _load_row(q_ptr, pid, B, D)
    k = _load_row(k_ptr, pid, B, D)
    v = _load_row(v_ptr, pid, B, D)
    d = tl.load(d_ptr + pid * B + rb)
    c = tl.load(c_ptr + pid * B + rb)
    eta, beta, gamma = tl.load(eta_ptr + pid), tl.load(beta_ptr + pid), tl.load(gamma_ptr + pid)
    return tl.load(const_ptr), tl.load(const_ptr + 1), q, k, v, d, c, eta, beta, gamma


@triton.jit
def _mlp_outputs(q, k, w1_ptr, w2_ptr, pid, D: tl.constexpr, H: tl.constexpr, BH: tl.constexpr,
                 DEPTH: tl.constexpr, PREC: tl.constexpr):
    """M(q) and M(k) before the residual norm, and ‖X_2,i‖² (the hidden activations of k; zeros at depth
    1). Depth 2 sums the second layer over hidden tiles, so no program holds a whole state matrix."""
    if DEPTH == 2:
        hq = tl.zeros_like(q)
        h = tl.zeros_like(k)
        xx2 = tl.sum(h, axis=1)
        for j in range(0, H, BH):
            w1, w2 = _load_tile(w1_ptr, w2_ptr, pid, j, D, H, BH)
            xq2, _dsq1, _ddsq1 = _silu_parts(_dot(q, w1, PREC))
            hq += _dot(xq2, w2, PREC)
            x2, _ds1, _dds1 = _silu_parts(_dot(k, w1, PREC))
            h += _dot(x2, w2, PREC)
            xx2 += tl.sum(x2 * x2, axis=1)
    else:
        w1 = _load_row(w1_ptr, pid, D, H)
        hq = _dot(q, w1, PREC)
        h = _dot(k, w1, PREC)
        xx2 = tl.sum(h, axis=1) * 0.0
    return hq, h, xx2


@triton.jit
def _key_tile(k, g_last, w1, w2, PREC: tl.constexpr):
    """Layer 1 of M(k) on one hidden tile: X_2 = SiLU(z_1), SiLU'(z_1), SiLU''(z_1), G_2 W_2ᵀ and G_1."""
    x2, ds1, dds1 = _silu_parts(_dot(k, w1, PREC))
    back = _dot(g_last, tl.trans(w2), PREC)
    return x2, ds1, dds1, back, back * ds1


@triton.jit
def _last_gradient(h, k, v, eps, D: tl.constexpr, RESIDUAL: tl.constexpr):
    """G_L, the per-token gradient of ‖M(k_i) − v_i‖² at the MLP's output h, with n, σ and g = 2(k + n − v)
    for the backward (with the residual norm; h − v stands in for them without it)."""
    if RESIDUAL:
        n, sigma = _normalise(h, eps, D)
        g = 2.0 * (k + n - v)
        return _norm_vjp(n, sigma, g, D), n, sigma, g
    else:
        return 2.0 * (h - v), h, h, h


@triton.jit
def _clip_scale(k, g_last, xx2, w1_ptr, w2_ptr, pid, max_norm, D: tl.constexpr, H: tl.constexpr,
                BH: tl.constexpr, DEPTH: tl.constexpr, PREC: tl.constexpr):
    """s_i = min(1, τ/r_i), r_i = √max(ρ_i, 1e-30), ρ_i = Σ_l ‖X_l,i‖²‖G_l,i‖² (‖x_iᵀ g_i‖_F = ‖x_i‖·‖g_i‖
    per layer), with ‖X_1‖², ‖G_1‖², ‖G_2‖², ρ, r and τ/r for the backward."""
    xx1 = tl.sum(k * k, axis=1)
    gg2 = tl.sum(g_last * g_last, axis=1)
    if DEPTH == 2:
        gg1 = xx1 * 0.0
        for j in range(0, H, BH):
            w1, w2 = _load_tile(w1_ptr, w2_ptr, pid, j, D, H, BH)
            _x2, _ds1, _dds1, _back, g1 = _key_tile(k, g_last, w1, w2, PREC)
            gg1 += tl.sum(g1 * g1, axis=1)
        sq = xx1 * gg1 + xx2 * gg2
    else:
        gg1 = gg2
        sq = xx1 * gg1
    r = tl.sqrt(tl.maximum(sq, 1e-30))
    ratio = max_norm / r
    return tl.minimum(ratio, 1.0), xx1, gg1, gg2, sq, r, ratio


@triton.jit
def _forward_chunk(
    pid, q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
    const_ptr, y_ptr, nw1_ptr, nw2_ptr, ns1_ptr, ns2_ptr,
    B: tl.constexpr, D: tl.constexpr, H: tl.constexpr, BH: tl.constexpr, DEPTH: tl.constexpr,
    RESIDUAL: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
):
    """Row pid's chunk step: y and the new state from the chunk's inputs and the start state."""
    eps, max_norm, q, k, v, d, c, eta, beta, gamma = _load_chunk(
        q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, const_ptr, pid, B, D)

    # read y = M(q) with the chunk-start weights; M(k) for the per-token backward of ‖M(k_i) − v_i‖²
    hq, h, xx2 = _mlp_outputs(q, k, w1_ptr, w2_ptr, pid, D, H, BH, DEPTH, PREC)
    if RESIDUAL:
        nq, _sigma_q = _normalise(hq, eps, D)
        hq = q + nq
    _store_row(y_ptr, pid, hq, B, D)
    g_last, _n, _sigma, _g = _last_gradient(h, k, v, eps, D, RESIDUAL)

    wd, wc = d, c
    if CLIP:
        scale, _xx1, _gg1, _gg2, _rho, _r, _tau_r = _clip_scale(k, g_last, xx2, w1_ptr, w2_ptr, pid, max_norm,
                                                                 D, H, BH, DEPTH, PREC)
        wd, wc = d * scale, c * scale

    # the update S' = η̄ S − X_lᵀ diag(w^d) G_l, W' = β W + γ S − X_lᵀ diag(w^c) G_l, tile by tile
    kt = tl.trans(k)
    if DEPTH == 2:
        for j in range(0, H, BH):
            w1, w2 = _load_tile(w1_ptr, w2_ptr, pid, j, D, H, BH)
            s1, s2 = _load_tile(s1_ptr, s2_ptr, pid, j, D, H, BH)
            x2, _ds1, _dds1, _back, g1 = _key_tile(k, g_last, w1, w2, PREC)
            x2t = tl.trans(x2)
            _store_tile(ns1_ptr, ns2_ptr, pid, j, eta * s1 - _dot(kt, wd[:, None] * g1, PREC),
                        eta * s2 - _dot(x2t, wd[:, None] * g_last, PREC), D, H, BH)
            _store_tile(nw1_ptr, nw2_ptr, pid, j, beta * w1 + gamma * s1 - _dot(kt, wc[:, None] * g1, PREC),
                        beta * w2 + gamma * s2 - _dot(x2t, wc[:, None] * g_last, PREC), D, H, BH)
    else:
        w1 = _load_row(w1_ptr, pid, D, H)
        s1 = _load_row(s1_ptr, pid, D, H)
        _store_row(ns1_ptr, pid, eta * s1 - _dot(kt, wd[:, None] * g_last, PREC), D, H)
        _store_row(nw1_ptr, pid, beta * w1 + gamma * s1 - _dot(kt, wc[:, None] * g_last, PREC), D, H)


@triton.jit
def _chunk_forward_kernel(
    q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
    const_ptr, y_ptr, nw1_ptr, nw2_ptr, ns1_ptr, ns2_ptr,
    B: tl.constexpr, D: tl.constexpr, H: tl.constexpr, BH: tl.constexpr, DEPTH: tl.constexpr,
    RESIDUAL: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
):
    _forward_chunk(tl.program_id(0).to(tl.int64), q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr,
                   gamma_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, const_ptr, y_ptr, nw1_ptr, nw2_ptr, ns1_ptr,
                   ns2_ptr, B, D, H, BH, DEPTH, RESIDUAL, CLIP, PREC)


@triton.jit
def _scan_forward_kernel(
    q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
    const_ptr, y_ptr, n_chunks, rows, slots,
    B: tl.constexpr, D: tl.constexpr, H: tl.constexpr, BH: tl.constexpr, DEPTH: tl.constexpr,
    RESIDUAL: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
):
    """Every chunk of a scan in one launch: row pid walks its chunks in order. The state tensors hold
    `slots` states (slots, rows, ·), slot 0 the start state on entry; chunk i reads slot i % slots and
    writes slot (i + 1) % slots: n_chunks + 1 slots keep every chunk-boundary state (what the recomputing
    backward needs), 2 alternate (inference)."""
    pid = tl.program_id(0).to(tl.int64)
    L2: tl.constexpr = H if DEPTH == 2 else D  # layer 2's input width (depth 1: its slots alias layer 1)
    layer1, layer2 = rows * D * H, rows * L2 * D
    for i in range(n_chunks):
        chunk = tl.cast(i, tl.int64)
        tokens, scalars = chunk * rows * B * D, chunk * rows
        read, write = chunk % slots, (chunk + 1) % slots
        _forward_chunk(pid, q_ptr + tokens, k_ptr + tokens, v_ptr + tokens, d_ptr + scalars * B,
                       c_ptr + scalars * B, eta_ptr + scalars, beta_ptr + scalars, gamma_ptr + scalars,
                       w1_ptr + read * layer1, w2_ptr + read * layer2, s1_ptr + read * layer1,
                       s2_ptr + read * layer2, const_ptr, y_ptr + tokens, w1_ptr + write * layer1,
                       w2_ptr + write * layer2, s1_ptr + write * layer1, s2_ptr + write * layer2,
                       B, D, H, BH, DEPTH, RESIDUAL, CLIP, PREC)
        tl.debug_barrier()  # the next chunk reads the state this one wrote, written by other threads


@triton.jit
def _x_bar(g, a, b, wd, wc, PREC: tl.constexpr):
    """X̄_l = −(w^d ⊙ G_l A_lᵀ + w^c ⊙ G_l B_lᵀ): the weighted sums' backward into the layer's input."""
    return -(wd[:, None] * _dot(g, tl.trans(a), PREC) + wc[:, None] * _dot(g, tl.trans(b), PREC))


@triton.jit
def _g1_bar(k, g1, a1, b1, wd, wc, clip_g1, PREC: tl.constexpr):
    """Ḡ_1 = −(w^d ⊙ X_1 A_1 + w^c ⊙ X_1 B_1) (+ the clipping term 2ρ̄‖X_1‖² G_1), with X_1 A_1, X_1 B_1."""
    xa1 = _dot(k, a1, PREC)
    xb1 = _dot(k, b1, PREC)
    return -(wd[:, None] * xa1 + wc[:, None] * xb1) + clip_g1[:, None] * g1, xa1, xb1


@triton.jit
def _kept(x, keep):
    """x, or zeros where the gradient horizon cuts (keep == 0): the start state's gradient is dropped."""
    return tl.where(keep != 0, x, 0.0)


@triton.jit
def _backward_chunk(
    pid, keep, q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, w2_ptr, s1_ptr,
    s2_ptr, const_ptr, gy_ptr, gnw1_ptr, gnw2_ptr, gns1_ptr, gns2_ptr,
    gq_ptr, gk_ptr, gv_ptr, gd_ptr, gc_ptr, geta_ptr, gbeta_ptr, ggamma_ptr, gw1_ptr, gw2_ptr, gs1_ptr,
    gs2_ptr,
    B: tl.constexpr, D: tl.constexpr, H: tl.constexpr, BH: tl.constexpr, DEPTH: tl.constexpr,
    RESIDUAL: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
):
    """The derivation of `chunk_step_reference` in four passes over the hidden tiles (one at depth 1):
    what needs a sum over the hidden dimension (M's outputs, w̄, X̄_1, X_2 A_2, Ḡ_2) is accumulated
    first, then each tile's own gradients are recomputed from those and written once (the start state's
    zeroed where `keep` is 0)."""
    eps, max_norm, q, k, v, d, c, eta, beta, gamma = _load_chunk(
        q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, const_ptr, pid, B, D)
    gy = _load_row(gy_ptr, pid, B, D)

    # pass 1: the MLP's outputs on q and k; the read's output gradient, G_L and the clipping scale
    hq, h, xx2 = _mlp_outputs(q, k, w1_ptr, w2_ptr, pid, D, H, BH, DEPTH, PREC)
    gq = tl.zeros_like(q)
    ghq = gy
    if RESIDUAL:  # y = q + LN(h_q)
        nq, sigq = _normalise(hq, eps, D)
        ghq = _norm_vjp(nq, sigq, gy, D)
        gq = gy
    g_last, n, sigma, g = _last_gradient(h, k, v, eps, D, RESIDUAL)
    wd, wc = d, c
    zero_rows = tl.sum(k, axis=1) * 0.0
    if CLIP:
        scale, xx1, gg1, gg2, sq, r, ratio = _clip_scale(k, g_last, xx2, w1_ptr, w2_ptr, pid, max_norm,
                                                         D, H, BH, DEPTH, PREC)
        wd, wc = d * scale, c * scale

    # pass 2: w̄^d, w̄^c and X̄_1 (sums over hidden), X_2 A_2 and X_2 B_2 (cotangents −A_l for w^d, −B_l
    # for w^c of the weighted sums X_lᵀ diag(w) G_l)
    gwd = zero_rows
    gwc = zero_rows
    gx1 = tl.zeros_like(k)
    if DEPTH == 2:
        xa2 = tl.zeros_like(k)
        xb2 = tl.zeros_like(k)
        for j in range(0, H, BH):
            w1, w2 = _load_tile(w1_ptr, w2_ptr, pid, j, D, H, BH)
            a1, a2 = _load_tile(gns1_ptr, gns2_ptr, pid, j, D, H, BH)  # A_l: gradient of the new momentum
            b1, b2 = _load_tile(gnw1_ptr, gnw2_ptr, pid, j, D, H, BH)  # B_l: gradient of the new weights
            x2, _ds1, _dds1, _back, g1 = _key_tile(k, g_last, w1, w2, PREC)
            xa1, xb1 = _dot(k, a1, PREC), _dot(k, b1, PREC)
            gwd -= tl.sum(xa1 * g1, axis=1)
            gwc -= tl.sum(xb1 * g1, axis=1)
            gx1 += _x_bar(g1, a1, b1, wd, wc, PREC)
            xa2 += _dot(x2, a2, PREC)
            xb2 += _dot(x2, b2, PREC)
        gwd -= tl.sum(xa2 * g_last, axis=1)
        gwc -= tl.sum(xb2 * g_last, axis=1)
        g_last_bar = -(wd[:, None] * xa2 + wc[:, None] * xb2)
    else:
        a1 = _load_row(gns1_ptr, pid, D, H)
        b1 = _load_row(gnw1_ptr, pid, D, H)
        g_last_bar, xa1, xb1 = _g1_bar(k, g_last, a1, b1, wd, wc, zero_rows, PREC)
        gwd = -tl.sum(xa1 * g_last, axis=1)
        gwc = -tl.sum(xb1 * g_last, axis=1)
        gx1 = _x_bar(g_last, a1, b1, wd, wc, PREC)
    clip_g1 = zero_rows
    clip_x2 = zero_rows
    if CLIP:  # through s = min(1, τ/r), r = √max(ρ, 1e-30)
        gratio = tl.where(ratio <= 1.0, gwd * d + gwc * c, 0.0)
        gsq = tl.where(sq >= 1e-30, -gratio * ratio / (2.0 * r * r), 0.0)
        gx1 += (2.0 * gsq * gg1)[:, None] * k
        clip_g1 = 2.0 * gsq * xx1
        if DEPTH == 2:
            clip_x2 = 2.0 * gsq * gg2
            g_last_bar += (2.0 * gsq * xx2)[:, None] * g_last
        else:
            g_last_bar += clip_g1[:, None] * g_last
        gwd, gwc = gwd * scale, gwc * scale
    rb = tl.arange(0, B)
    tl.store(gd_ptr + pid * B + rb, gwd)
    tl.store(gc_ptr + pid * B + rb, gwc)

    # pass 3: the G chain G_1 = (G_2 W_2ᵀ) ⊙ SiLU'(z_1) into Ḡ_2 (a sum over hidden)
    if DEPTH == 2:
        for j in range(0, H, BH):
            w1, w2 = _load_tile(w1_ptr, w2_ptr, pid, j, D, H, BH)
            a1, _a2 = _load_tile(gns1_ptr, gns2_ptr, pid, j, D, H, BH)
            b1, _b2 = _load_tile(gnw1_ptr, gnw2_ptr, pid, j, D, H, BH)
            _x2, ds1, _dds1, _back, g1 = _key_tile(k, g_last, w1, w2, PREC)
            gg1_bar, _xa1, _xb1 = _g1_bar(k, g1, a1, b1, wd, wc, clip_g1, PREC)
            g_last_bar += _dot(gg1_bar * ds1, w2, PREC)

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

    # pass 4: each tile's gradients, written once: the linear state terms (S' = η̄ S − ..., W' = β W + γ S
    # − ...), the read's backward, the G chain's and the MLP's on k with X̄_l added at each layer's input
    if DEPTH == 2:
        geta = 0.0 * eta
        gbeta = 0.0 * eta
        ggamma = 0.0 * eta
        for j in range(0, H, BH):
            w1, w2 = _load_tile(w1_ptr, w2_ptr, pid, j, D, H, BH)
            s1, s2 = _load_tile(s1_ptr, s2_ptr, pid, j, D, H, BH)
            a1, a2 = _load_tile(gns1_ptr, gns2_ptr, pid, j, D, H, BH)
            b1, b2 = _load_tile(gnw1_ptr, gnw2_ptr, pid, j, D, H, BH)
            geta += _sum_all(s1 * a1) + _sum_all(s2 * a2)
            gbeta += _sum_all(w1 * b1) + _sum_all(w2 * b2)
            ggamma += _sum_all(s1 * b1) + _sum_all(s2 * b2)
            _store_tile(gs1_ptr, gs2_ptr, pid, j, _kept(eta * a1 + gamma * b1, keep),
                        _kept(eta * a2 + gamma * b2, keep), D, H, BH)

            xq2, dsq1, _ddsq1 = _silu_parts(_dot(q, w1, PREC))  # the read
            gw2 = beta * b2 + _dot(tl.trans(xq2), ghq, PREC)
            ghq1 = _dot(ghq, tl.trans(w2), PREC) * dsq1
            gw1 = beta * b1 + _dot(tl.trans(q), ghq1, PREC)
            gq += _dot(ghq1, tl.trans(w1), PREC)

            x2, ds1, dds1, back, g1 = _key_tile(k, g_last, w1, w2, PREC)  # the write
            gg1_bar, _xa1, _xb1 = _g1_bar(k, g1, a1, b1, wd, wc, clip_g1, PREC)
            gw2 += _dot(tl.trans(gg1_bar * ds1), g_last, PREC) + _dot(tl.trans(x2), gh, PREC)
            gx2 = _x_bar(g_last, a2, b2, wd, wc, PREC) + clip_x2[:, None] * x2
            gz1 = gg1_bar * back * dds1 + (_dot(gh, tl.trans(w2), PREC) + gx2) * ds1
            gw1 += _dot(tl.trans(k), gz1, PREC)
            gk += _dot(gz1, tl.trans(w1), PREC)
            _store_tile(gw1_ptr, gw2_ptr, pid, j, _kept(gw1, keep), _kept(gw2, keep), D, H, BH)
    else:
        w1 = _load_row(w1_ptr, pid, D, H)
        s1 = _load_row(s1_ptr, pid, D, H)
        geta = _sum_all(s1 * a1)
        gbeta = _sum_all(w1 * b1)
        ggamma = _sum_all(s1 * b1)
        _store_row(gs1_ptr, pid, _kept(eta * a1 + gamma * b1, keep), D, H)
        gw1 = beta * b1 + _dot(tl.trans(q), ghq, PREC) + _dot(tl.trans(k), gh, PREC)
        gq += _dot(ghq, tl.trans(w1), PREC)
        gk += _dot(gh, tl.trans(w1), PREC)
        _store_row(gw1_ptr, pid, _kept(gw1, keep), D, H)
    tl.store(geta_ptr + pid, geta)
    tl.store(gbeta_ptr + pid, gbeta)
    tl.store(ggamma_ptr + pid, ggamma)
    _store_row(gq_ptr, pid, gq, B, D)
    _store_row(gk_ptr, pid, gk + gx1, B, D)


@triton.jit
def _chunk_backward_kernel(
    q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
    const_ptr, gy_ptr, gnw1_ptr, gnw2_ptr, gns1_ptr, gns2_ptr,
    gq_ptr, gk_ptr, gv_ptr, gd_ptr, gc_ptr, geta_ptr, gbeta_ptr, ggamma_ptr, gw1_ptr, gw2_ptr, gs1_ptr,
    gs2_ptr,
    B: tl.constexpr, D: tl.constexpr, H: tl.constexpr, BH: tl.constexpr, DEPTH: tl.constexpr,
    RESIDUAL: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
):
    _backward_chunk(tl.program_id(0).to(tl.int64), 1, q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr,
                    gamma_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, const_ptr, gy_ptr, gnw1_ptr, gnw2_ptr,
                    gns1_ptr, gns2_ptr, gq_ptr, gk_ptr, gv_ptr, gd_ptr, gc_ptr, geta_ptr, gbeta_ptr,
                    ggamma_ptr, gw1_ptr, gw2_ptr, gs1_ptr, gs2_ptr, B, D, H, BH, DEPTH, RESIDUAL, CLIP, PREC)


@triton.jit
def _scan_backward_kernel(
    q_ptr, k_ptr, v_ptr, d_ptr, c_ptr, eta_ptr, beta_ptr, gamma_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
    const_ptr, gy_ptr, keep_ptr, gw1_ptr, gw2_ptr, gs1_ptr, gs2_ptr,
    gq_ptr, gk_ptr, gv_ptr, gd_ptr, gc_ptr, geta_ptr, gbeta_ptr, ggamma_ptr, n_chunks, rows,
    B: tl.constexpr, D: tl.constexpr, H: tl.constexpr, BH: tl.constexpr, DEPTH: tl.constexpr,
    RESIDUAL: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
):
    """Every chunk's backward in one launch, last chunk first. The states are `_scan_forward_kernel`'s
    boundary states; the state gradients (2, rows, ·) alternate: slot 0 holds the end state's gradient on
    entry, chunk i reads the slot its successor wrote and writes the other (zeroed where keep[i] is 0);
    the start state's gradient is left in slot n_chunks % 2."""
    pid = tl.program_id(0).to(tl.int64)
    L2: tl.constexpr = H if DEPTH == 2 else D
    layer1, layer2 = rows * D * H, rows * L2 * D
    for step in range(n_chunks):
        chunk = tl.cast(n_chunks - 1 - step, tl.int64)
        read, write = step % 2, 1 - step % 2
        tokens, scalars = chunk * rows * B * D, chunk * rows
        _backward_chunk(pid, tl.load(keep_ptr + chunk), q_ptr + tokens, k_ptr + tokens, v_ptr + tokens,
                        d_ptr + scalars * B, c_ptr + scalars * B, eta_ptr + scalars, beta_ptr + scalars,
                        gamma_ptr + scalars, w1_ptr + chunk * layer1, w2_ptr + chunk * layer2,
                        s1_ptr + chunk * layer1, s2_ptr + chunk * layer2, const_ptr, gy_ptr + tokens,
                        gw1_ptr + read * layer1, gw2_ptr + read * layer2, gs1_ptr + read * layer1,
                        gs2_ptr + read * layer2, gq_ptr + tokens, gk_ptr + tokens, gv_ptr + tokens,
                        gd_ptr + scalars * B, gc_ptr + scalars * B, geta_ptr + scalars, gbeta_ptr + scalars,
                        ggamma_ptr + scalars, gw1_ptr + write * layer1, gw2_ptr + write * layer2,
                        gs1_ptr + write * layer1, gs2_ptr + write * layer2, B, D, H, BH, DEPTH, RESIDUAL,
                        CLIP, PREC)
        tl.debug_barrier()  # the previous chunk reads the state gradient this one wrote


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


def dot_precision(x: Tensor) -> str:
    """"tf32" for float32 on CUDA when torch's float32 matmuls use TF32 (`train.fp32_matmul: tf32` sets
    torch.backends.cuda.matmul.fp32_precision), so the kernel rounds as the torch path does; else "ieee"."""
    tf32 = x.dtype == torch.float32 and x.device.type == "cuda"
    return "tf32" if tf32 and torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


def hidden_tile(depth: int, hidden: int) -> int:
    """Hidden units a program walks at a time: the whole layer at depth 1, BLOCK_HIDDEN tiles at depth 2."""
    return min(hidden, BLOCK_HIDDEN) if depth == 2 else hidden


@functools.lru_cache(maxsize=64)
def _constants(device: torch.device, dtype: torch.dtype, max_norm: float) -> Tensor:
    """The kernels' constants (eps, max_norm) as a tensor on `device`, made once: a tensor built from host
    values per call is a blocking host-to-device copy, which makes the host wait for the GPU before every
    chunk, so the GPU then idles while the host prepares the next one."""
    return torch.tensor([NORM_EPS, max_norm], dtype=dtype, device=device)


def _prepare(opts: ScanOptions, tensors: tuple[Tensor, ...]) -> tuple[list[Tensor], Tensor, dict]:
    """Contiguous inputs, the constants tensor and the kernels' static arguments."""
    tensors = [t.contiguous() for t in tensors]
    b, dim, hidden = _check(opts, tensors)
    max_norm = 0.0 if opts.max_grad_norm is None else opts.max_grad_norm
    consts = _constants(tensors[0].device, tensors[0].dtype, max_norm)
    meta = dict(B=b, D=dim, H=hidden, BH=hidden_tile(opts.n_layers, hidden), DEPTH=opts.n_layers,
                RESIDUAL=opts.residual_norm, CLIP=opts.max_grad_norm is not None,
                PREC=dot_precision(tensors[0]), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return tensors, consts, meta


def _layer_pair(tensors: list[Tensor], depth: int) -> list[Tensor]:
    """W_1, W_2, S_1, S_2 (layer-2 slots filled with layer 1's for depth 1; the kernel never reads them)."""
    weights, momentum = tensors[:depth], tensors[depth:]
    return [weights[0], weights[-1], momentum[0], momentum[-1]]


# The launch (hidden tile, warps) that fitted each (kernel, specialisation, device): found once by _launch.
_FITTING_LAUNCH: dict[tuple, dict[str, int]] = {}


def _smaller_launch(meta: dict) -> dict | None:
    """The next launch to try after one that needs more shared memory than the card has: the hidden tile
    halved, then the warps (their shared memory for reductions and layout changes grows with them);
    None when neither can shrink."""
    if meta["DEPTH"] == 2 and meta["BH"] // 2 >= MIN_BLOCK:
        return {**meta, "BH": meta["BH"] // 2}
    if meta["num_warps"] // 2 >= MIN_WARPS:
        return {**meta, "num_warps": meta["num_warps"] // 2}
    return None


def _launch(kernel, rows: int, meta: dict, *args: Tensor) -> None:
    """Run `kernel` on one program per row, shrinking the launch (`_smaller_launch`) until the
    specialisation fits the device's shared memory. Why: what a kernel needs is known only once it is
    compiled, and cards differ (the paper shape's backward fits an H100 with 8 warps, an A100 with 4); a
    smaller tile is the same arithmetic in more, smaller steps, and fewer warps the same program on fewer
    threads."""
    key = (id(kernel), args[0].device, *meta.items())  # meta's order is _prepare's: no sorting
    launch = {**meta, **_FITTING_LAUNCH.get(key, {})}
    while True:
        try:
            kernel[(rows,)](*args, **launch)
        except OutOfResources:
            launch = _smaller_launch(launch)
            if launch is None:
                raise
            continue
        _FITTING_LAUNCH[key] = {"BH": launch["BH"], "num_warps": launch["num_warps"]}
        return


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
        _launch(_chunk_forward_kernel, y.shape[0], meta,
                *tensors[:8], *_layer_pair(state, depth), consts, y, *out_pairs)
        ctx.opts = opts
        ctx.save_for_backward(*tensors)
        return (y, *new_state)

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, *grad_end: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        grads = triton_chunk_step_backward(ctx.opts, *saved[:8], saved[8:], grad_y, grad_end)
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:], strict=True)))


def triton_chunk_step_backward(
    opts: ScanOptions, q: Tensor, k: Tensor, v: Tensor, d: Tensor, c: Tensor, eta_prod: Tensor,
    beta: Tensor, gamma: Tensor, state: tuple[Tensor, ...], grad_y: Tensor | None,
    grad_end: tuple[Tensor | None, ...],
) -> list[Tensor]:
    """The backward kernel alone, with `chunk_step_backward`'s signature and outputs: the gradients of
    every input and state tensor (a None output gradient counts as zeros). It needs no forward before
    it, so the recomputing scan calls it directly."""
    tensors, consts, meta = _prepare(opts, (q, k, v, d, c, eta_prod, beta, gamma, *state))
    depth = opts.n_layers
    state = tensors[8:]
    grad_y = torch.zeros_like(tensors[0]) if grad_y is None else grad_y.contiguous()
    grad_end = [torch.zeros_like(s) if g is None else g.contiguous()
                for s, g in zip(state, grad_end, strict=True)]
    grads = [torch.empty_like(t) for t in tensors]
    _launch(_chunk_backward_kernel, grad_y.shape[0], meta,
            *tensors[:8], *_layer_pair(state, depth), consts, grad_y, *_layer_pair(grad_end, depth),
            *grads[:8], *_layer_pair(grads[8:], depth))
    return grads


def _prepare_scan(opts: ScanOptions, inputs: Sequence[Tensor], state: Sequence[Tensor]
                  ) -> tuple[list[Tensor], Tensor, dict, int, int]:
    """`_prepare` for a whole scan: inputs chunk-major (n_chunks, N, ·), checked on their first chunk."""
    inputs = [t.contiguous() for t in inputs]
    n_chunks = inputs[0].shape[0]
    if any(t.shape[0] != n_chunks for t in inputs):
        raise ValueError(f"the scan's inputs disagree on their number of chunks: "
                         f"{[t.shape[0] for t in inputs]}")
    _, consts, meta = _prepare(opts, (*(t[0] for t in inputs), *state))
    return inputs, consts, meta, n_chunks, inputs[0].shape[1]


def triton_scan(opts: ScanOptions, inputs: Sequence[Tensor], state: Sequence[Tensor],
                keep_boundaries: bool = True) -> tuple[Tensor, list[Tensor]]:
    """Every chunk of a scan in one launch (one program per row walks the chunks; the state stays on the
    device between them, and the host launches once instead of once per chunk). inputs: the 8 chunk-major
    scan inputs (`NeuralMemory.chunk_inputs`); state: the start state, 2L tensors (N, ·). Returns y
    (n_chunks, N, b, d) and per state tensor its boundary states (n_chunks + 1, N, ·), slot i the state
    at chunk i's start and the last the end state; without `keep_boundaries` only the end state (1, N, ·)."""
    inputs, consts, meta, n_chunks, rows = _prepare_scan(opts, inputs, state)
    slots = n_chunks + 1 if keep_boundaries else 2
    states = [s.new_empty(slots, *s.shape) for s in state]
    for buffer, start in zip(states, state, strict=True):
        buffer[0].copy_(start)
    y = torch.empty_like(inputs[0])
    _launch(_scan_forward_kernel, rows, meta, *inputs, *_layer_pair(states, opts.n_layers), consts, y,
            n_chunks, rows, slots)
    return y, states if keep_boundaries else [s[n_chunks % 2 : n_chunks % 2 + 1] for s in states]


@functools.lru_cache(maxsize=256)
def _keep_flags(device: torch.device, dtype: torch.dtype, first_chunk: int, n_chunks: int,
                opts: ScanOptions) -> Tensor:
    """1 where chunk i's start state passes its gradient on, 0 where the gradient horizon cuts; made once
    per scan position (a host-to-device copy per call would block the host)."""
    return torch.tensor([0.0 if opts.cuts_before(first_chunk + i) else 1.0 for i in range(n_chunks)],
                        dtype=dtype, device=device)


def triton_scan_backward(opts: ScanOptions, first_chunk: int, inputs: Sequence[Tensor],
                         boundaries: Sequence[Tensor], grad_y: Tensor, grad_end: Sequence[Tensor]
                         ) -> tuple[list[Tensor], list[Tensor]]:
    """The backward of `triton_scan` in one launch, last chunk first, with the gradient horizon's cuts of
    a scan starting at global chunk `first_chunk`. Returns the gradients of the 8 inputs (chunk-major)
    and of the start state."""
    inputs, consts, meta, n_chunks, rows = _prepare_scan(opts, inputs, [b[0] for b in boundaries])
    boundaries = [b.contiguous() for b in boundaries]
    grad_state = [g.new_empty(2, *g.shape) for g in grad_end]
    for buffer, end in zip(grad_state, grad_end, strict=True):
        buffer[0].copy_(end)
    grads = [torch.empty_like(t) for t in inputs]
    keep = _keep_flags(inputs[0].device, inputs[0].dtype, first_chunk, n_chunks, opts)
    depth = opts.n_layers
    _launch(_scan_backward_kernel, rows, meta, *inputs, *_layer_pair(boundaries, depth), consts,
            grad_y.contiguous(), keep, *_layer_pair(grad_state, depth), *grads, n_chunks, rows)
    return grads, [g[n_chunks % 2] for g in grad_state]


def triton_chunk_step(
    opts: ScanOptions, q: Tensor, k: Tensor, v: Tensor, d: Tensor, c: Tensor,
    eta_prod: Tensor, beta: Tensor, gamma: Tensor, *state: Tensor,
) -> tuple[Tensor, ...]:
    """Drop-in for `memory_chunk_step` (same signature and outputs), run by the Triton kernels."""
    return TritonChunkStep.apply(opts, q, k, v, d, c, eta_prod, beta, gamma, *state)
