"""Run the Triton chunk-step kernels through Triton's compiler front end for a CUDA target, on any machine.

Why: Triton's CPU interpreter (how CI runs the kernels) executes them as Python, so it accepts code the
compiler refuses, e.g. a loop-carried variable whose type changes inside a loop. That only showed on a
GPU. The front end (Python AST to Triton IR, where such rules are enforced) needs no GPU, so this
checks every specialisation the model launches, and CI runs it.

    python -m titans.kernels.cuda_frontend        # exit status 1 and the errors when one is refused

It must run in a fresh process with TRITON_INTERPRET unset or 0 (`triton.jit` reads it at import); it
uses Triton's compile pipeline up to the first IR, which is not a public API: where this Triton lacks
it, the check says so and exits 0.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator

os.environ["TRITON_INTERPRET"] = "0"

# (b, D, H): the tests' shapes (tests/test_triton_chunk_step.py) and the paper configs' (head 64,
# hidden 256, chunk 64); depth 1 has H == D
SHAPES = ((16, 16, 32), (16, 32, 32), (64, 64, 256), (64, 128, 512))


def specialisations() -> Iterator[dict]:
    """Every constexpr combination the launcher (`chunk_step_triton._prepare`) can produce for SHAPES."""
    from titans.kernels.chunk_step_triton import BLOCK_HIDDEN

    for (b, dim, hidden), depth, residual, clip, dtype in itertools.product(
            SHAPES, (1, 2), (True, False), (True, False), ("fp32", "fp64")):
        hidden = hidden if depth == 2 else dim
        block = min(hidden, BLOCK_HIDDEN) if depth == 2 else hidden
        for prec in ("ieee", "tf32") if dtype == "fp32" else ("ieee",):
            yield dict(B=b, D=dim, H=hidden, BH=block, DEPTH=depth, RESIDUAL=residual, CLIP=clip,
                       PREC=prec, dtype=dtype)


def front_end(kernel, meta: dict, capability: int = 90) -> None:
    """Triton IR for `kernel` specialised by `meta` (pointer arguments of meta["dtype"]); raises the
    compiler's error when the kernel is refused."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    signature = {p.name: "constexpr" if p.is_constexpr else f"*{meta['dtype']}" for p in kernel.params}
    constants = {name: meta[name] for name, kind in signature.items() if kind == "constexpr"}
    source = ASTSource(kernel, signature, constexprs=constants)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    options = backend.parse_options(dict(**source.parse_options()))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                   context)


def main() -> int:
    try:
        from triton.compiler.compiler import make_backend  # noqa: F401

        from titans.kernels import chunk_step_triton as kernels
    except ImportError as err:
        print(f"skipped: {err}")
        return 0
    failures = 0
    count = 0
    for meta in specialisations():
        for kernel in (kernels._chunk_forward_kernel, kernels._chunk_backward_kernel):
            count += 1
            try:
                front_end(kernel, meta)
            except Exception as err:  # the compiler's error, reported with the specialisation
                failures += 1
                lines = [line for line in str(err).splitlines() if line.strip()]
                print(f"REFUSED {kernel.__name__} {meta}: {type(err).__name__}: {' | '.join(lines[-3:])}")
    print(f"{count - failures} of {count} kernel specialisations pass Triton's CUDA front end")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
