"""The fused head + cross-entropy equals the plain chunked loss: value and gradients, weights, ignored
targets, chunk boundaries; it is used only where the head is a plain linear; over a head split by
vocabulary (tp=2, a 2-process launch) it equals the dense head's loss."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from launcher import launch
from torch import nn

from pretrain.linear_cross_entropy import fusable, linear_cross_entropy_sum
from pretrain.loss import head_loss_sum

WORKER = Path(__file__).with_name("vocab_split_worker.py")
LAUNCH_TIMEOUT_S = 300


def plain_loss_sum(features, weight, targets, weights=None):
    ce = F.cross_entropy(features @ weight.t(), targets, reduction="none")
    return ce.sum() if weights is None else (ce * weights).sum()


def grads(loss_fn, features, weight, *rest):
    x, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(x, w, *rest)
    (loss * 0.37).backward()  # a scale other than one flows back
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("chunk_tokens", [4, 7, 64])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_plain_cross_entropy_in_float64(chunk_tokens, weighted):
    torch.manual_seed(0)
    n, dim, vocab = 23, 8, 31
    features, weight = torch.randn(n, dim, dtype=torch.float64), torch.randn(vocab, dim, dtype=torch.float64)
    targets = torch.randint(vocab, (n,))
    targets[[3, 11]] = -100  # ignored, as F.cross_entropy ignores them
    weights = torch.rand(n, dtype=torch.float64) * 3 if weighted else None
    expected = grads(plain_loss_sum, features, weight, targets, weights)
    fused = grads(lambda x, w, y, v: linear_cross_entropy_sum(x, w, y, v, chunk_tokens),
                  features, weight, targets, weights)
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def fused_and_plain(head, features, targets, weights=None, chunk_tokens=5, autocast=False):
    """(loss, features' gradient, head's gradient) through head_loss_sum, fused and then not (a forward
    hook makes the head unfusable)."""
    results = []
    for fused in (True, False):
        head.zero_grad()
        x = features.clone().requires_grad_()
        hook = None if fused else head.register_forward_pre_hook(lambda *_: None)
        assert fusable(head) is fused
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = head_loss_sum(x, head, targets, weights, chunk_tokens=chunk_tokens)
        loss.backward()
        results.append((loss.detach(), x.grad, head.weight.grad.clone()))
        if hook:
            hook.remove()
    return results


def test_head_loss_sum_takes_the_fused_path_and_matches_the_checkpointed_one():
    torch.manual_seed(1)
    head = nn.Linear(16, 50, bias=False)
    fused, plain = fused_and_plain(head, torch.randn(2, 9, 16), torch.randint(50, (2, 9)), torch.rand(2, 9))
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_under_autocast_the_head_runs_in_its_dtype_and_matches_the_plain_path():
    """bf16 autocast (a GPU run's setting, here on CPU): the matmuls in bf16, the softmax in float32."""
    torch.manual_seed(2)
    head = nn.Linear(32, 100, bias=False)
    fused, plain = fused_and_plain(head, torch.randn(40, 32), torch.randint(100, (40,)), chunk_tokens=16,
                                   autocast=True)
    assert fused[0].dtype == torch.float32 and fused[2].dtype == torch.float32
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_only_plain_bias_free_linears_are_fused():
    assert fusable(nn.Linear(4, 8, bias=False))
    assert not fusable(nn.Linear(4, 8))
    assert not fusable(nn.Sequential(nn.Linear(4, 8, bias=False)))


def test_a_zero3_head_is_fused_while_its_weight_is_gathered():
    """ZeRO-3 hooks every module and marks its parameters (ds_id); read inside the engine's forward, the
    weight is gathered to its full shape, elsewhere it is an empty placeholder (tests/test_zero.py runs
    the real engine)."""
    head = nn.Linear(4, 8, bias=False)
    head.register_forward_pre_hook(lambda *_: None)
    head.weight.ds_id = 0
    assert fusable(head)
    head.weight.data = torch.empty(0)
    assert not fusable(head)


def test_no_grad_computes_the_loss_only():
    head = nn.Linear(8, 20, bias=False)
    features, targets = torch.randn(6, 8), torch.randint(20, (6,))
    with torch.no_grad():
        loss = head_loss_sum(features, head, targets)
    torch.testing.assert_close(loss, plain_loss_sum(features, head.weight, targets))



@pytest.fixture(scope="module")
def vocab_split_runs(tmp_path_factory):
    jobs = [{"name": f"v{vocab}_c{chunk}_w{int(weighted)}", "vocab": vocab, "chunk_tokens": chunk,
             "weighted": weighted}
            for vocab, chunk, weighted in [(13, 7, True), (13, 64, False), (16, 5, True)]]
    return launch(WORKER, jobs, tmp_path_factory.mktemp("vocab_split"), world=2, timeout=LAUNCH_TIMEOUT_S)


@pytest.mark.parametrize("job", ["v13_c7_w1", "v13_c64_w0", "v16_c5_w1"])
def test_a_head_split_by_vocabulary_gives_the_dense_heads_loss_and_gradients(vocab_split_runs, job):
    """tp=2, float64: the fused loss over the split head (the vocabulary padded from 13 to 14, or 16 not
    padded) equals the dense head's on the whole vocabulary, as does the checkpointed vocab-parallel path
    (in float32: megatron's cross-entropy casts the logits)."""
    got = vocab_split_runs[job]
    assert got["fused"] <= 1e-12, got
    assert got["checkpointed"] <= 1e-4, got
