"""Attention for the Titans blocks: RoPE, sliding-window causal attention with persistent-memory and
long-term-memory tokens, and the `Attention` module used by MAC / MAG / MAL / SWA.

Key layout seen by a query at position t (docs/DESIGN.md §3):

    [persistent tokens (always visible) ‖ memory tokens (all visible, or causal) ‖ sequence t-w+1 .. t]

The sequence keys may start before the first query (a sequence shard's halo, a streaming cache): the
queries are the last positions, and the positions before them are keys only.

Two implementations of the same maths:

* a plain torch path (any device / dtype, differentiable) that works query-block by query-block, so
  memory is O(T·(block + w)) and a T×T mask is never built;
* a flash-attn path (CUDA, fp16/bf16, when `flash_attn` is installed): flash-attn handles the sequence
  part (window_size=(w-1, 0)) and the memory parts; the parts are merged through their log-sum-exps;
* a FlexAttention path (CUDA without flash-attn): every key kind in one call of torch's compiled
  flex_attention, the layout above as its block mask, so a stock torch build gets a fused kernel too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

try:  # optional GPU extra (`pip install .[gpu]`)
    from flash_attn import flash_attn_func as _flash_attn_func
except (ImportError, OSError):  # not installed, or built against another CUDA/torch
    _flash_attn_func = None

# Module-level so tests can substitute a pure-torch stand-in and exercise the flash path on CPU.
flash_attn_func: Callable | None = _flash_attn_func

try:  # in torch since 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None
# None turns the FlexAttention path off (bench/gpu_step.py --no-flex); its devices: CUDA, where it is
# compiled into one fused kernel. Tests add "cpu", where torch runs it unfused and forward-only.
flex_attention_func: Callable | None = flex_attention
FLEX_DEVICES: tuple[str, ...] = ("cuda",)
# Shorter inputs (streaming steps, short segments) stay on the torch path: below one mask block fusing
# saves little, and each new length would be another compile.
FLEX_MIN_LENGTH = 128

DEFAULT_BLOCK_SIZE = 256


# ----------------------------------------------------------------------------------------------- RoPE


def rope_cos_sin(
    positions: Tensor, head_dim: int, base: float, dtype: torch.dtype, device: torch.device | str | None
) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape positions.shape + (head_dim,) for the rotate-half convention.

    Angles are computed in float32 (float64 when asked for float64) and only then cast, because
    bf16 angles at positions in the thousands would be badly rounded.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    exponents = torch.arange(0, head_dim, 2, dtype=compute_dtype, device=device) / head_dim
    inv_freq = base**-exponents
    angles = positions.to(device=device, dtype=compute_dtype)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, d) by position; cos/sin are (T, d) (or anything broadcastable).

    Pairs (i, i + d/2) are rotated together ("rotate half"), as in GPT-NeoX / Llama.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


# -------------------------------------------------------------------------------- attention helpers


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    out_*: (..., T, d) normalised outputs; lse_*: (..., T) log-sum-exp of the scaled scores.
    Returns (out, lse). Softmax over the union is a convex mix of the two partial softmaxes with
    weights exp(lse_x - lse), which is computed stably. One of the two sets may be empty for a
    query (lse = -inf); then the other set's output is returned unchanged.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # Guard the both-empty case (-inf - -inf = nan): both weights become exp(-inf) = 0.
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return w_a * out_a + w_b * out_b, lse


def _dense_attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Unmasked attention of q (B, H, T, d) over a few keys (B, H, C, d), returning (out, lse).

    Used for the always-visible persistent/memory tokens on the flash path, where C is small
    (hundreds), so a (T, C) score matrix is cheap. Half precision is upcast to float32.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(compute))
    return out, lse


def _context_kv(
    q: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    extra_k: Tensor | None,
    extra_v: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Concatenate the always-visible keys/values: [prefix (broadcast over batch) ‖ extra]."""
    B = q.shape[0]
    ks, vs = [], []
    if prefix_k is not None:
        ks.append(prefix_k.to(q.dtype).unsqueeze(0).expand(B, -1, -1, -1))
        vs.append(prefix_v.to(q.dtype).unsqueeze(0).expand(B, -1, -1, -1))
    if extra_k is not None:
        ks.append(extra_k.to(q.dtype))
        vs.append(extra_v.to(q.dtype))
    if not ks:
        return None, None
    if len(ks) == 1:
        return ks[0], vs[0]
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


