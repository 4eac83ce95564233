"""The fused chunk step against `memory_chunk_step` + autograd: the analytic torch backward
(`titans/kernels/chunk_step_reference.py`, also by gradcheck) and the Triton kernels
(`titans/kernels/chunk_step_triton.py`).

The Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before triton is
imported) unless the environment sets TRITON_INTERPRET=0, which runs them compiled on a CUDA device.
"""

import os
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titans.kernels.chunk_step_reference import analytic_chunk_step, chunk_step_backward
from titans.kernels.chunk_step_reference import example_step as make_step
from titans.memory import ScanOptions, memory_chunk_step

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: triton.jit reads it then
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

try:
    import triton  # noqa: F401

    from titans.kernels.chunk_step_triton import triton_chunk_step
    TRITON_MISSING = None
except ImportError as error:  # the torch tests below still run
    TRITON_MISSING = (f"triton is not importable ({error}); it comes with pip install -e \".[dev]\" "
                      "(Linux only: triton has no wheels elsewhere)")
needs_triton = pytest.mark.skipif(TRITON_MISSING is not None, reason=TRITON_MISSING or "")
if not INTERPRET and not torch.cuda.is_available():
    needs_triton = pytest.mark.skip(reason="TRITON_INTERPRET=0 runs the kernels on CUDA, and there is none")


