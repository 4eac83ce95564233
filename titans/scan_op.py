"""The memory's chunk scan as two `torch.library` custom ops, so that `torch.compile` can take a whole block.

Eager training runs the scan through autograd Functions (`RecomputedScan`, `KernelScan` in
titans/memory.py). torch.compile cannot trace those: the recomputing backward runs autograd inside a
backward, so dynamo breaks the graph there and MAC's segment loop falls back to eager. Behind a custom op
the scan is one opaque node of the graph, with its backward a second op; everything around it (the
projections, gates, conv, attention, the MLP) compiles, and on a GPU each block becomes a few fused kernels
instead of thousands of launches.

The ops run the same functions as the eager path (`recomputed_scan`, or a kernel's whole scan), with one
difference: an op's body runs below autograd, so it cannot rebuild a chunk's graph to differentiate it. The
"torch" chunk step's backward is therefore the analytic one (titans/kernels/chunk_step_reference.py), the
same math, checked against autograd in tests/test_triton_chunk_step.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from titans.memory import ScanOptions, recomputed_scan, recomputed_scan_backward, scan_kernel_of


@torch.library.custom_op("titans::memory_scan", mutates_args=())
def memory_scan(inputs: list[Tensor], state: list[Tensor], first_chunk: int, n_layers: int,
                residual_norm: bool, max_grad_norm: float | None, grad_horizon: int | None,
                kernel: str) -> list[Tensor]:
    """The scan's forward: [y, *end_state, *boundaries], boundaries as `memory_scan_backward` takes them
    (a whole-scan kernel's stacked (n_chunks + 1, N, ·) per state tensor; else each chunk's start state).
    inputs: the 8 chunk-major scan inputs (`NeuralMemory.chunk_inputs`); state: 2L tensors (N, ·);
    first_chunk: the global index of the first chunk, where the backward's gradient horizon cuts fall."""
    opts = ScanOptions(n_layers, residual_norm, max_grad_norm, grad_horizon, kernel)
    whole = scan_kernel_of(kernel)
    if whole is not None:
        y, boundaries = whole[0](opts, inputs, state)
        return [y, *(b[-1].clone() for b in boundaries), *boundaries]
    y, end, boundaries = recomputed_scan(opts, inputs, state)
    # an op's outputs may not alias its inputs: the first chunk's start state is the input state
    state_ids = {id(s) for s in state}
    return [y, *end, *(b.clone() if id(b) in state_ids else b for b in boundaries)]


@memory_scan.register_fake
def _(inputs, state, first_chunk, n_layers, residual_norm, max_grad_norm, grad_horizon, kernel):
    n_chunks = inputs[0].shape[0]
    if scan_kernel_of(kernel) is not None:
        boundaries = [s.new_empty(n_chunks + 1, *s.shape) for s in state]
    else:
        boundaries = [s.new_empty(s.shape) for _ in range(n_chunks) for s in state]
    return [inputs[0].new_empty(inputs[0].shape), *(s.new_empty(s.shape) for s in state), *boundaries]


@torch.library.custom_op("titans::memory_scan_backward", mutates_args=())
def memory_scan_backward(inputs: list[Tensor], boundaries: list[Tensor], grad_y: Tensor,
                         grad_end: list[Tensor], needed: list[bool], first_chunk: int, n_layers: int,
                         residual_norm: bool, max_grad_norm: float | None, grad_horizon: int | None,
                         kernel: str) -> list[Tensor]:
    """The scan's backward: the gradients of the 8 inputs (an empty tensor where not `needed`), then of
    the start state; the gradient horizon's cuts fall as for a scan starting at global chunk `first_chunk`."""
    whole = scan_kernel_of(kernel)
    if whole is not None:
        opts = ScanOptions(n_layers, residual_norm, max_grad_norm, grad_horizon, kernel)
        grads, grad_start = whole[1](opts, first_chunk, inputs, boundaries, grad_y, grad_end)
        grads = [g if need else None for g, need in zip(grads, needed, strict=True)]
    else:  # autograd is off in here: the torch step's backward is its analytic form
        opts = ScanOptions(n_layers, residual_norm, max_grad_norm, grad_horizon,
                           "analytic" if kernel == "torch" else kernel)
        grads, grad_start = recomputed_scan_backward(opts, first_chunk, inputs, boundaries, grad_y,
                                                     grad_end, needed)
    grads = [g if g is not None else t.new_empty(0) for g, t in zip(grads, inputs, strict=True)]
    return grads + list(grad_start)


@memory_scan_backward.register_fake
def _(inputs, boundaries, grad_y, grad_end, needed, *rest):
    grads = [t.new_empty(t.shape) if need else t.new_empty(0) for t, need in zip(inputs, needed, strict=True)]
    return grads + [g.new_empty(g.shape) for g in grad_end]


def _setup_context(ctx, inputs, output) -> None:
    scan_inputs, state, ctx.first_chunk, *ctx.options = inputs
    ctx.n_state, ctx.whole = len(state), scan_kernel_of(ctx.options[-1]) is not None
    ctx.needed = [t.requires_grad for t in scan_inputs]
    ctx.save_for_backward(*scan_inputs, *output[1 + len(state):])


def _backward(ctx, grads: list[Tensor | None]) -> tuple[list[Tensor | None] | list[Tensor] | None, ...]:
    saved = ctx.saved_tensors
    scan_inputs, boundaries = saved[:8], saved[8:]
    grad_y = grads[0] if grads[0] is not None else torch.zeros_like(scan_inputs[0])
    # an end state nothing used has no gradient: zeros of its shape
    shapes = [b[0] for b in boundaries] if ctx.whole else boundaries[:ctx.n_state]
    grad_end = [g if g is not None else torch.zeros_like(s)
                for g, s in zip(grads[1:1 + ctx.n_state], shapes, strict=True)]
    out = memory_scan_backward(list(scan_inputs), list(boundaries), grad_y, grad_end, ctx.needed,
                               ctx.first_chunk, *ctx.options)
    grad_inputs = [g if need else None for g, need in zip(out[:8], ctx.needed, strict=True)]
    return grad_inputs, out[8:], None, None, None, None, None, None


memory_scan.register_autograd(_backward, setup_context=_setup_context)
