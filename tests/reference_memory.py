"""A slow, obviously-correct reference for `titans.memory.NeuralMemory` (docs/DESIGN.md §2).

It reads only the module's *parameters* and a few hyper-parameters (heads, head_dim, depth, chunk size,
conv kernel, theta_max) and re-derives everything else token by token, in the dtype of its inputs
(the tests use float64):

- projections and the depthwise causal conv written as explicit sums over the kernel taps;
- gates as plain sigmoids;
- the memory recurrence one token at a time: the gradient of each token's loss is taken with
  `torch.autograd.grad(..., create_graph=True)` at the chunk-start weights, then
  `S ← η S − θ u`, `W ← (1 − α) W + S`; the queries of a chunk read the chunk-start weights;
- RMSNorm per head and the output projection written out by hand.

None of the fast path's helpers (memory_mlp, weighted_loss_grads, chunk_coefficients, scan, project,
gates, output) is used. Heads and batch rows are independent memories; their per-token losses are summed
before `autograd.grad`, which gives each (batch, head) weight tensor exactly the gradient of its own loss
because no loss term touches another row's weights.

`grads_at_chunk_start=False` and `reads_at_chunk_start=False` are deliberately *wrong* variants (gradients /
retrieval at the running weights instead of the chunk-start weights) that the tests use to prove they can
fail.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _silu(z: Tensor) -> Tensor:
    return z * torch.sigmoid(z)


def _mlp(weights: list[Tensor], z: Tensor, residual_norm: bool) -> Tensor:
    """Memory MLP for every (batch, head) at once: weights[l] (B, H, d_in, d_out), z (B, H, d).

    With residual_norm: z + LayerNorm(MLP(z)), the LayerNorm without parameters, eps 1e-3.
    """
    h = z
    for layer, w in enumerate(weights):
        h = torch.einsum("bhi,bhio->bho", h, w)
        if layer < len(weights) - 1:
            h = _silu(h)
    if not residual_norm:
        return h
    centered = h - h.mean(-1, keepdim=True)
    return z + centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-3)


def reference_memory(
    mem,
    x: Tensor,
    state=None,
    grads_at_chunk_start: bool = True,
    reads_at_chunk_start: bool = True,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """Per-token recurrence. Returns (out (B, T, dim), weights, momentum, conv history).

    `state`, if given, is a `(weights, momentum, conv)` tuple (e.g. `result[1:]` of a previous call) or
    anything with `.weights`, `.momentum` (lists of (B, H, d_in, d_out)) and `.conv` ((B, K-1, 3·H·d) or
    None).
    """
    if state is not None and not hasattr(state, "weights"):
        weights, momentum, conv = state
    elif state is not None:
        weights, momentum, conv = state.weights, state.momentum, state.conv
    else:
        weights = momentum = conv = None
    B, T, _ = x.shape
    H, d, L = mem.heads, mem.head_dim, mem.depth
    K, b = mem.conv_kernel, mem.chunk_size
    inner = H * d

    # 1. raw projections, explicit causal depthwise conv over the history, SiLU.
    raw = torch.cat([x @ mem.to_q.weight.T, x @ mem.to_k.weight.T, x @ mem.to_v.weight.T], dim=-1)
    history = torch.zeros(B, K - 1, 3 * inner, dtype=raw.dtype) if conv is None else conv.to(raw.dtype)
    full = torch.cat([history, raw], dim=1)  # time t lives at index t + K - 1
    conv_w = mem.conv.weight[:, 0, :]  # (3·inner, K)
    mixed_rows = []
    for t in range(T):
        acc = torch.zeros(B, 3 * inner, dtype=raw.dtype)
        for j in range(K):
            # raw_{t-K+1+j} sits at index (t - K + 1 + j) + (K - 1) = t + j
            acc = acc + conv_w[:, j] * full[:, t + j]
        mixed_rows.append(_silu(acc))
    mixed = torch.stack(mixed_rows, dim=1)  # (B, T, 3·inner)
    q = mixed[..., :inner].reshape(B, T, H, d)
    k = mixed[..., inner : 2 * inner].reshape(B, T, H, d)
    v = mixed[..., 2 * inner :].reshape(B, T, H, d)
    q = q / q.pow(2).sum(-1, keepdim=True).sqrt()
    k = k / k.pow(2).sum(-1, keepdim=True).sqrt()
    conv_end = full[:, full.shape[1] - (K - 1) :]

    # 2. gates.
    g = x @ mem.to_gates.weight.T + mem.to_gates.bias
    theta = mem.theta_max * torch.sigmoid(g[..., :H])  # (B, T, H)
    eta = torch.sigmoid(g[..., H : 2 * H])
    alpha = torch.sigmoid(g[..., 2 * H :])

    # 3./4. the memory, token by token.
    if weights is None:
        W = [w.to(x.dtype).unsqueeze(0).expand(B, *w.shape) for w in mem.init_weights]
        S = [torch.zeros_like(w) for w in W]
    else:
        W = [w.to(x.dtype) for w in weights]
        S = [s.to(x.dtype) for s in momentum]
    assert len(W) == L

    with torch.enable_grad():
        # autograd.grad needs the weights in a graph; if nothing upstream requires grad, make them leaves.
        if not W[0].requires_grad:
            W = [w.detach().requires_grad_(True) for w in W]
        ys = []
        for start in range(0, T, b):
            W_start = W
            for t in range(start, min(start + b, T)):
                read_w = W_start if reads_at_chunk_start else W
                ys.append(_mlp(read_w, q[:, t], mem.residual_norm))
                grad_w = W_start if grads_at_chunk_start else W
                loss = (_mlp(grad_w, k[:, t], mem.residual_norm) - v[:, t]).pow(2).sum()
                u = torch.autograd.grad(loss, grad_w, create_graph=True)
                if mem.scan_options.max_grad_norm is not None:  # clip this token's gradient norm
                    norm = torch.sqrt(sum(ui.pow(2).sum((-1, -2)) for ui in u))[..., None, None]
                    u = [ui * torch.clamp(mem.scan_options.max_grad_norm / norm, max=1.0) for ui in u]
                th = theta[:, t, :, None, None]
                et = eta[:, t, :, None, None]
                al = alpha[:, t, :, None, None]
                S = [et * s - th * ui for s, ui in zip(S, u)]
                W = [(1 - al) * w + s for w, s in zip(W, S)]
        y = torch.stack(ys, dim=1)  # (B, T, H, d)

    # 5. per-head RMSNorm, heads concatenated, output projection.
    eps = mem.out_norm.eps
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps) * mem.out_norm.weight
    out = y.reshape(B, T, inner) @ mem.to_out.weight.T
    return out, W, S, conv_end