# --------------------------------------------------------------------------------------- torch path


def _torch_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None,
    ctx_k: Tensor | None,
    ctx_v: Tensor | None,
    causal_k: Tensor | None,
    causal_v: Tensor | None,
    block_size: int,
) -> Tensor:
    """Reference-quality attention on any device, one block of queries at a time.

    A query block [s, e) (at key positions [s + o, e + o), o = Tk − Tq) needs sequence keys
    [s + o − w + 1, e + o) only, so each block builds a (e − s) × (ctx + causal + e − s + w − 1) boolean
    mask; nothing is O(T²) unless window is None, where each block still only needs (block × Tk).
    """
    B, H, T, d = q.shape
    offset = k.shape[2] - T  # earlier keys without queries (a halo, a cache)
    scale = 1.0 / math.sqrt(d)
    if window is not None and window >= k.shape[2]:
        window = None  # every key in the causal past is within the window
    if window is None and ctx_k is None and causal_k is None and offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    # Full attention with earlier keys (a sequence shard's halo of every earlier row): a block's masked
    # SDPA keeps its (block × Tk) probabilities for backward, more than the shard's own attention would;
    # recomputing them in backward keeps only views of the inputs.
    recompute = window is None and offset > 0 and torch.is_grad_enabled()
    outs = []
    for s in range(0, T, block_size):
        e = min(s + block_size, T)
        lo = 0 if window is None else max(0, s + offset - window + 1)
        end = e + offset  # keys (and causal memory tokens) up to the block's last query position
        causal = (None, None) if causal_k is None else (causal_k[:, :, :end], causal_v[:, :, :end])
        args = (q[:, :, s:e], k[:, :, lo:end], v[:, :, lo:end], ctx_k, ctx_v, *causal, s + offset - lo,
                window, scale)
        outs.append(checkpoint(_query_block, *args, use_reentrant=False) if recompute
                    else _query_block(*args))
    return torch.cat(outs, dim=2)


def _query_block(q: Tensor, k: Tensor, v: Tensor, ctx_k: Tensor | None, ctx_v: Tensor | None,
                 causal_k: Tensor | None, causal_v: Tensor | None, first: int, window: int | None,
                 scale: float) -> Tensor:
    """One block of queries of `_torch_attention`: q (B, H, n, d) at key positions first .. first + n − 1
    of the sequence keys k, v given (the block's range, starting at the block's lowest visible key);
    `causal_k` holds the memory tokens up to the block's last query."""
    n, device = q.shape[2], q.device
    qpos = torch.arange(first, first + n, device=device).unsqueeze(1)
    kpos = torch.arange(k.shape[2], device=device).unsqueeze(0)
    seq_mask = kpos <= qpos
    if window is not None:
        seq_mask = seq_mask & (kpos > qpos - window)
    keys, vals, masks = [k], [v], [seq_mask]
    if causal_k is not None:  # memory token j is visible to the query at position p iff j <= p
        keys.insert(0, causal_k)
        vals.insert(0, causal_v)
        e = causal_k.shape[2]
        masks.insert(0, torch.arange(e, device=device).unsqueeze(0) <= torch.arange(e - n, e, device=device)
                     .unsqueeze(1))
    if ctx_k is not None:  # always visible
        keys.insert(0, ctx_k)
        vals.insert(0, ctx_v)
        masks.insert(0, torch.ones(n, ctx_k.shape[2], dtype=torch.bool, device=device))
    return F.scaled_dot_product_attention(q, torch.cat(keys, dim=2), torch.cat(vals, dim=2),
                                          attn_mask=torch.cat(masks, dim=1), scale=scale)


