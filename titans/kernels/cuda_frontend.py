"""Compile the Triton chunk-step kernels for a CUDA target on any machine, GPU or not.

Why: Triton's CPU interpreter (how CI runs the kernels) executes them as Python, so it accepts what the
compiler refuses (a loop-carried variable whose type changes inside a loop) and says nothing of what a
kernel needs from the hardware (shared memory, registers). Both first showed on a GPU. Triton compiles for
a named target without one (its wheel carries ptxas), so:

    python -m titans.kernels.cuda_frontend                  # every specialisation through the front end
    python -m titans.kernels.cuda_frontend --shared-memory  # the paper shape compiled to cubin as launched:
                                                            # shared memory against the cards', registers,
                                                            # spills (seconds to minutes per kernel)
    python -m titans.kernels.cuda_frontend --resources      # the same for every hidden tile × warps

The front-end pass (Python AST to Triton IR, where the language's rules are enforced) takes seconds and
runs in CI. Exit status 1 when a kernel is refused or needs more shared memory than an H100 gives a block.
It must run in a fresh process (`triton.jit` reads TRITON_INTERPRET at import, so it is set to 0 here
first). It uses Triton's compile pipeline up to the first IR, which is not a public API: where this
Triton lacks it, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"

# (b, D, H): the tests' shapes (tests/test_triton_chunk_step.py) and the paper configs' (head 64,
# hidden 256, chunk 64), and a wider head; depth 1 has H == D
SHAPES = ((16, 16, 32), (16, 32, 32), (64, 64, 256), (64, 128, 512))
PAPER_SHAPE = (64, 64, 256)
# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability
SHARED_MEMORY_LIMITS = {90: ("H100 / H200", 232_448), 80: ("A100", 166_912)}


# The whole-scan kernels' integer arguments; every other non-constexpr argument is a pointer
INTEGER_ARGUMENTS = ("n_chunks", "rows", "slots")
KERNELS = ("_chunk_forward_kernel", "_chunk_backward_kernel", "_scan_forward_kernel", "_scan_backward_kernel")
SCAN_KERNELS = KERNELS[2:]  # what training and inference launch


def specialisations(shapes: Sequence[tuple[int, int, int]] = SHAPES, depths: Sequence[int] = (1, 2)
                    ) -> Iterator[dict]:
    """Every constexpr combination the launcher (`chunk_step_triton._prepare`) can produce for `shapes`."""
    from titans.kernels.chunk_step_triton import hidden_tile

    for (b, dim, hidden), depth, residual, clip, dtype in itertools.product(
            shapes, depths, (True, False), (True, False), ("fp32", "fp64")):
        hidden = hidden if depth == 2 else dim
        for prec in ("ieee", "tf32") if dtype == "fp32" else ("ieee",):
            yield dict(B=b, D=dim, H=hidden, BH=hidden_tile(depth, hidden), DEPTH=depth, RESIDUAL=residual,
                       CLIP=clip, PREC=prec, dtype=dtype)


def kernel_source(kernel, meta: dict):
    """`kernel` specialised by `meta`'s constexprs, every pointer argument of meta["dtype"]."""
    from triton.compiler import ASTSource

    signature = {p.name: "constexpr" if p.is_constexpr else "i32" if p.name in INTEGER_ARGUMENTS
                 else f"*{meta['dtype']}" for p in kernel.params}
    constants = {name: meta[name] for name, kind in signature.items() if kind == "constexpr"}
    return ASTSource(kernel, signature, constexprs=constants)


