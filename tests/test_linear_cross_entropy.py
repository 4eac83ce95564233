"""The fused head + cross-entropy equals the plain chunked loss: value and gradients, weights, ignored
targets, chunk boundaries; and it is used only where the head is a plain linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.linear_cross_entropy import fusable, linear_cross_entropy_sum
from pretrain.loss import head_loss_sum


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


def test_head_loss_sum_takes_the_fused_path_and_matches_the_checkpointed_one():
    torch.manual_seed(1)
    head = nn.Linear(16, 50, bias=False)
    features = torch.randn(2, 9, 16, requires_grad=True)
    targets, weights = torch.randint(50, (2, 9)), torch.rand(2, 9)
    results = []
    for fused in (True, False):
        head.zero_grad()
        features.grad = None
        hook = None if fused else head.register_forward_pre_hook(lambda *_: None)  # makes it unfusable
        assert fusable(head) is fused
        loss = head_loss_sum(features, head, targets, weights, chunk_tokens=5)
        loss.backward()
        results.append((loss.detach(), features.grad.clone(), head.weight.grad.clone()))
        if hook:
            hook.remove()
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_only_plain_bias_free_linears_are_fused():
    assert fusable(nn.Linear(4, 8, bias=False))
    assert not fusable(nn.Linear(4, 8))
    assert not fusable(nn.Sequential(nn.Linear(4, 8, bias=False)))


def test_no_grad_computes_the_loss_only():
    head = nn.Linear(8, 20, bias=False)
    features, targets = torch.randn(6, 8), torch.randint(20, (6,))
    with torch.no_grad():
        loss = head_loss_sum(features, head, targets)
    torch.testing.assert_close(loss, plain_loss_sum(features, head.weight, targets))
