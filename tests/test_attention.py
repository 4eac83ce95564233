"""Attention: the block-local CPU path and the flash path's merge logic against a dense reference."""

import math

import pytest
import torch

import titans.attention as attention
from titans.attention import Attention, apply_rope, merge_attention, rope_cos_sin, windowed_attention


def dense_reference(q, k, v, window, prefix_k=None, prefix_v=None, extra_k=None, extra_v=None,
                    extra_causal=False):
    """Explicit full mask over [prefix ‖ extra ‖ sequence] keys, then softmax. Float64."""
    B, H, T, d = q.shape
    keys, vals, masks = [], [], []
    qpos = torch.arange(T)[:, None]
    if prefix_k is not None:
        keys.append(prefix_k.expand(B, -1, -1, -1))
        vals.append(prefix_v.expand(B, -1, -1, -1))
        masks.append(torch.ones(T, prefix_k.shape[1], dtype=torch.bool))
    if extra_k is not None:
        keys.append(extra_k)
        vals.append(extra_v)
        n = extra_k.shape[2]
        masks.append(torch.arange(n)[None, :] <= qpos if extra_causal else torch.ones(T, n, dtype=torch.bool))
    kpos = torch.arange(T)[None, :]
    seq_mask = kpos <= qpos
    if window is not None:
        seq_mask &= kpos > qpos - window
    keys.append(k)
    vals.append(v)
    masks.append(seq_mask)
    keys, vals, mask = torch.cat(keys, 2), torch.cat(vals, 2), torch.cat(masks, 1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(d)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vals


def random_inputs(T, prefix, extra, causal, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, d = 2, 2, 4

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    q, k, v = r(B, H, T, d), r(B, H, T, d), r(B, H, T, d)
    pk, pv = (r(H, 3, d), r(H, 3, d)) if prefix else (None, None)
    n = T if causal else 5
    ek, ev = (r(B, H, n, d), r(B, H, n, d)) if extra else (None, None)
    return q, k, v, pk, pv, ek, ev


CASES = [(w, T, prefix, extra, causal, block)
         for w in (1, 3, 8, None) for T in (1, 7, 16, 33)
         for prefix, extra, causal in ((False, False, False), (True, False, False), (True, True, False),
                                       (False, True, True), (True, True, True))
         for block in (5, 256)]


@pytest.mark.parametrize("window,T,prefix,extra,causal,block", CASES)
def test_windowed_attention_matches_dense_reference(window, T, prefix, extra, causal, block):
    q, k, v, pk, pv, ek, ev = inputs = random_inputs(T, prefix, extra, causal)
    out = windowed_attention(q, k, v, window, pk, pv, ek, ev, causal, block_size=block)
    ref = dense_reference(q, k, v, window, pk, pv, ek, ev, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    leaves = [t for t in inputs if t is not None]
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * probe).sum(), leaves)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window", [1, 4, 6])
def test_attention_module_sees_exactly_its_window(window):
    """Output t changes with tokens t−w+1..t and with nothing before t−w+1 or after t."""
    torch.manual_seed(0)
    attn = Attention(dim=16, heads=2, head_dim=8, window=window, n_persistent=2).double()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    base = attn(x)
    t = 14
    for pos in range(20):
        changed = x.clone()
        changed[:, pos] += 1.0
        out = attn(changed)
        inside = t - window + 1 <= pos <= t
        assert torch.equal(out[:, t], base[:, t]) != inside, f"token {pos} vs output {t}, window {window}"
        assert torch.equal(out[:, :pos], base[:, :pos])  # causal


def test_merge_attention_equals_attention_over_the_union():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    k = torch.randn(2, 3, 9, 4, dtype=torch.float64)
    v = torch.randn(2, 3, 9, 4, dtype=torch.float64)

    def part(keys, values, mask=None):
        scores = q @ keys.transpose(-1, -2) / 2.0
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
        return probs @ values, lse

    full, _ = part(k, v)
    out, _ = merge_attention(*part(k[:, :, :4], v[:, :, :4]), *part(k[:, :, 4:], v[:, :, 4:]))
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    # one part empty for some queries (lse = -inf): the other part alone
    empty = torch.zeros(6, 4, dtype=torch.bool)
    empty[3:] = True
    out_a, lse_a = part(k[:, :, :4], v[:, :, :4], empty)
    out, _ = merge_attention(out_a.nan_to_num(), lse_a, *part(k[:, :, 4:], v[:, :, 4:]))
    second_only = part(k[:, :, 4:], v[:, :, 4:])[0]
    torch.testing.assert_close(out[:, :, :3], second_only[:, :, :3], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[:, :, 3:], second_only[:, :, 3:])


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(i, j):
        cos, sin = rope_cos_sin(torch.tensor([i, j]), 8, 10000.0, torch.float64, "cpu")
        return (apply_rope(q, cos[:1], sin[:1]) * apply_rope(k, cos[1:], sin[1:])).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102))
    assert not torch.allclose(score(5, 2), score(5, 3))
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(torch.arange(3), 7, 10000.0, torch.float32, "cpu")