def front_end(kernel, meta: dict, capability: int = 90) -> None:
    """Triton IR for the specialised kernel; raises the compiler's error when the kernel is refused."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    source = kernel_source(kernel, meta)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    options = backend.parse_options(source.parse_options())
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                   context)


def compile_report(name: str, meta: dict, capability: int = 90) -> dict:
    """The kernel `name` compiled to cubin for sm_`capability` as the launcher runs it (meta's num_warps,
    the launcher's num_stages): shared memory in bytes, and from ptxas's report the registers per thread
    and the bytes each thread spills to local memory (stores, loads; None where the report was not
    read). Compiled in a fresh cache, so that ptxas runs and reports."""
    import contextlib
    import io
    import re
    import tempfile
    from unittest import mock

    import triton
    from triton.backends.compiler import GPUTarget

    from titans.kernels import chunk_step_triton as kernels

    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache:
        settings = mock.patch.dict(os.environ, TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        with settings, contextlib.redirect_stdout(log):  # stdout: where Triton prints ptxas's report
            options = {"num_stages": kernels.NUM_STAGES, "num_warps": meta["num_warps"]}
            compiled = triton.compile(kernel_source(getattr(kernels, name), meta),
                                      target=GPUTarget("cuda", capability, 32), options=options)
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    return {"shared": compiled.metadata.shared, "registers": registers and int(registers[1]),
            "spill_stores": spills and int(spills[1]), "spill_loads": spills and int(spills[2])}


def check_front_end() -> int:
    from titans.kernels import chunk_step_triton as kernels

    failures = count = 0
    for meta in specialisations():
        for kernel in (getattr(kernels, name) for name in KERNELS):
            count += 1
            try:
                front_end(kernel, meta)
            except Exception as err:  # the compiler's error, reported with the specialisation
                failures += 1
                lines = [line for line in str(err).splitlines() if line.strip()]
                print(f"REFUSED {kernel.__name__} {meta}: {type(err).__name__}: {' | '.join(lines[-3:])}")
    print(f"{count - failures} of {count} kernel specialisations pass Triton's CUDA front end")
    return 1 if failures else 0


def paper_shape_launches(kernels: Sequence[str], tiles: Sequence[int] | None = None,
                         warps: Sequence[int] | None = None) -> list[tuple[str, dict]]:
    """(kernel, meta) at the paper shape in float32 (clipping on: the larger), both dot precisions, with
    the launcher's hidden tile and warps, or every combination of `tiles` and `warps`."""
    from titans.kernels import chunk_step_triton as launcher

    tiles = tiles or [launcher.BLOCK_HIDDEN]
    warps = warps or [launcher.NUM_WARPS]
    return [(name, {**meta, "BH": tile, "num_warps": w})
            for meta in specialisations([PAPER_SHAPE], depths=[2])
            if meta["dtype"] == "fp32" and meta["RESIDUAL"] and meta["CLIP"]
            for name in kernels for tile in tiles for w in warps]


def report(jobs: list[tuple[str, dict]], workers: int) -> int:
    """Compile `jobs` for sm_90 and print a row each: registers, spills, shared memory against the cards'.
    Exit status 1 when a launch the launcher makes first needs more shared memory than an H100 gives."""
    from titans.kernels import chunk_step_triton as launcher

    limit_name, limit = SHARED_MEMORY_LIMITS[90]
    print(f"compiling {len(jobs)} kernels for sm_90 ({workers} at a time; seconds to minutes each), paper "
          f"shape: b {PAPER_SHAPE[0]}, head {PAPER_SHAPE[1]}, hidden {PAPER_SHAPE[2]}, float32, clipping",
          flush=True)
    print("| kernel | dots | hidden tile | warps | registers | spill stores B | spill loads B | shared B | "
          + " | ".join(card for card, _ in SHARED_MEMORY_LIMITS.values()) + " |")
    print("|---|---|---:|---:|---:|---:|---:|---:|" + "---|" * len(SHARED_MEMORY_LIMITS), flush=True)
    status = 0
    with ProcessPoolExecutor(workers) as pool:
        for (name, meta), got in zip(jobs, pool.map(compile_report, *zip(*jobs))):
            first = meta["BH"] == launcher.BLOCK_HIDDEN and meta["num_warps"] == launcher.NUM_WARPS
            fits = " | ".join("fits" if got["shared"] <= cap else "OVER"
                              for _, cap in SHARED_MEMORY_LIMITS.values())
            cells = " | ".join("?" if got[key] is None else f"{got[key]:,}"
                               for key in ("registers", "spill_stores", "spill_loads", "shared"))
            name += " (launcher's)" if first else ""
            print(f"| {name} | {meta['PREC']} | {meta['BH']} | {meta['num_warps']} | {cells} | {fits} |",
                  flush=True)
            status = 1 if first and got["shared"] > limit else status
    if status:
        print(f"a launcher's first launch needs more shared memory than an {limit_name} gives a block")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared-memory", action="store_true",
                        help="compile the paper shape's kernels to cubin as the launcher runs them: shared "
                             "memory (exit 1 over an H100's), registers and spills")
    parser.add_argument("--resources", action="store_true",
                        help="the same for the scan kernels at every --tiles × --warps: the table the "
                             "launcher's tile and warps were chosen from")
    parser.add_argument("--tiles", type=int, nargs="+", default=[16, 32, 64],
                        help="hidden tiles (--resources)")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16], help="warps (--resources)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="kernels compiled at a time (default: one per core)")
    args = parser.parse_args(argv)
    try:
        from triton.compiler.compiler import make_backend  # noqa: F401

        from titans.kernels import chunk_step_triton  # noqa: F401
    except ImportError as err:
        print(f"skipped: {err}")
        return 0
    if args.resources:
        return report(paper_shape_launches(SCAN_KERNELS, args.tiles, args.warps), args.workers)
    return report(paper_shape_launches(KERNELS), args.workers) if args.shared_memory else check_front_end()


if __name__ == "__main__":
    sys.exit(main())