def value_and_grads(step, opts: ScanOptions, inputs: list[torch.Tensor], seed: int = 1):
    """The step's outputs and the gradients of every input for random output gradients."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    outputs = step(opts, *inputs)
    gen = torch.Generator().manual_seed(seed)
    probes = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outputs]
    grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outputs, probes)), inputs)
    return [o.detach() for o in outputs], list(grads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def max_rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    assert len(got) == len(want)
    return max(rel_err(a, b) for a, b in zip(got, want))


CASES = [(depth, residual, clip) for depth in (1, 2) for residual in (True, False) for clip in (False, True)]


# -- the analytic backward in torch --------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("residual_norm", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_analytic_backward_equals_autograd(depth, residual_norm, clip):
    opts, inputs = make_step(depth, residual_norm, clip, b=8, hidden=24)
    want = value_and_grads(memory_chunk_step, opts, inputs)
    got = value_and_grads(analytic_chunk_step, opts, inputs)
    assert max_rel_err(got[0] + got[1], want[0] + want[1]) <= 1e-12


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("residual_norm", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_analytic_backward_gradcheck(depth, residual_norm, clip):
    opts, inputs = make_step(depth, residual_norm, clip, n_rows=2, b=3, dim=4, hidden=6)
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *t: analytic_chunk_step(opts, *t), inputs)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("clip", [False, True])
def test_analytic_backward_takes_no_matmul_twice(depth, clip):
    """Inductor fuses repeated elementwise work but runs every matmul it is given, so the compiled
    backward is only as lean as this one: no product of the same two operands twice."""
    opts, inputs = make_step(depth, True, clip, b=8, hidden=24)
    state = tuple(inputs[8:])
    grad_y = torch.randn_like(inputs[0])
    grad_end = tuple(torch.randn_like(s) for s in state)
    products, operands = Counter(), []  # operands held, so that no freed one's memory is reused

    def operand(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t.shape, t.stride()

    class CountMatmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default):
                products[operand(args[0]), operand(args[1])] += 1
                operands.extend(args[:2])
            return func(*args, **(kwargs or {}))

    with CountMatmuls():
        chunk_step_backward(opts, *inputs[:8], state, grad_y, grad_end)
    assert products and max(products.values()) == 1


# -- the Triton kernels ------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("depth,residual_norm,clip", CASES)
def test_triton_matches_float32_autograd(depth, residual_norm, clip):
    """float32 kernels against the float32 torch step + autograd, and both against float64."""
    opts, inputs = make_step(depth, residual_norm, clip)
    exact = value_and_grads(memory_chunk_step, opts, inputs)
    inputs32 = [t.float() for t in inputs]
    torch32 = value_and_grads(memory_chunk_step, opts, inputs32)
    kernel = value_and_grads(triton_chunk_step, opts, [t.to(DEVICE) for t in inputs32])
    assert all(t.dtype == torch.float32 for t in kernel[0] + kernel[1])
    assert max_rel_err(kernel[0] + kernel[1], torch32[0] + torch32[1]) <= 1e-5
    assert max_rel_err(kernel[0] + kernel[1], exact[0] + exact[1]) <= 1e-5


@needs_triton
@pytest.mark.parametrize("depth,residual_norm,clip", CASES)
def test_triton_matches_float64_autograd(depth, residual_norm, clip):
    """In float64 the kernels equal the torch step to rounding: the derivation is exact."""
    opts, inputs = make_step(depth, residual_norm, clip, seed=2)
    want = value_and_grads(memory_chunk_step, opts, inputs)
    got = value_and_grads(triton_chunk_step, opts, [t.to(DEVICE) for t in inputs])
    assert max_rel_err(got[0] + got[1], want[0] + want[1]) <= 1e-12


@needs_triton
@pytest.mark.parametrize("residual_norm,clip,tile", [(True, True, 16), (False, False, 16), (True, False, 16),
                                                     (True, True, 64)])
def test_triton_hidden_tiles_match_float64_autograd(monkeypatch, residual_norm, clip, tile):
    """A depth-2 state walked in 4 hidden tiles (as the paper's hidden 256 is in tiles of 16) or in one
    equals the torch step: every sum over the hidden dimension is accumulated across tiles before use."""
    import titans.kernels.chunk_step_triton as kernels

    monkeypatch.setattr(kernels, "BLOCK_HIDDEN", tile)
    opts, inputs = make_step(2, residual_norm, clip, hidden=64, seed=5)
    want = value_and_grads(memory_chunk_step, opts, inputs)
    got = value_and_grads(triton_chunk_step, opts, [t.to(DEVICE) for t in inputs])
    assert max_rel_err(got[0] + got[1], want[0] + want[1]) <= 1e-12


@needs_triton
def test_a_launch_over_shared_memory_shrinks_until_it_fits(monkeypatch):
    """When a card's shared memory refuses a specialisation (OutOfResources at launch), the launch halves
    the hidden tile, then the warps, gets the same step, and remembers the launch that fitted for the next
    chunk."""
    from triton.runtime.errors import OutOfResources

    import titans.kernels.chunk_step_triton as kernels

    launches = []

    class SmallCard:  # the kernel on a card whose shared memory holds tiles of 16 on 4 warps at most
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                launches.append((meta["BH"], meta["num_warps"]))
                if meta["BH"] > 16 or meta["num_warps"] > 4:
                    raise OutOfResources(2 * meta["BH"], 32, "shared memory")
                return self.kernel[grid](*args, **meta)
            return launch

    for name in ("_chunk_forward_kernel", "_chunk_backward_kernel"):
        monkeypatch.setattr(kernels, name, SmallCard(getattr(kernels, name)))
    monkeypatch.setattr(kernels, "_FITTING_LAUNCH", {})
    monkeypatch.setattr(kernels, "BLOCK_HIDDEN", 64)
    monkeypatch.setattr(kernels, "NUM_WARPS", 8)
    opts, inputs = make_step(2, True, True, hidden=64, seed=5)
    want = value_and_grads(memory_chunk_step, opts, inputs)
    got = value_and_grads(triton_chunk_step, opts, [t.to(DEVICE) for t in inputs])
    assert max_rel_err(got[0] + got[1], want[0] + want[1]) <= 1e-12
    assert launches == [(64, 8), (32, 8), (16, 8), (16, 4)] * 2  # forward, then backward
    value_and_grads(triton_chunk_step, opts, [t.to(DEVICE) for t in inputs])
    assert launches[8:] == [(16, 4), (16, 4)]  # remembered: no failing launch again


@needs_triton
def test_triton_two_chunks_and_partial_gradients():
    """Chained like the scan (the end state feeds the next chunk), from a start state that needs no
    gradient, with a loss on y only: missing output gradients and unneeded inputs are handled."""
    opts, inputs = make_step(2, True, True, seed=3)
    _, second = make_step(2, True, True, seed=4)

    def run(step, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        chunks = [[t.to(device).requires_grad_(i < 8) for i, t in enumerate(x)] for x in (inputs, second)]
        state = chunks[0][8:]
        ys = []
        for chunk in chunks:
            y, *state = step(opts, *chunk[:8], *state)
            ys.append(y)
        loss = sum(y.square().sum() for y in ys)
        wanted = chunks[0][:8] + chunks[1][:8]
        # eta_prod, beta, gamma of the second chunk (and eta_prod of the first) only reach the unused
        # end state: zero gradients
        grads = torch.autograd.grad(loss, wanted, allow_unused=True, materialize_grads=True)
        return loss.detach(), list(grads)

    want_loss, want = run(memory_chunk_step, "cpu")
    got_loss, got = run(triton_chunk_step, DEVICE)
    assert rel_err(got_loss, want_loss) <= 1e-12
    assert max_rel_err(got, want) <= 1e-12


@needs_triton
def test_triton_constants_are_made_once():
    """The kernels' constants tensor is built once per device, dtype and clip, not per chunk step: built
    from host values on a GPU it is a blocking copy that would stall the host before every chunk (the GPU
    check `no host-device sync` covers the whole step there)."""
    from titans.kernels.chunk_step_triton import _constants

    opts, inputs = make_step(2, True, True, seed=3)
    inputs = [t.to(DEVICE) for t in inputs]
    triton_chunk_step(opts, *inputs)
    made = _constants.cache_info().misses
    for _ in range(2):
        triton_chunk_step(opts, *inputs)
    assert _constants.cache_info().misses == made


@needs_triton
@pytest.mark.parametrize("change,message", [
    (dict(depth=3), "depth 1 or 2"),
    (dict(hidden=24), "hidden to be a power of two"),
    (dict(b=8), "chunk size to be a power of two >= 16"),
])
def test_triton_rejects_unsupported_shapes(change, message):
    kw = dict(depth=2, residual_norm=True, clip=False) | change
    opts, inputs = make_step(**kw)
    with pytest.raises(ValueError, match=message):
        triton_chunk_step(opts, *[t.to(DEVICE) for t in inputs])


@needs_triton
def test_triton_rejects_mismatched_inputs():
    """The kernels index raw pointers: a wrong shape or a mixed dtype must fail before they run."""
    opts, inputs = make_step(2, True, False)
    inputs = [t.to(DEVICE) for t in inputs]
    with pytest.raises(ValueError, match=r"input 3 of the chunk step has shape \(3, 15\)"):
        triton_chunk_step(opts, *inputs[:3], inputs[3][:, 1:], *inputs[4:])
    with pytest.raises(ValueError, match="every input in float32 or every one in float64"):
        triton_chunk_step(opts, inputs[0].float(), *inputs[1:])


@needs_triton
@pytest.mark.parametrize("recompute", [False, True])
def test_module_with_triton_kernel_equals_torch_path(recompute, one_hidden_tile):
    """NeuralMemory with memory_kernel "triton" (the scan's chunk step swapped for the kernels) equals the
    torch path in float32: outputs, end state and every gradient, across chunks and a gradient cut."""
    from titans.memory import NeuralMemory

    def memory(kernel: str) -> NeuralMemory:
        torch.manual_seed(0)
        return NeuralMemory(dim=32, heads=2, head_dim=16, depth=2, hidden=32, chunk_size=16,
                            recompute=recompute, max_grad_norm=1.0, grad_horizon=2, kernel=kernel).to(DEVICE)

    x = torch.randn(2, 72, 32, device=DEVICE, requires_grad=True)  # 5 chunks, the last partial
    results = []
    for kernel in ("torch", "triton"):
        mem = memory(kernel)
        y, state = mem(x)
        loss = y.square().sum() + sum(w.square().sum() for w in state.weights)
        results.append([y, *state.weights, *torch.autograd.grad(loss, [x, *mem.parameters()])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def scan_inputs(depth: int, clip: bool, n_chunks: int = 5) -> tuple[ScanOptions, list[torch.Tensor], list]:
    """A scan's chunk-major inputs (n_chunks, N, ·) in float64, built by a memory from random tokens, and a
    start state away from the memory's initial one; the gradient horizon cuts every 2 chunks."""
    from titans.memory import NeuralMemory

    torch.manual_seed(depth)
    mem = NeuralMemory(32, 2, 16, depth=depth, hidden=32, chunk_size=16, max_grad_norm=1.0 if clip else None,
                       grad_horizon=2).double()
    x = torch.randn(2, 16 * n_chunks, 32, dtype=torch.float64)
    with torch.no_grad():
        q, k, v, _ = mem.project(x, None)
        inputs = mem.chunk_inputs(q, k, v, *mem.gates(x), torch.float64)
        state = mem.initial_state(2)
    rows = inputs[0].shape[1]
    start = [(s + 0.01 * torch.randn_like(s)).reshape(rows, *s.shape[2:])
             for s in (*state.weights, *state.momentum)]
    return mem.scan_options, [t.to(DEVICE) for t in inputs], [s.to(DEVICE) for s in start]


@needs_triton
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("clip", [False, True])
def test_triton_scan_in_one_launch_equals_its_chunk_steps(depth, clip):
    """The whole-scan kernels (every chunk in one launch, forward and backward) against the per-chunk
    kernels called chunk by chunk as the recomputing scan does, across the gradient horizon's cuts."""
    from titans.kernels.chunk_step_triton import triton_chunk_step_backward, triton_scan, triton_scan_backward

    opts, inputs, start = scan_inputs(depth, clip)
    n_chunks, first_chunk = inputs[0].shape[0], 3  # global chunks 3..7: cuts before 4 and 6
    y, boundaries = triton_scan(opts, inputs, start)
    state, ys, starts = start, [], []
    for i in range(n_chunks):
        starts.append(state)
        y_i, *state = triton_chunk_step(opts, *(t[i] for t in inputs), *state)
        ys.append(y_i)
    assert max_rel_err([y, *(b[-1] for b in boundaries)], [torch.stack(ys), *state]) <= 1e-12
    y_alone, end = triton_scan(opts, inputs, start, keep_boundaries=False)  # inference: 2 state slots
    assert max_rel_err([y_alone, *(e[-1] for e in end)], [y, *(b[-1] for b in boundaries)]) == 0

    gen = torch.Generator().manual_seed(5)
    grad_y = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(DEVICE)
    grad_end = [torch.randn(s.shape, generator=gen, dtype=s.dtype).to(DEVICE) for s in start]
    grads, grad_start = triton_scan_backward(opts, first_chunk, inputs, boundaries, grad_y, grad_end)
    per_chunk: list[list[torch.Tensor]] = [[] for _ in inputs]
    grad_state = grad_end
    for i in reversed(range(n_chunks)):
        every = triton_chunk_step_backward(opts, *(t[i] for t in inputs), tuple(starts[i]), grad_y[i],
                                           tuple(grad_state))
        for collected, g in zip(per_chunk, every[:8], strict=True):
            collected.insert(0, g)
        grad_state = list(every[8:])
        if opts.cuts_before(first_chunk + i):
            grad_state = [torch.zeros_like(g) for g in grad_state]
    assert max_rel_err([*grads, *grad_start], [*(torch.stack(g) for g in per_chunk), *grad_state]) <= 1e-12
    # chunk 3 is not cut, so its start weights get its read's gradient (its momentum none: 4 is cut)
    assert all(g.abs().sum() > 0 for g in grad_start[:depth])


@needs_triton
def test_module_inference_with_triton_kernel_equals_torch_path():
    """Without gradients the scan takes the whole-scan kernel keeping no boundary states."""
    from titans.memory import NeuralMemory

    x = torch.randn(2, 72, 32, device=DEVICE)
    outputs = []
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        mem = NeuralMemory(dim=32, heads=2, head_dim=16, depth=2, hidden=32, chunk_size=16, max_grad_norm=1.0,
                           kernel=kernel).to(DEVICE)
        with torch.no_grad():
            y, state = mem(x)
        outputs.append([y, *state.weights, *state.momentum])
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_triton
def test_scan_op_with_triton_kernel_equals_its_eager_scan(monkeypatch, one_hidden_tile):
    """Under torch.compile the whole-scan kernels run inside the scan's custom op (titans/scan_op.py):
    the same values and gradients, in float64, as their eager autograd Function."""
    from test_compile import memory_run

    eager, op = (memory_run("triton", as_op, monkeypatch, DEVICE, chunk=16, head_dim=16)
                 for as_op in (False, True))
    assert max_rel_err(op, eager) <= 1e-12