def fake_flash_attn_func(q, k, v, causal=True, window_size=(-1, -1), return_attn_probs=False):
    """flash-attn's API and layout (B, T, H, d) in plain torch, so the flash path's logic runs on CPU."""
    assert causal
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    T, d = qh.shape[2], qh.shape[-1]
    pos = torch.arange(T)
    mask = pos[None, :] <= pos[:, None]
    if window_size[0] >= 0:
        mask &= pos[None, :] >= pos[:, None] - window_size[0]
    scores = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = (torch.exp(scores - lse.unsqueeze(-1)) @ vh).transpose(1, 2)
    return (out, lse.detach(), None) if return_attn_probs else out


@pytest.mark.parametrize("window", [3, None])
@pytest.mark.parametrize("prefix,extra,causal",
                         [(True, False, False), (True, True, False), (False, True, True)])
def test_flash_path_logic_with_lse_merge_and_its_custom_backward(monkeypatch, window, prefix, extra, causal):
    """The merge of flash parts via log-sum-exp, and `_FlashWithLSE`'s lse gradient, on CPU."""
    monkeypatch.setattr(attention, "flash_attn_func", fake_flash_attn_func)
    q, k, v, pk, pv, ek, ev = inputs = random_inputs(11, prefix, extra, causal, seed=3)
    ctx_k, ctx_v = attention._context_kv(q, pk, pv, None if causal else ek, None if causal else ev)
    causal_k, causal_v = (ek, ev) if causal else (None, None)
    out = attention._flash_attention(q, k, v, window, ctx_k, ctx_v, causal_k, causal_v)
    ref = dense_reference(q, k, v, window, pk, pv, ek, ev, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    leaves = [t for t in inputs if t is not None]
    probe = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * probe).sum(), leaves),
                    torch.autograd.grad((ref * probe).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available() or attention._flash_attn_func is None,
                    reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("window,persistent", [(64, 0), (64, 4), (None, 4)])
def test_flash_attn_matches_cpu_path_on_gpu(window, persistent):
    torch.manual_seed(0)
    attn = Attention(dim=128, heads=2, head_dim=64, window=window, n_persistent=persistent).cuda()
    x = torch.randn(2, 300, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = attn(x)
    q, k, v = (attn._split_heads(p(x)) for p in (attn.to_q, attn.to_k, attn.to_v))
    cos, sin = rope_cos_sin(torch.arange(300, device="cuda"), 64, attn.rope_base, torch.float32, "cuda")
    context = attention._context_kv(q, attn.persistent_k, attn.persistent_v, None, None)
    slow = attention._torch_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, window,
                                      *context, None, None, 256)
    slow = attn.to_out(slow.transpose(1, 2).reshape(2, 300, 128))
    torch.testing.assert_close(fast.float(), slow, rtol=3e-2, atol=3e-2)
