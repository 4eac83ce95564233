"""Attention: the block-local torch path, the flash path's merge logic and custom backward (on CPU, with a
pure-torch stand-in for flash-attn), merge_attention and RoPE, all against an independent dense reference.
"""

import importlib.util
import math

import pytest
import torch

import titans.attention as attention
from titans.attention import Attention, apply_rope, merge_attention, rope_cos_sin, windowed_attention

F64 = torch.float64

# ------------------------------------------------------------------------------------------ reference


def dense_reference(
    q, k, v, window, prefix_k=None, prefix_v=None, extra_k=None, extra_v=None, extra_causal=False
):
    """Explicit full boolean mask over [prefix ‖ extra ‖ sequence] keys, then softmax.

    Query i, at position p = i + Tk − T among the keys, sees: every prefix token; every extra token (or,
    if extra_causal, extra j iff j <= p); sequence key j iff p - window < j <= p (window None: j <= p).
    Returns (out, lse).
    """
    B, H, T, d = q.shape
    dev = q.device
    qpos = torch.arange(T, device=dev)[:, None]
    kpos = torch.arange(k.shape[2], device=dev)[None, :] - (k.shape[2] - T)
    keys, vals, masks = [], [], []
    if prefix_k is not None:
        keys.append(prefix_k.to(q.dtype).unsqueeze(0).expand(B, -1, -1, -1))
        vals.append(prefix_v.to(q.dtype).unsqueeze(0).expand(B, -1, -1, -1))
        masks.append(torch.ones(T, prefix_k.shape[1], dtype=torch.bool, device=dev))
    if extra_k is not None:
        n = extra_k.shape[2]
        keys.append(extra_k.to(q.dtype))
        vals.append(extra_v.to(q.dtype))
        jpos = torch.arange(n, device=dev)[None, :]
        masks.append(jpos <= qpos + k.shape[2] - T if extra_causal
                     else torch.ones(T, n, dtype=torch.bool, device=dev))
    seq_mask = kpos <= qpos
    if window is not None:
        seq_mask = seq_mask & (kpos > qpos - window)
    keys.append(k)
    vals.append(v)
    masks.append(seq_mask)
    keys, vals, mask = torch.cat(keys, 2), torch.cat(vals, 2), torch.cat(masks, 1)
    scores = (q @ keys.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ vals, lse


def make_inputs(T, prefix, extra, causal, seed=0, B=2, H=2, d=4, P=3, N=5, dtype=F64, device="cpu", past=0):
    """q of T positions; k, v of `past` earlier positions (keys only) and the same T."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = r(B, H, T, d), r(B, H, past + T, d), r(B, H, past + T, d)
    pk, pv = (r(H, P, d), r(H, P, d)) if prefix else (None, None)
    n = past + T if causal else N  # causal: a memory token per sequence key
    ek, ev = (r(B, H, n, d), r(B, H, n, d)) if extra else (None, None)
    return q, k, v, pk, pv, ek, ev


def grads_with_probe(out, leaves, seed=1):
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return torch.autograd.grad((out * probe.to(out)).sum(), leaves)


def assert_exact_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# (prefix, extra, extra_causal)
CONTEXTS = [
    (False, False, False),
    (True, False, False),
    (False, True, False),
    (True, True, False),
    (False, True, True),
    (True, True, True),
]

# ------------------------------------------------------------------------------- windowed_attention


@pytest.mark.parametrize("block", [4, 5, 256])
@pytest.mark.parametrize("T", [1, 7, 16, 33])
@pytest.mark.parametrize("window", [1, 3, 8, None])
@pytest.mark.parametrize("prefix,extra,causal", CONTEXTS)
def test_windowed_attention_matches_dense_reference(prefix, extra, causal, window, T, block):
    q, k, v, pk, pv, ek, ev = inputs = make_inputs(T, prefix, extra, causal, seed=T)
    out = windowed_attention(q, k, v, window, pk, pv, ek, ev, causal, block_size=block)
    ref, _ = dense_reference(q, k, v, window, pk, pv, ek, ev, causal)
    assert out.shape == q.shape and out.dtype == F64
    assert_exact_close(out, ref)
    leaves = [t for t in inputs if t is not None]
    for got, want in zip(grads_with_probe(out, leaves), grads_with_probe(ref, leaves)):
        assert_exact_close(got, want)


@pytest.mark.parametrize("block", [4, 256])
@pytest.mark.parametrize("T,past", [(1, 1), (1, 9), (7, 3), (16, 20)])
@pytest.mark.parametrize("window", [1, 3, 8, None])
@pytest.mark.parametrize("prefix,extra,causal", CONTEXTS)
def test_windowed_attention_with_keys_before_the_queries(prefix, extra, causal, window, T, past, block):
    """Keys of `past` earlier positions without queries (a halo, a streaming cache) give the last T rows
    of the attention over all past + T positions, its gradients included."""
    q, k, v, pk, pv, ek, ev = inputs = make_inputs(T, prefix, extra, causal, seed=T + past, past=past)
    out = windowed_attention(q, k, v, window, pk, pv, ek, ev, causal, block_size=block)
    ref, _ = dense_reference(q, k, v, window, pk, pv, ek, ev, causal)
    assert out.shape == q.shape
    assert_exact_close(out, ref)
    leaves = [t for t in inputs if t is not None]
    for got, want in zip(grads_with_probe(out, leaves), grads_with_probe(ref, leaves)):
        assert_exact_close(got, want)
    if not (prefix or extra):  # the same rows of attention over every position, queries and all
        wide_q = torch.cat([torch.randn(2, 2, past, 4, dtype=F64), q.detach()], dim=2)
        whole = windowed_attention(wide_q, k.detach(), v.detach(), window, block_size=block)
        assert_exact_close(out.detach(), whole[:, :, past:])


@pytest.mark.parametrize("block", [3, 256])
@pytest.mark.parametrize("window", [7, 8, 9, 100])
@pytest.mark.parametrize("prefix,extra,causal", [(False, False, False), (True, True, True)])
def test_windowed_attention_window_around_sequence_length(prefix, extra, causal, window, block):
    """T = 8: window T-1 still hides key 0 from the last query; windows >= T are full causal."""
    q, k, v, pk, pv, ek, ev = make_inputs(8, prefix, extra, causal, seed=11)
    out = windowed_attention(q, k, v, window, pk, pv, ek, ev, causal, block_size=block)
    assert_exact_close(out, dense_reference(q, k, v, window, pk, pv, ek, ev, causal)[0])
    if window >= 8:
        assert_exact_close(out, windowed_attention(q, k, v, None, pk, pv, ek, ev, causal, block_size=block))


def test_windowed_attention_value_dim_may_differ_and_batch_shares_prefix():
    """Prefix (H, P, d) is shared across the batch: batch items only differ through their own q/k/v."""
    q, k, _, pk, pv, _, _ = make_inputs(9, True, False, False, seed=5)
    v = torch.randn(2, 2, 9, 6, dtype=F64)
    pv = torch.randn(2, 3, 6, dtype=F64)
    out = windowed_attention(q, k, v, 4, pk, pv, block_size=4)
    assert out.shape == (2, 2, 9, 6)
    assert_exact_close(out, dense_reference(q, k, v, 4, pk, pv)[0])


def test_windowed_attention_rejects_bad_arguments():
    q, k, v, pk, pv, ek, ev = make_inputs(6, True, True, False)
    with pytest.raises(ValueError, match="window"):
        windowed_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="together"):
        windowed_attention(q, k, v, 2, prefix_k=pk)
    with pytest.raises(ValueError, match="together"):
        windowed_attention(q, k, v, 2, extra_k=ek)
    with pytest.raises(ValueError, match="N == T"):
        windowed_attention(q, k, v, 2, extra_k=ek, extra_v=ev, extra_causal=True)  # N=5, T=6
    with pytest.raises(ValueError, match=r"Tk >= T"):
        windowed_attention(q, k[:, :, :5], v[:, :, :5], 2)  # fewer keys than queries
    with pytest.raises(ValueError, match=r"Tk >= T"):
        windowed_attention(q, k, v[:, :, :5], 2)


# ------------------------------------------------------------------------ Attention module causality


def _perturbation_effects(attn, x, memory=None, memory_causal=False, perturb_memory=False):
    """changed[p, t]: does output t change (bitwise) when token p (of x, or of memory) is perturbed."""
    base = attn(x, memory, memory_causal)
    src = memory if perturb_memory else x
    changed = torch.zeros(src.shape[1], x.shape[1], dtype=torch.bool)
    for p in range(src.shape[1]):
        bumped = src.clone()
        bumped[:, p] += 0.5
        out = attn(bumped, memory, memory_causal) if not perturb_memory else attn(x, bumped, memory_causal)
        changed[p] = (out != base).any(dim=-1).any(dim=0)
    return changed


@pytest.mark.parametrize("block", [4, 256])
@pytest.mark.parametrize("n_persistent", [0, 2])
@pytest.mark.parametrize("window", [1, 3, 6, None, 40])
def test_attention_module_sees_exactly_its_window(monkeypatch, window, n_persistent, block):
    """Output t changes with input tokens t−w+1..t and with nothing before t−w+1 or after t (exactly)."""
    monkeypatch.setitem(attention.windowed_attention.__kwdefaults__, "block_size", block)
    torch.manual_seed(0)
    T = 20
    attn = Attention(dim=16, heads=2, head_dim=8, window=window, n_persistent=n_persistent).double()
    x = torch.randn(2, T, 16, dtype=F64)
    changed = _perturbation_effects(attn, x)
    w = T if window is None else window
    for p in range(T):
        for t in range(T):
            expected = t - w + 1 <= p <= t
            assert bool(changed[p, t]) == expected, f"token {p} -> output {t}, window {window}"
    # explicitly: the oldest token in the window matters, the one just before it does not
    t = 15
    if window is not None and window <= t:
        assert changed[t - window + 1, t] and not changed[t - window, t]


@pytest.mark.parametrize("window", [2, None])
def test_attention_module_memory_tokens_visibility(window):
    """Memory tokens carry no position: non-causal ones reach every output, causal j only outputs >= j."""
    torch.manual_seed(1)
    T = 9
    attn = Attention(dim=8, heads=2, head_dim=4, window=window, n_persistent=1).double()
    x, mem = torch.randn(1, T, 8, dtype=F64), torch.randn(1, T, 8, dtype=F64)
    causal = _perturbation_effects(attn, x, mem, True, perturb_memory=True)
    expected = torch.arange(T)[:, None] <= torch.arange(T)[None, :]  # [j, t]: j <= t
    assert torch.equal(causal, expected)
    assert _perturbation_effects(attn, x, mem[:, :4], False, perturb_memory=True).all()


def test_attention_module_is_invariant_to_position_offset():
    """RoPE is relative: shifting every sequence position by the same offset does not change the output
    (without persistent/memory tokens, which carry no position and so see absolute query positions)."""
    torch.manual_seed(2)
    attn = Attention(dim=16, heads=2, head_dim=8, window=5).double()
    x = torch.randn(2, 12, 16, dtype=F64)
    torch.testing.assert_close(attn(x), attn(x, position_offset=1000), rtol=1e-9, atol=1e-11)
    attn_p = Attention(dim=16, heads=2, head_dim=8, window=5, n_persistent=2).double()
    assert not torch.allclose(attn_p(x), attn_p(x, position_offset=1000))


# -------------------------------------------------------------------------------------- merge_attention


def reference_part(q, k, v, mask=None):
    """Attention of q over (k, v) restricted to `mask` (T, C); empty rows give out = 0, lse = -inf."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    return probs @ v, lse


def _qkv(T=6, C=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, T, 4, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(2, 3, C, 4, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(2, 3, C, 4, generator=g, dtype=F64, requires_grad=True)
    return q, k, v


def test_merge_attention_equals_attention_over_the_union():
    q, k, v = _qkv()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    a, b = perm[:4], perm[4:]  # an arbitrary (non-contiguous) split of the key set
    full_out, full_lse = reference_part(q, k, v)
    out, lse = merge_attention(
        *reference_part(q, k[:, :, a], v[:, :, a]), *reference_part(q, k[:, :, b], v[:, :, b])
    )
    assert_exact_close(out, full_out)
    assert_exact_close(lse, full_lse)
    for got, want in zip(grads_with_probe(out, (q, k, v)), grads_with_probe(full_out, (q, k, v))):
        assert_exact_close(got, want)
    # merging is symmetric
    out_ba, _ = merge_attention(
        *reference_part(q, k[:, :, b], v[:, :, b]), *reference_part(q, k[:, :, a], v[:, :, a])
    )
    assert_exact_close(out_ba, full_out)


@pytest.mark.parametrize("empty_side", ["a", "b"])
def test_merge_attention_with_a_part_empty_for_some_queries(empty_side):
    q, k, v = (t.detach() for t in _qkv(seed=1))
    T = q.shape[2]
    # part A holds keys 0..3 but is visible only to queries >= 3; part B holds keys 4..8, always visible
    mask_a = torch.zeros(T, 4, dtype=torch.bool)
    mask_a[3:] = True
    part_a = reference_part(q, k[:, :, :4], v[:, :, :4], mask_a)
    part_b = reference_part(q, k[:, :, 4:], v[:, :, 4:])
    assert torch.isneginf(part_a[1][:, :, :3]).all() and torch.isfinite(part_a[0]).all()
    out, lse = merge_attention(*part_a, *part_b) if empty_side == "a" else merge_attention(*part_b, *part_a)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # queries where A is empty: B's output and lse, unchanged
    assert_exact_close(out[:, :, :3], part_b[0][:, :, :3])
    assert_exact_close(lse[:, :, :3], part_b[1][:, :, :3])
    # elsewhere: attention over the union
    full_mask = torch.cat([mask_a, torch.ones(T, 5, dtype=torch.bool)], dim=1)
    full_out, full_lse = reference_part(q, k, v, full_mask)
    assert_exact_close(out, full_out)
    assert_exact_close(lse, full_lse)
    assert not torch.allclose(out[:, :, 3:], part_b[0][:, :, 3:])
    # the empty part's -inf lse does not poison gradients
    leaves = [t.clone().requires_grad_() for t in (*part_a, *part_b)]
    merged = merge_attention(*leaves) if empty_side == "a" else merge_attention(*leaves[2:], *leaves[:2])
    grads = torch.autograd.grad(merged[0].sum() + merged[1].sum(), leaves)
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert torch.equal(grads[0][:, :, :3], torch.zeros_like(grads[0][:, :, :3]))


def test_merge_attention_both_parts_empty_gives_zeros_not_nan():
    out_a, out_b = torch.zeros(1, 2, 3, 4, dtype=F64), torch.zeros(1, 2, 3, 4, dtype=F64)
    lse_a = lse_b = torch.full((1, 2, 3), float("-inf"), dtype=F64)
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ------------------------------------------------------------------------------------------------ RoPE


@pytest.mark.parametrize("head_dim", [2, 8, 16])
def test_rope_scores_depend_only_on_relative_position(head_dim):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, head_dim, generator=g, dtype=F64)
    k = torch.randn(1, 1, 1, head_dim, generator=g, dtype=F64)
    pos = torch.arange(0, 300, 7)
    cos, sin = rope_cos_sin(pos, head_dim, 10000.0, F64, "cpu")
    qr, kr = apply_rope(q, cos, sin)[0, 0], apply_rope(k, cos, sin)[0, 0]  # (len(pos), head_dim)
    scores = qr @ kr.T  # scores[i, j] = <rope(q, pos_i), rope(k, pos_j)>
    diff = pos[:, None] - pos[None, :]
    for delta in (-21, 0, 7, 35, 140):
        same = scores[diff == delta]
        assert same.numel() > 1
        torch.testing.assert_close(same, same[:1].expand_as(same), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(scores[diff == 7][0], scores[diff == 14][0])
    # a rotation: norms preserved, identity at position 0
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(len(pos)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qr[0], q[0, 0, 0], rtol=0, atol=0)


def test_rope_cos_sin_shapes_dtypes_and_odd_head_dim():
    cos, sin = rope_cos_sin(torch.arange(5), 6, 10000.0, torch.float32, "cpu")
    assert cos.shape == sin.shape == (5, 6) and cos.dtype == torch.float32
    torch.testing.assert_close(cos**2 + sin**2, torch.ones(5, 6))
    # bf16 tables are computed in float32 and only then rounded (large positions stay accurate)
    pos = torch.arange(4000, 4010)
    cos_bf, _ = rope_cos_sin(pos, 8, 10000.0, torch.bfloat16, "cpu")
    cos_64, _ = rope_cos_sin(pos, 8, 10000.0, F64, "cpu")
    assert cos_bf.dtype == torch.bfloat16
    torch.testing.assert_close(cos_bf.double(), cos_64, rtol=0, atol=1e-2)
    for bad in (7, 1):
        with pytest.raises(ValueError, match="even"):
            rope_cos_sin(torch.arange(3), bad, 10000.0, torch.float32, "cpu")


# ------------------------------------------------------------------------ flash path on CPU (stand-in)


FLASH_CALLS: list[dict] = []


def fake_flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    lse_pad=0,
):
    """flash-attn's flash_attn_func in plain torch: (B, T, H, d) layout, bottom-right-aligned causal mask,
    window_size=(left, right) with -1 = unlimited, and with return_attn_probs → (out, lse (B, H, T), None).

    Like flash-attn, the returned lse carries no gradient (its backward ignores the lse cotangent).
    `lse_pad` appends garbage columns to lse, as some flash-attn versions round seqlen_q up.
    """
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None
    FLASH_CALLS.append({"causal": causal, "window_size": tuple(window_size), "probs": return_attn_probs})
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    Tq, Tk, d = qh.shape[2], kh.shape[2], qh.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    i = torch.arange(Tq)[:, None] + (Tk - Tq)  # query i aligned to key i + Tk - Tq
    j = torch.arange(Tk)[None, :]
    left, right = window_size
    if causal:
        right = 0
    mask = torch.ones(Tq, Tk, dtype=torch.bool)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = (torch.exp(scores - lse.unsqueeze(-1)) @ vh).transpose(1, 2)
    if not return_attn_probs:
        return out
    lse = lse.detach()
    if lse_pad:
        lse = torch.cat([lse, torch.full((*lse.shape[:-1], lse_pad), 123.0, dtype=lse.dtype)], -1)
    return out, lse, None


@pytest.fixture
def fake_flash(monkeypatch, request):
    pad = getattr(request, "param", 0)
    FLASH_CALLS.clear()
    monkeypatch.setattr(
        attention, "flash_attn_func", lambda *a, **kw: fake_flash_attn_func(*a, **kw, lse_pad=pad)
    )
    return FLASH_CALLS


def test_fake_flash_stand_in_agrees_with_reference():
    """Sanity of the stand-in itself (so the tests below test attention.py, not the fake)."""
    q, k, v, *_ = make_inputs(10, False, False, False, seed=9)
    for window in (1, 4, None):
        ws = (-1, -1) if window is None else (window - 1, 0)
        out, lse, _ = fake_flash_attn_func(
            *(t.transpose(1, 2) for t in (q, k, v)), causal=True, window_size=ws, return_attn_probs=True
        )
        ref_out, ref_lse = dense_reference(q, k, v, window)
        assert_exact_close(out.transpose(1, 2), ref_out)
        assert_exact_close(lse, ref_lse)


@pytest.mark.parametrize("fake_flash", [0, 128], indirect=True)
@pytest.mark.parametrize("window_size", [(0, 0), (2, 0), (-1, -1)])
def test_flash_with_lse_gradients_gradcheck(fake_flash, window_size):
    """_FlashWithLSE: analytic gradients of BOTH out and lse equal finite differences."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 6, 2, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return attention._FlashWithLSE.apply(q, k, v, window_size)

    out, lse = fn(q, k, v)
    assert out.shape == q.shape and lse.shape == (2, 2, 6)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("fake_flash", [0, 64], indirect=True)
@pytest.mark.parametrize("past", [0, 5])
@pytest.mark.parametrize("window", [1, 3, None])
@pytest.mark.parametrize("prefix,extra,causal", CONTEXTS)
def test_flash_path_matches_reference_and_torch_path(fake_flash, window, past, prefix, extra, causal):
    """_flash_attention (lse merges + _FlashWithLSE) equals the dense reference and _torch_attention,
    outputs and gradients wrt q, k, v, prefix, extra; with `past` keys before the queries too."""
    q, k, v, pk, pv, ek, ev = inputs = make_inputs(11, prefix, extra, causal, seed=3, past=past)
    ctx_k, ctx_v = attention._context_kv(q, pk, pv, None if causal else ek, None if causal else ev)
    causal_k, causal_v = (ek, ev) if causal else (None, None)
    out = attention._flash_attention(q, k, v, window, ctx_k, ctx_v, causal_k, causal_v)
    torch_out = attention._torch_attention(q, k, v, window, ctx_k, ctx_v, causal_k, causal_v, 4)
    ref, _ = dense_reference(q, k, v, window, pk, pv, ek, ev, causal)
    assert out.dtype == F64
    assert_exact_close(out, ref)
    assert_exact_close(torch_out, ref)
    leaves = [t for t in inputs if t is not None]
    for got, via_torch, want in zip(
        grads_with_probe(out, leaves), grads_with_probe(torch_out, leaves), grads_with_probe(ref, leaves)
    ):
        assert_exact_close(got, want)
        assert_exact_close(via_torch, want)
    # flash is always asked for causal attention with the mapped window: (w-1, 0), or (-1, -1) for None
    assert fake_flash and all(c["causal"] for c in fake_flash)
    seq_ws = (-1, -1) if window is None else (window - 1, 0)
    assert fake_flash[0]["window_size"] == seq_ws
    if causal:
        assert any(c["window_size"] == (-1, -1) and c["probs"] for c in fake_flash[1:])


def test_flash_path_gradient_needs_the_lse_term(fake_flash, monkeypatch):
    """Guard that the test above can fail: dropping the lse cotangent in _FlashWithLSE breaks q/k grads."""
    q, k, v, pk, pv, *_ = inputs = make_inputs(11, True, False, False, seed=3)
    ctx_k, ctx_v = attention._context_kv(q, pk, pv, None, None)
    ref, _ = dense_reference(q, k, v, 3, pk, pv)
    ref_grads = grads_with_probe(ref, inputs[:5])
    original = attention._FlashWithLSE.backward

    def backward_without_lse(ctx, dout, dlse):
        return original(ctx, dout, torch.zeros_like(dlse))

    monkeypatch.setattr(attention._FlashWithLSE, "backward", staticmethod(backward_without_lse))
    out = attention._flash_attention(q, k, v, 3, ctx_k, ctx_v, None, None)
    assert_exact_close(out, ref)  # forward is unaffected
    bad = grads_with_probe(out, inputs[:5])
    assert not torch.allclose(bad[0], ref_grads[0]) and not torch.allclose(bad[1], ref_grads[1])
    assert_exact_close(bad[2], ref_grads[2])  # dv does not involve the lse


def test_use_flash_requires_cuda_half_precision_and_supported_head_dim(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_func", fake_flash_attn_func)
    assert not attention._use_flash(torch.zeros(1, 1, 2, 64, dtype=torch.bfloat16))  # CPU
    monkeypatch.setattr(attention, "flash_attn_func", None)
    assert not attention._use_flash(torch.zeros(1, 1, 2, 64))


# ------------------------------------------------------------------------------- real flash-attn (GPU)

HAS_FLASH = (
    torch.cuda.is_available()
    and importlib.util.find_spec("flash_attn") is not None
    and attention._flash_attn_func is not None
)
needs_flash = pytest.mark.skipif(not HAS_FLASH, reason="needs CUDA and flash-attn")


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def assert_matches_float32_torch_path(inputs, window, causal):
    """bf16 attention on the fused path this GPU takes (flash or flex) against the torch path in float32:
    the output and every input's gradient, to bf16 rounding."""
    q, k, v, pk, pv, ek, ev = inputs
    out = windowed_attention(q, k, v, window, pk, pv, ek, ev, causal)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    leaves = [t for t in inputs if t is not None]
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    it = iter(f32)
    args = [next(it) if t is not None else None for t in inputs]
    ref = windowed_attention(*args[:3], window, *args[3:], causal, block_size=64)  # float32: torch path
    assert _rel_err(out, ref) < 2e-2
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).cuda()
    got = torch.autograd.grad((out.float() * probe).sum(), leaves)
    want = torch.autograd.grad((ref * probe).sum(), f32)
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 5e-2


@needs_flash
@pytest.mark.parametrize("past", [0, 77])  # keys before the queries: a halo, a streaming cache
@pytest.mark.parametrize("window", [64, None])
@pytest.mark.parametrize(
    "prefix,extra,causal", [(False, False, False), (True, True, False), (True, True, True)]
)
def test_real_flash_path_matches_cpu_path_in_bf16(window, prefix, extra, causal, past):
    T = 300
    q, k, v, pk, pv, ek, ev = inputs = make_inputs(
        T, prefix, extra, causal, seed=0, H=4, d=64, P=4, N=16, dtype=torch.bfloat16, device="cuda", past=past
    )
    assert attention._use_flash(q)
    assert_matches_float32_torch_path(inputs, window, causal)


@needs_flash
@pytest.mark.parametrize("window,persistent", [(64, 0), (64, 4), (None, 4)])
def test_real_flash_attention_module_under_autocast(window, persistent):
    torch.manual_seed(0)
    attn = Attention(dim=128, heads=2, head_dim=64, window=window, n_persistent=persistent).cuda()
    x = torch.randn(2, 300, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = attn(x)
    slow = attn(x)  # float32: torch path
    assert _rel_err(fast, slow) < 3e-2


# ------------------------------------------------------------------------------------ FlexAttention

needs_flex = pytest.mark.skipif(attention.flex_attention_func is None,
                                reason="this torch has no FlexAttention")


def detached(inputs):
    return [None if t is None else t.detach() for t in inputs]


@needs_flex
@pytest.mark.parametrize("T,past", [(11, 0), (130, 0), (11, 140), (130, 7)])
@pytest.mark.parametrize("window", [1, 3, 12, None])
@pytest.mark.parametrize("prefix,extra,causal", CONTEXTS)
def test_flex_path_matches_reference(prefix, extra, causal, window, T, past):
    """The block mask is the layout: [prefix ‖ extra (all, or causal) ‖ sequence in the window], T past
    one mask block (128) too, and keys before the queries. Forward only: torch runs FlexAttention's
    backward on CUDA alone (the GPU test below and bench/gpu_step.py check it)."""
    with torch.no_grad():
        q, k, v, pk, pv, ek, ev = detached(make_inputs(T, prefix, extra, causal, seed=T, d=16, past=past))
        ctx_k, ctx_v = attention._context_kv(q, pk, pv, None if causal else ek, None if causal else ev)
        causal_k, causal_v = (ek, ev) if causal else (None, None)
        out = attention._flex_attention(q, k, v, window, ctx_k, ctx_v, causal_k, causal_v)
        ref, _ = dense_reference(q, k, v, window, pk, pv, ek, ev, causal)
    assert out.dtype == F64
    assert_exact_close(out, ref)


@needs_flex
def test_use_flex_only_in_half_precision_on_its_devices(monkeypatch):
    bf16 = torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16)
    assert not attention._use_flex(bf16)  # CPU is not among its devices
    monkeypatch.setattr(attention, "FLEX_DEVICES", ("cpu",))
    assert attention._use_flex(bf16)
    assert not attention._use_flex(bf16.float())  # float32 / float64 keep the exact torch path
    assert not attention._use_flex(bf16[:, :, :127])  # short inputs: no compile per length
    assert not attention._use_flex(torch.zeros(1, 1, 128, 48, dtype=torch.bfloat16))  # not a power of two
    monkeypatch.setattr(attention, "flex_attention_func", None)
    assert not attention._use_flex(bf16)


@needs_flex
def test_windowed_attention_takes_the_flex_path_without_flash(monkeypatch):
    """Where flex is on (CUDA; CPU here) and flash is not, bf16 attention is one FlexAttention call that
    agrees with the torch path to bf16 rounding; with flash available, flash is taken first."""
    calls = []
    real = attention.flex_attention_func

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(attention, "flex_attention_func", counting)
    monkeypatch.setattr(attention, "flash_attn_func", None)
    with torch.no_grad():
        inputs = detached(make_inputs(130, True, True, True, seed=5, d=16, dtype=torch.bfloat16))
        out = windowed_attention(*inputs[:3], 8, *inputs[3:], True)
        assert calls == [(2, 2, 3 + 130 + 130, 16)]  # persistent + causal memory + sequence keys
        wide = [t.double() for t in inputs]
        ref = windowed_attention(*wide[:3], 8, *wide[3:], True)  # float64: the torch path
    assert _rel_err(out, ref) < 2e-2
    monkeypatch.setattr(attention, "_use_flash", lambda q: True)
    monkeypatch.setattr(attention, "_flash_attention", lambda *args: "flash")
    assert windowed_attention(*inputs[:3], 8, *inputs[3:], True) == "flash"


@needs_flex
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention's backward)")
@pytest.mark.parametrize("past", [0, 77])
@pytest.mark.parametrize("window", [64, None])
@pytest.mark.parametrize("prefix,extra,causal",
                         [(False, False, False), (True, True, False), (True, True, True)])
def test_real_flex_path_matches_torch_path_in_bf16(monkeypatch, window, prefix, extra, causal, past):
    monkeypatch.setattr(attention, "flash_attn_func", None)
    T = 300
    q, k, v, pk, pv, ek, ev = inputs = make_inputs(
        T, prefix, extra, causal, seed=0, H=4, d=64, P=4, N=16, dtype=torch.bfloat16, device="cuda", past=past
    )
    assert attention._use_flex(q)
    assert_matches_float32_torch_path(inputs, window, causal)
