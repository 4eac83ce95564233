"""NeuralMemory's chunked fast path against the per-token reference; state carry; dtypes."""

import math
import shutil

import pytest
import torch
from reference_memory import reference_memory

from titans.memory import MemoryState, NeuralMemory, ShiftedProductConv, causal_depthwise_conv

LOGIT_1E4 = math.log(1e4)  # sigmoid(±LOGIT_1E4) ≈ 1 − 1e-4 / 1e-4


def make_memory(depth: int, chunk: int, eta_logit: float | None = None, alpha_logit: float | None = None,
                **kw) -> NeuralMemory:
    torch.manual_seed(depth * 100 + chunk)
    mem = NeuralMemory(dim=12, heads=2, head_dim=4, depth=depth, hidden=6, chunk_size=chunk, **kw).double()
    with torch.no_grad():  # data-dependent gates that vary a lot across tokens
        mem.to_gates.weight.normal_(std=0.5)
        mem.to_gates.bias.normal_(std=0.5)
        h = mem.heads
        if eta_logit is not None:
            mem.to_gates.weight[h : 2 * h] *= 0.01
            mem.to_gates.bias[h : 2 * h] = eta_logit
        if alpha_logit is not None:
            mem.to_gates.weight[2 * h :] *= 0.01
            mem.to_gates.bias[2 * h :] = alpha_logit
        mem.out_norm.weight.normal_(1.0, 0.2)
    return mem


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def objective(out, weights, momentum, probes) -> torch.Tensor:
    """A scalar touching the outputs and the whole end state, so every parameter gets a gradient."""
    total = (out * probes[0]).sum()
    for w, s, pw, ps in zip(weights, momentum, probes[1], probes[2]):
        total = total + (w * pw).sum() + (s * ps).sum()
    return total


def compare_to_reference(mem: NeuralMemory, T: int, grads_at_chunk_start: bool = True) -> float:
    """Largest relative error over outputs, end state and gradients of every parameter and the input."""
    torch.manual_seed(T)
    x = torch.randn(2, T, 12, dtype=torch.float64, requires_grad=True)
    out, state = mem(x)
    ref_out, ref_w, ref_s, ref_conv = reference_memory(mem, x, grads_at_chunk_start=grads_at_chunk_start)
    probes = (torch.randn_like(out), [torch.randn_like(w) for w in ref_w],
              [torch.randn_like(s) for s in ref_s])
    inputs = [x, *mem.parameters()]
    grads = torch.autograd.grad(objective(out, state.weights, state.momentum, probes), inputs)
    ref_grads = torch.autograd.grad(objective(ref_out, ref_w, ref_s, probes), inputs)
    pairs = [(out, ref_out), (state.conv, ref_conv), *zip(state.weights, ref_w), *zip(state.momentum, ref_s)]
    pairs += list(zip(grads, ref_grads))
    assert len(grads) == 1 + len(list(mem.parameters())) and all(g.abs().max() > 0 for g in ref_grads)
    return max(rel_err(a, b) for a, b in pairs)


@pytest.mark.parametrize("residual_norm", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 2, 16])
@pytest.mark.parametrize("T", [7, 19])
def test_fast_path_matches_per_token_reference(depth, chunk, T, residual_norm):
    assert compare_to_reference(make_memory(depth, chunk, residual_norm=residual_norm), T) <= 1e-6


@pytest.mark.parametrize("eta_logit", [-LOGIT_1E4, LOGIT_1E4])
@pytest.mark.parametrize("alpha_logit", [-LOGIT_1E4, LOGIT_1E4])
@pytest.mark.parametrize("chunk", [2, 16])
def test_fast_path_matches_reference_with_gates_at_extremes(eta_logit, alpha_logit, chunk):
    """η and α near 0 and near 1 (1e-4 from either end), in every combination."""
    mem = make_memory(2, chunk, eta_logit, alpha_logit)
    assert compare_to_reference(mem, 19) <= 1e-6


