"""A slow, obviously-correct reference for NeuralMemory: the per-token recurrence, autograd per token.

Uses only the module's parameters, never its helper functions. Semantics (DESIGN §2): inside a chunk of
b tokens every gradient is taken at the chunk-start weights, and the queries read the chunk-start
weights; then token by token  S ← η S − θ ∇ℓ,  W ← (1 − α) W + S.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_mlp(weights: list[Tensor], x: Tensor) -> Tensor:
    """weights[l]: (B, H, d_in, d_out); x: (B, H, d). SiLU between layers, none after the last."""
    for i, w in enumerate(weights):
        x = torch.einsum("bhi,bhio->bho", x, w)
        if i < len(weights) - 1:
            x = x * torch.sigmoid(x)
    return x


def reference_memory(mem, x: Tensor, state=None, grads_at_chunk_start: bool = True):
    """Returns (out (B,T,dim), weights, momentum, conv history). Feed `state` as the tuple returned."""
    B, T, _ = x.shape
    H, d, K, b = mem.heads, mem.head_dim, mem.conv_kernel, mem.chunk_size
    raw = torch.cat([x @ mem.to_q.weight.T, x @ mem.to_k.weight.T, x @ mem.to_v.weight.T], dim=-1)
    history = torch.zeros(B, K - 1, raw.shape[-1], dtype=x.dtype) if state is None else state[2]
    padded = torch.cat([history, raw], dim=1)
    kernel = mem.conv.weight[:, 0, :]  # (channels, K)
    conv = torch.stack([(padded[:, t : t + K] * kernel.T).sum(1) for t in range(T)], dim=1)
    conv = conv * torch.sigmoid(conv)
    q, k, v = (c.reshape(B, T, H, d) for c in conv.split(H * d, dim=-1))
    q = q / q.pow(2).sum(-1, keepdim=True).sqrt()
    k = k / k.pow(2).sum(-1, keepdim=True).sqrt()
    gates = x @ mem.to_gates.weight.T + mem.to_gates.bias
    theta = mem.theta_max * torch.sigmoid(gates[..., :H])
    eta = torch.sigmoid(gates[..., H : 2 * H])
    alpha = torch.sigmoid(gates[..., 2 * H :])

    if state is None:
        weights = [w.unsqueeze(0).expand(B, *w.shape) for w in mem.init_weights]
        momentum = [torch.zeros_like(w) for w in weights]
    else:
        weights, momentum = list(state[0]), list(state[1])
    ys = []
    for t in range(T):
        if t % b == 0:
            chunk_start = weights
        ys.append(reference_mlp(chunk_start, q[:, t]))
        at = chunk_start if grads_at_chunk_start else weights
        at = [w if w.requires_grad else w.detach().requires_grad_() for w in at]
        loss = (reference_mlp(at, k[:, t]) - v[:, t]).pow(2).sum()  # Σ over (batch, head) pairs
        grads = torch.autograd.grad(loss, at, create_graph=True)
        th, et, al = (g[:, t, :, None, None] for g in (theta, eta, alpha))
        momentum = [et * s - th * u for s, u in zip(momentum, grads)]
        weights = [(1 - al) * w + s for w, s in zip(weights, momentum)]
    y = torch.stack(ys, dim=1)  # (B, T, H, d)
    y = y / (y.pow(2).mean(-1, keepdim=True) + mem.out_norm.eps).sqrt() * mem.out_norm.weight
    out = F.linear(y.reshape(B, T, H * d), mem.to_out.weight)
    return out, weights, momentum, padded[:, padded.shape[1] - (K - 1) :]
