"""The Triton chunk-step kernels compiled for CUDA without a GPU (`titans.kernels.cuda_frontend`).

The interpreter tests (test_triton_chunk_step.py) check the kernels' arithmetic; these check what only the
compiler sees: the language's rules (every specialisation through the front end, in CI) and, with
RUN_SLOW=1, the shared memory the paper shape needs against an H100's limit (minutes of compiling).
Each runs in a subprocess, since `triton.jit` fixed TRITON_INTERPRET=1 when this session imported it.
"""

import ast
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton comes with pip install -e \".[dev]\" (Linux only)")

SLOW = os.environ.get("RUN_SLOW") == "1"


def run_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # the module sets TRITON_INTERPRET=0 itself, before triton is imported
    return subprocess.run([sys.executable, "-m", "titans.kernels.cuda_frontend", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_every_specialisation_passes_the_cuda_front_end():
    result = run_check(timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in result.stdout or " pass Triton's CUDA front end" in result.stdout, result.stdout


def test_a_compiled_kernel_reports_its_registers_spills_and_shared_memory():
    """What --shared-memory and --resources print, for one small kernel compiled to cubin (seconds): ptxas's
    report is read, not lost to a change in how Triton prints it."""
    code = ("from titans.kernels.cuda_frontend import compile_report; print(compile_report("
            "'_scan_forward_kernel', dict(B=16, D=16, H=32, BH=16, DEPTH=2, RESIDUAL=True, CLIP=True, "
            "PREC='tf32', dtype='fp32', num_warps=4)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = ast.literal_eval(result.stdout.strip().splitlines()[-1])  # the dict it printed
    assert report["shared"] > 0 and 0 < report["registers"] <= 255, report
    assert report["spill_stores"] is not None and report["spill_loads"] is not None, report


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="compiles the paper shape's kernels to cubin (minutes): RUN_SLOW=1")
def test_paper_shape_fits_h100_shared_memory():
    result = run_check("--shared-memory", timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
