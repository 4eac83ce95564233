"""Whether torch.compile's inductor can build code for the CPU on this machine.

Why: on CPU inductor writes C++ and builds it with the system's compiler, at the first call. Without one
(a slim container, a fresh cloud image) `memory_kernel: compiled` or `train.compile: true` fails at the
first training step, minutes in, with a long inductor traceback. Asking once, with a tiny function, turns
that into an error before any work starts that names the setting and the fix; a loaded model can fall back
to the eager kernel, which computes the same function.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def inductor_cpu_problem() -> str | None:
    """None when inductor finds a C++ compiler and compiles and runs a small function on CPU here, else
    what went wrong (the first line of inductor's error). The compiler is looked up on its own too: inductor
    caches built code on disk, so the small function may not need one where a model's code will. Cached:
    one check per process, a few seconds the first time."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # private: skipped where it moved
    except ImportError:
        get_cpp_compiler = None
    try:
        if get_cpp_compiler is not None:
            get_cpp_compiler()
        compiled = torch.compile(lambda x: x * 2 + 1, backend="inductor", fullgraph=True, dynamic=False)
        out = compiled(torch.ones(8))
    except Exception as err:  # any failure means the same thing here: inductor cannot build for CPU
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
    if not torch.equal(out, torch.full((8,), 3.0)):
        return "inductor's compiled code computed a wrong result"
    return None


def runnable_kernel(kernel: str, device_type: str) -> str:
    """`kernel` where it can run on `device_type`, else "torch" (the same function, eager): a checkpoint
    trained with the Triton kernel on a GPU, or the compiled one on a machine with a compiler, still loads
    for evaluation on a CPU without them."""
    if kernel == "triton" and device_type != "cuda":
        try:  # off CUDA the kernels run only in Triton's interpreter, as their module was imported
            from titans.kernels.chunk_step_triton import interpreted
        except ImportError:  # no triton installed
            return "torch"
        return kernel if interpreted() else "torch"
    if kernel == "compiled" and device_type == "cpu" and inductor_cpu_problem() is not None:
        return "torch"
    return kernel