# --------------------------------------------------------------------------------------- flash path


def _flash_window_size(window: int | None) -> tuple[int, int]:
    return (-1, -1) if window is None else (window - 1, 0)


class _FlashWithLSE(torch.autograd.Function):
    """flash_attn_func (causal) returning (out, lse) with a correct gradient through lse.

    flash-attn returns the log-sum-exp but its backward ignores the lse cotangent. Merging parts
    through their lse makes the output depend on lse, so using flash_attn_func directly would
    silently give wrong gradients for q and k. The lse gradient is added here with public calls:
        d lse_i / d q_i = scale · Σ_j p_ij k_j         (attention output with values = keys)
        d lse_i / d k_j = scale · Σ_i p_ij g_i q_i     (the dV of that same call, cotangent g·q)
    Inputs and outputs use flash layout: q, k, v (B, T, H, d); out (B, T, H, d); lse (B, H, T).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, window_size: tuple[int, int]):  # type: ignore[override]
        res = flash_attn_func(q, k, v, causal=True, window_size=window_size, return_attn_probs=True)
        out, lse = res[0], res[1][..., : q.shape[1]]
        ctx.save_for_backward(q, k, v)
        ctx.window_size = window_size
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, dlse: Tensor):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        ws = ctx.window_size
        scale = 1.0 / math.sqrt(q.shape[-1])
        with torch.enable_grad():
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            out = flash_attn_func(qg, kg, vg, causal=True, window_size=ws)
            dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), dout)
            # lse part; g = dlse in (B, T, H, 1) layout.
            g = dlse.transpose(1, 2).unsqueeze(-1)
            k_as_v = k.detach().requires_grad_()
            y = flash_attn_func(q.detach(), k.detach(), k_as_v, causal=True, window_size=ws)
            (dk_lse,) = torch.autograd.grad(y, k_as_v, (g * scale * q).to(y.dtype))
        dq = (dq.to(g.dtype) + g * scale * y.detach().to(g.dtype)).to(q.dtype)
        dk = (dk.to(g.dtype) + dk_lse.to(g.dtype)).to(k.dtype)
        return dq, dk, dv, None


def _flash_part(q: Tensor, k: Tensor, v: Tensor, window: int | None) -> tuple[Tensor, Tensor]:
    """Causal (windowed) flash attention on (B, H, T, d) tensors; returns (out (B,H,T,d), lse (B,H,T))."""
    out, lse = _FlashWithLSE.apply(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), _flash_window_size(window)
    )
    return out.transpose(1, 2), lse


def _flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None,
    ctx_k: Tensor | None,
    ctx_v: Tensor | None,
    causal_k: Tensor | None,
    causal_v: Tensor | None,
) -> Tensor:
    """flash-attn for the sequence (and causal memory) keys, dense torch for the always-visible
    keys, merged via log-sum-exp. Without memory/persistent tokens this is one plain flash call. Keys
    longer than the queries need nothing more: flash-attn's causal mask and window are bottom-right
    aligned (since 2.1), the queries are the last positions."""
    if ctx_k is None and causal_k is None:
        out = flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=True,
            window_size=_flash_window_size(window),
        )
        return out.transpose(1, 2)
    out, lse = _flash_part(q, k, v, window)
    if causal_k is not None:  # N == Tk, so flash's (bottom-right) causal mask is exactly "j <= position"
        out, lse = merge_attention(out, lse, *_flash_part(q, causal_k, causal_v, None))
    if ctx_k is not None:
        out, lse = merge_attention(out, lse, *_dense_attention_lse(q, ctx_k, ctx_v))
    return out.to(q.dtype)


def _use_flash(q: Tensor) -> bool:
    return (
        flash_attn_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


# ---------------------------------------------------------------------------------------- flex path


@functools.lru_cache(maxsize=64)
def _flex_block_mask(length: int, keys: int, n_ctx: int, n_causal: int, window: int | None, device: str):
    """The block mask of keys [ctx ‖ causal memory ‖ `keys` sequence keys] for the last `length` of
    them as queries: the layout in the module docstring. Cached: every layer asks for the same one."""
    offset = keys - length

    def visible(b, h, q, kv):
        seq = kv - n_ctx - n_causal  # position of a sequence key (negative for ctx and memory keys)
        in_window = (seq >= 0) & (seq <= q + offset)
        if window is not None:
            in_window = in_window & (q + offset - seq < window)
        memory = (kv >= n_ctx) & (seq < 0) & (kv - n_ctx <= q + offset)  # memory token j: positions >= j
        return (kv < n_ctx) | memory | in_window

    return create_block_mask(visible, None, None, length, n_ctx + n_causal + keys, device=device)


@functools.cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention_func, dynamic=False)


def _flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None,
    ctx_k: Tensor | None,
    ctx_v: Tensor | None,
    causal_k: Tensor | None,
    causal_v: Tensor | None,
) -> Tensor:
    """Every key kind in one FlexAttention call over the concatenated keys."""
    keys = [t for t in (ctx_k, causal_k, k) if t is not None]
    values = [t for t in (ctx_v, causal_v, v) if t is not None]
    n_ctx = 0 if ctx_k is None else ctx_k.shape[2]
    n_causal = 0 if causal_k is None else causal_k.shape[2]
    mask = _flex_block_mask(q.shape[2], k.shape[2], n_ctx, n_causal, window, str(q.device))
    attend = _compiled_flex_attention() if q.is_cuda else flex_attention_func
    return attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), block_mask=mask)


def _use_flex(q: Tensor) -> bool:
    """Half precision only, as flash: float32 and float64 keep the exact torch path (the references)."""
    d = q.shape[-1]
    return (
        flex_attention_func is not None
        and q.device.type in FLEX_DEVICES
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[2] >= FLEX_MIN_LENGTH
        and 16 <= d <= 256 and d & (d - 1) == 0
    )


# ------------------------------------------------------------------------------------------- public


def windowed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    extra_causal: bool = False,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """Causal sliding-window attention with optional always-visible prefix and extra tokens.

    q: (B, H, T, d); k, v: (B, H, Tk, d) with Tk >= T: the queries are the last T of the Tk positions
    (the earlier Tk − T are keys only: a sequence shard's halo, a streaming cache's past, whose queries
    would be thrown away). `window=w`: the query at position t sees sequence keys t-w+1 .. t (flash-attn
    `window_size=(w-1, 0)`, bottom-right aligned); `None` = full causal. prefix_k/v: (H, P, d), shared
    over the batch, visible to every query. extra_k/v: (B, H, N, d), visible to every query, or if
    `extra_causal` (one per sequence key: N == Tk) extra token j only to the queries at positions >= j.
    Scale 1/sqrt(d). Returns (B, H, T, d). `block_size` is the query block of the torch path (memory
    O(T·(block_size + w))).
    """
    if (q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]
            or k.shape[2] < q.shape[2] or v.shape[:3] != k.shape[:3]):
        raise ValueError(f"q (B, H, T, d), k and v (B, H, Tk >= T, d) expected, got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if (prefix_k is None) != (prefix_v is None) or (extra_k is None) != (extra_v is None):
        raise ValueError("keys and values must be given together")
    if extra_causal and extra_k is not None and extra_k.shape[2] != k.shape[2]:
        raise ValueError(f"extra_causal needs N == Tk (a token per sequence key), got N={extra_k.shape[2]}, "
                         f"Tk={k.shape[2]}")

    causal_k = causal_v = None
    if extra_causal and extra_k is not None:
        causal_k, causal_v = extra_k.to(q.dtype), extra_v.to(q.dtype)
        extra_k = extra_v = None
    ctx_k, ctx_v = _context_kv(q, prefix_k, prefix_v, extra_k, extra_v)

    if _use_flash(q):
        return _flash_attention(q, k, v, window, ctx_k, ctx_v, causal_k, causal_v)
    if _use_flex(q):
        return _flex_attention(q, k, v, window, ctx_k, ctx_v, causal_k, causal_v)
    return _torch_attention(q, k, v, window, ctx_k, ctx_v, causal_k, causal_v, block_size)


class KeyValues(NamedTuple):
    """Keys and values (B, H, n, d) of n earlier positions, RoPE applied: a streaming cache's past, so
    that a new token does not project the window (or, for full attention, the whole context) again."""

    k: Tensor
    v: Tensor


class Attention(nn.Module):
    """Multi-head causal (sliding-window) attention with RoPE and persistent memory.

    Persistent memory tokens are parametrised directly as per-head keys/values: prepending learned
    tokens p would give keys W_K p, which is itself a free vector, so this is the same model class
    with fewer indirections. Persistent and long-term-memory tokens carry no position (no RoPE):
    they are not part of the sequence.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        window: int | None,
        n_persistent: int = 0,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.window = window
        self.n_persistent = n_persistent
        self.rope_base = rope_base
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        if n_persistent > 0:
            self.persistent_k = nn.Parameter(torch.randn(heads, n_persistent, head_dim) * 0.02)
            self.persistent_v = nn.Parameter(torch.randn(heads, n_persistent, head_dim) * 0.02)
        else:
            self.register_parameter("persistent_k", None)
            self.register_parameter("persistent_v", None)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, -1, self.head_dim).transpose(1, 2)  # -1: a tensor-parallel shard's heads

    def forward(
        self,
        x: Tensor,
        memory_tokens: Tensor | None = None,
        memory_tokens_causal: bool = False,
        position_offset: int = 0,
    ) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim).

        memory_tokens: (B, N, dim) long-term-memory tokens (MAC), projected with to_k/to_v and
        attended without RoPE; `memory_tokens_causal` (N == T) lets query i see only tokens j <= i.
        position_offset: RoPE position of x[:, 0] (e.g. the segment start in MAC).
        """
        positions = torch.arange(position_offset, position_offset + x.shape[1], device=x.device)
        return self.attend(*self.project(x, positions), memory_tokens, memory_tokens_causal)

    def project(self, x: Tensor, positions: Tensor, keys_only: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """k, v (B, H, T, d) of x (B, T, dim) and q of all but its first `keys_only` positions (earlier
        positions whose outputs are not wanted: a halo, a cache), RoPE applied at `positions` (T,).
        Apart from `attend` so that MAC projects all its segments at once: they do not depend on the
        memory."""
        k, v = self._split_heads(self.to_k(x)), self._split_heads(self.to_v(x))
        q = self._split_heads(self.to_q(x[:, keys_only:])) if keys_only < x.shape[1] else k[:, :, :0]
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_base, k.dtype, x.device)
        return apply_rope(q, cos[keys_only:], sin[keys_only:]), apply_rope(k, cos, sin), v

    def memory_keys(self, memory_tokens: Tensor) -> KeyValues:
        """Keys and values (B, H, N, d) of long-term-memory tokens (B, N, dim): no RoPE."""
        k, v = self.to_k(memory_tokens), self.to_v(memory_tokens)
        return KeyValues(self._split_heads(k), self._split_heads(v))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, memory_tokens: Tensor | KeyValues | None = None,
               memory_tokens_causal: bool = False) -> Tensor:
        """Attention of projected q (B, H, T, d) over k, v (B, H, Tk >= T, d), the persistent tokens and
        `memory_tokens` (as `forward`, or their `memory_keys`); returns (B, T, dim) after the output
        projection."""
        extra_k = extra_v = None
        if memory_tokens is not None:
            extra_k, extra_v = (memory_tokens if isinstance(memory_tokens, KeyValues)
                                else self.memory_keys(memory_tokens))
        out = windowed_attention(
            q,
            k,
            v,
            self.window,
            prefix_k=self.persistent_k,
            prefix_v=self.persistent_v,
            extra_k=extra_k,
            extra_v=extra_v,
            extra_causal=memory_tokens_causal,
        )
        return self.to_out(out.transpose(1, 2).flatten(2))