@pytest.mark.parametrize("depth,chunk", [(1, 2), (2, 16), (3, 4)])
def test_recomputed_backward_matches_reference(depth, chunk):
    """The custom backward (chunk-boundary states only, recompute per chunk) against the reference."""
    assert compare_to_reference(make_memory(depth, chunk, recompute=True), 19) <= 1e-6


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("depth,chunk", [(1, 2), (2, 16), (3, 4)])
def test_surprise_clipping_matches_reference(depth, chunk, recompute):
    """Per-token gradient-norm clipping, at a norm that clips some tokens and not others."""
    mem = make_memory(depth, chunk, max_grad_norm=0.5, recompute=recompute)
    assert compare_to_reference(mem, 19) <= 1e-6
    unclipped = make_memory(depth, chunk)
    x = torch.randn(1, 19, 12, dtype=torch.float64)
    assert not torch.allclose(mem(x)[0], unclipped(x)[0])  # the clip is active


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("residual_norm,clip", [(True, 0.5), (False, None)])
@pytest.mark.parametrize("depth,chunk", [(1, 2), (2, 16), (3, 4)])
def test_analytic_chunk_step_matches_reference(depth, chunk, residual_norm, clip, recompute):
    """The module with the explicit-backward chunk step (memory_kernel "analytic") against the reference,
    through the plain and the recomputing scan."""
    mem = make_memory(depth, chunk, residual_norm=residual_norm, max_grad_norm=clip, recompute=recompute,
                      kernel="analytic")
    assert compare_to_reference(mem, 19) <= 1e-6


# torch.compile's CPU backend builds C++ with g++ (.ci/run installs it where it is missing).
NO_GXX = shutil.which("g++") is None


@pytest.mark.skipif(NO_GXX, reason="memory_kernel 'compiled' needs g++ for torch.compile on CPU")
@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_chunk_step_matches_reference(recompute):
    """The module with the torch.compile'd chunk step (memory_kernel "compiled") against the reference,
    through the plain and the recomputing scan, with clipping and a gradient cut inside the sequence.
    One case each: compiling takes seconds per graph."""
    mem = make_memory(2, 4, max_grad_norm=0.5, recompute=recompute, grad_horizon=3, kernel="compiled")
    eager = make_memory(2, 4, max_grad_norm=0.5, recompute=recompute, grad_horizon=3)
    assert compare_to_reference(make_memory(2, 4, max_grad_norm=0.5, recompute=recompute, kernel="compiled"),
                                19) <= 1e-6
    x = torch.randn(2, 19, 12, dtype=torch.float64, requires_grad=True)
    (out, state), (want, want_state) = mem(x), eager(x)
    grads = torch.autograd.grad(out.square().sum() + state.weights[0].sum(), [x, *mem.parameters()])
    want_grads = torch.autograd.grad(want.square().sum() + want_state.weights[0].sum(),
                                     [x, *eager.parameters()])
    assert max(rel_err(a, b) for a, b in zip((out, *grads), (want, *want_grads))) <= 1e-10


def test_comparison_detects_token_level_gradients():
    """The test can fail: gradients at the running weights instead of the chunk start differ."""
    assert compare_to_reference(make_memory(2, 4), 12, grads_at_chunk_start=False) > 1e-3


def test_reference_state_carry_matches_fast_state_carry():
    mem = make_memory(2, 4)
    x = torch.randn(1, 16, 12, dtype=torch.float64)
    first = reference_memory(mem, x[:, :8])
    second = reference_memory(mem, x[:, 8:], state=first[1:])
    out, _ = mem(x)
    assert rel_err(torch.cat([first[0], second[0]], 1), out) <= 1e-6


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("depth,chunk,split", [(1, 4, 8), (2, 4, 12), (3, 16, 16)])
def test_state_carry_two_halves_equal_whole(depth, chunk, split, recompute):
    mem = make_memory(depth, chunk, recompute=recompute)
    x = torch.randn(2, 29, 12, dtype=torch.float64)
    whole, state = mem(x)
    first, mid = mem(x[:, :split])
    second, end = mem(x[:, split:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)
    for a, b in zip([*end.weights, *end.momentum, end.conv], [*state.weights, *state.momentum, state.conv]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("depth", [1, 2])
def test_read_only_state_reads_an_open_chunk_in_pieces(depth):
    """A read-only state (a stream's open chunk) gives the chunk's rows, fed in pieces, the outputs the
    written chunk gives them (chunk-causal reads), moves the conv history on and writes nothing."""
    mem = make_memory(depth, 8)
    x = torch.randn(2, 16 + 7, 12, dtype=torch.float64)  # two chunks, then 7 rows of an open one
    whole, _ = mem(x)
    _, state = mem(x[:, :16])
    outputs, read = [], MemoryState(state.weights, state.momentum, state.conv, state.chunks, read_only=True)
    for lo, hi in ((16, 17), (17, 20), (20, 23)):
        out, read = mem(x[:, lo:hi], read)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 1), whole[:, 16:], rtol=1e-12, atol=1e-12)
    assert all(a is b for a, b in zip(read.weights + read.momentum, state.weights + state.momentum))
    torch.testing.assert_close(read.conv, mem(x)[1].conv, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rows of one chunk"):
        mem(x[:, :9], read)


def test_recompute_gives_identical_outputs_and_gradients():
    x = torch.randn(2, 21, 12, dtype=torch.float64)
    results = []
    for recompute in (False, True):
        mem = make_memory(2, 4, recompute=recompute)
        out, state = mem(x)
        loss = out.square().sum() + state.weights[0].sum()
        results.append((out, torch.autograd.grad(loss, list(mem.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_state_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    mem = NeuralMemory(dim=16, heads=2, head_dim=8, chunk_size=4)
    x = torch.randn(2, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = mem(x)
        out2, state2 = mem(x, state)
    assert out.dtype == torch.bfloat16 and out2.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in (*state2.weights, *state2.momentum, state2.conv))


def test_detached_state_cuts_the_graph():
    mem = make_memory(2, 4)
    _, state = mem(torch.randn(1, 8, 12, dtype=torch.float64))
    detached = state.detach()
    assert isinstance(detached, MemoryState)
    assert not any(t.requires_grad for t in (*detached.weights, *detached.momentum))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="depth"):
        NeuralMemory(8, 2, 4, depth=0)
    with pytest.raises(ValueError, match="chunk_size"):
        NeuralMemory(8, 2, 4, chunk_size=0)
    with pytest.raises(ValueError, match="grad_horizon"):
        NeuralMemory(8, 2, 4, grad_horizon=0)
    with pytest.raises(ValueError, match="unknown memory kernel 'cuda'"):
        NeuralMemory(8, 2, 4, kernel="cuda")


def test_comparison_detects_reads_at_running_weights():
    """The test can fail: queries reading the running weights instead of the chunk-start weights differ."""
    mem = make_memory(2, 4)
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    out, _ = mem(x)
    assert rel_err(reference_memory(mem, x, reads_at_chunk_start=False)[0], out) > 1e-3


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("T", [2, 7])
def test_fast_path_matches_reference_from_an_arbitrary_state(T, recompute):
    """Start from random weights, momentum and conv history (T = 2 < kernel − 1 keeps old history rows);
    outputs, end state and gradients w.r.t. the incoming state, the input and the parameters agree."""
    mem = make_memory(2, 3, recompute=recompute)
    torch.manual_seed(7 + T)
    weights = [(0.5 * torch.randn(2, *w.shape, dtype=torch.float64)).requires_grad_()
               for w in mem.init_weights]
    momentum = [(0.1 * torch.randn_like(w)).requires_grad_() for w in weights]
    conv = torch.randn(2, mem.conv_kernel - 1, 3 * mem.heads * mem.head_dim, dtype=torch.float64,
                       requires_grad=True)
    x = torch.randn(2, T, 12, dtype=torch.float64, requires_grad=True)
    out, state = mem(x, MemoryState(weights, momentum, conv))
    ref = reference_memory(mem, x, state=(weights, momentum, conv))
    fast = [out, *state.weights, *state.momentum, state.conv]
    slow = [ref[0], *ref[1], *ref[2], ref[3]]
    probes = [torch.randn_like(t) for t in slow]
    # init_weights are unused when a state is given
    params = [p for n, p in mem.named_parameters() if "init_weights" not in n]
    inputs = [x, conv, *weights, *momentum, *params]
    grads = torch.autograd.grad(sum((t * p).sum() for t, p in zip(fast, probes)), inputs)
    ref_grads = torch.autograd.grad(sum((t * p).sum() for t, p in zip(slow, probes)), inputs)
    assert max(rel_err(a, b) for a, b in zip([*fast, *grads], [*slow, *ref_grads])) <= 1e-6


def grads_of(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(t)
            for g, t in zip(torch.autograd.grad(loss, inputs, allow_unused=True), inputs)]


@pytest.mark.parametrize("recompute", [False, True])
def test_gradient_horizon_equals_pieces_with_detached_state(recompute):
    """Cutting the state's gradient every `grad_horizon` chunks is exactly feeding the sequence in pieces
    of that many chunks, each starting from the previous piece's state detached (weights, momentum and
    conv history); the forward pass is unchanged."""
    mem = make_memory(2, 3, recompute=recompute, grad_horizon=2)
    x = torch.randn(2, 6 * 3 + 2, 12, dtype=torch.float64, requires_grad=True)  # 7 chunks, the last partial
    probe = torch.randn(2, x.shape[1], 12, dtype=torch.float64)
    out, state = mem(x)
    assert state.chunks == 7
    params = [x, *mem.parameters()]
    cut = grads_of((out * probe).sum(), params)

    pieces, piece_state = [], None
    for piece in x.split(6, dim=1):
        y, piece_state = mem(piece, None if piece_state is None else piece_state.detach())
        pieces.append(y)
    whole = torch.cat(pieces, dim=1)
    torch.testing.assert_close(whole, out, rtol=1e-12, atol=1e-12)
    for a, b in zip(cut, grads_of((whole * probe).sum(), params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    uncut = make_memory(2, 3, recompute=recompute)  # the same parameters, no horizon
    assert rel_err(cut[0], grads_of((uncut(x)[0] * probe).sum(), [x])[0]) > 1e-6  # the test can fail


def test_gradient_horizon_counts_chunks_across_calls():
    """The cuts fall on the sequence's chunk multiples wherever it is split into calls: two calls carrying
    the state give the gradients of one call."""
    mem = make_memory(1, 2, grad_horizon=3)
    x = torch.randn(1, 16, 12, dtype=torch.float64, requires_grad=True)
    probe = torch.randn_like(x)
    whole, _ = mem(x)
    first, state = mem(x[:, :4])
    second, _ = mem(x[:, 4:], state)
    params = [x, *mem.parameters()]
    for a, b in zip(grads_of((whole * probe).sum(), params),
                    grads_of((torch.cat([first, second], 1) * probe).sum(), params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_state_gradient_stays_bounded_over_long_sequences():
    """The outer gradient through 1,024 chunks (the tiny config's memory, surprise clipping on as by
    default): the first tokens' input gradient stays within a small factor of the last tokens' (with the
    LayerNorm epsilon at 1e-5 it was NaN)."""
    torch.manual_seed(0)
    mem = NeuralMemory(dim=128, heads=4, head_dim=32, depth=2, hidden=128, chunk_size=16, recompute=True,
                       max_grad_norm=1.0)
    x = torch.randn(1, 16384, 128, requires_grad=True)
    y, _ = mem(x)
    y.sum().backward()
    norms = x.grad[0].norm(dim=-1)
    assert all(torch.isfinite(p.grad).all() for p in mem.parameters())
    assert norms[:64].mean() < 10 * norms[-64:].mean()


@pytest.mark.parametrize("block_elements", [2**18, 36])  # one block; blocks of 3 tokens and a remainder
def test_causal_depthwise_conv_is_the_grouped_conv1d(monkeypatch, block_elements):
    """Output and both gradients, float64, with the sequence in one block and in many."""
    monkeypatch.setattr(ShiftedProductConv, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    window, weight = torch.randn(2, 13, 6, dtype=torch.float64), torch.randn(6, 1, 4, dtype=torch.float64)
    grad = torch.randn(2, 10, 6, dtype=torch.float64)
    results = []
    for conv in (causal_depthwise_conv,
                 lambda w, k: torch.nn.functional.conv1d(w.transpose(1, 2), k, groups=6).transpose(1, 2)):
        x, k = window.clone().requires_grad_(), weight.clone().requires_grad_()
        out = conv(x, k)
        out.backward(grad)
        results.append((out.detach(), x.grad, k.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
