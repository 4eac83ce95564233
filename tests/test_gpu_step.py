"""bench/gpu_step.py: the whole script on CPU with a tiny config (`--device cpu --tiny`), its correctness
checks on CPU (Triton's interpreter, a torch stand-in for flash-attn), and, on a CUDA machine, the same
checks on the GPU: the compiled kernels (run with TRITON_INTERPRET=0) and the real flash-attn."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as in test_triton_chunk_step.py: before triton.jit runs

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from test_attention import fake_flash_attn_func  # noqa: E402

from titans import attention  # noqa: E402
from titans.model import TitansConfig  # noqa: E402

# imported by name, not run_helpers.bench_module: its dataclasses need the module in sys.modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_step  # noqa: E402


def test_tiny_cpu_run_prints_the_table(capsys):
    """The smoke run: configs loaded, every variant and its SWA baseline timed, the table and the targets
    printed; in seconds."""
    status = gpu_step.main(["--device", "cpu", "--tiny", "--sizes", "340m", "--repeats", "1", "--seq", "64"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "# command: python bench/gpu_step.py --device cpu --tiny" in out
    assert "| size | variant | params | kernel | batch | step s |" in out
    rows = {line.split("|")[2].strip(): line.split("|") for line in out.splitlines()
            if line.startswith("| 340m |")}
    assert set(rows) == {"swa", "mac", "mag", "mal"}, out
    for cells in rows.values():
        assert int(cells[5]) == 1 and float(cells[6]) > 0  # batch, step seconds
    assert float(rows["mac"][13]) > 0  # x SWA time per token
    assert "# target: 340m MAC step / SWA step" in out


def test_a_failing_triton_kernel_falls_back_to_torch(monkeypatch, capsys):
    """A row whose Triton kernel raises (as one that cannot launch on a card would) is timed with the torch
    kernel and says so, and later rows use torch too."""
    kernels = pytest.importorskip("titans.kernels.chunk_step_triton")

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(kernels, "triton_chunk_step", broken)
    monkeypatch.setattr(kernels, "triton_scan", broken)  # what the recomputing scan launches
    monkeypatch.setattr(gpu_step, "choose_kernel", lambda args, device, fp32_matmul: "triton")
    status = gpu_step.main(["--device", "cpu", "--tiny", "--sizes", "340m", "--variants", "mac,mag",
                            "--repeats", "1", "--seq", "64"])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = {line.split("|")[2].strip(): line.split("|") for line in out.splitlines()
            if line.startswith("| 340m |")}
    assert rows["mac"][4].strip() == "torch" and "triton failed: RuntimeError" in rows["mac"][14]
    assert rows["mag"][4].strip() == "torch" and float(rows["mag"][6]) > 0


def test_train_compile_override_compiles_the_blocks(capsys):
    """`train.compile=true` (the GPU lease's compiled-block step) times the models with compiled blocks."""
    status = gpu_step.main(["--device", "cpu", "--tiny", "--sizes", "340m", "--variants", "mac", "--repeats",
                            "1", "--seq", "64", "train.compile=true", "train.compile_backend=aot_eager"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "blocks compiled (aot_eager, train.compile)" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 340m |")]
    assert rows and all(float(cells[6]) > 0 for cells in rows), out


def test_chunk_step_and_profile_on_cpu(capsys):
    """--chunk-step times the chunk step alone at the config's memory shape (torch and analytic on CPU:
    timing Triton's interpreter says nothing); --profile prints one step's top ops after the row's timing."""
    tiny = ["--device", "cpu", "--tiny", "--sizes", "340m", "--repeats", "1"]
    assert gpu_step.main([*tiny, "--chunk-step"]) == 0
    out = capsys.readouterr().out
    assert "| chunk step | float32 matmuls | forward ms | forward + backward ms | backward alone ms |" in out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines()
            if line.startswith(("| torch |", "| analytic |"))}
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows.values()), out
    assert rows["torch"][5].strip() == "-" and float(rows["analytic"][5]) > 0  # autograd's / explicit
    assert "| 340m |" not in out  # no model steps

    assert gpu_step.main([*tiny, "--variants", "mac", "--seq", "64", "--profile", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("# profile of one step") == 2  # SWA's row and MAC's
    assert "Self CPU" in out


def test_triton_scan_timing_runs_in_the_interpreter(one_hidden_tile):
    """The GPU table's scan timing (a launch per chunk against one per scan), on CPU in Triton's interpreter
    at a tiny shape: it runs and gives four times."""
    cfg = gpu_step.load_variant("340m", "mac", gpu_step.TINY_OVERRIDES).model
    opts, inputs = gpu_step.chunk_step_inputs(cfg, 2, torch.device("cpu"))
    times = gpu_step.time_triton_scan(opts, inputs, 3, torch.device("cpu"), 1)
    assert len(times) == 4 and all(t > 0 for t in times)


def test_scan_launch_table_runs_in_the_interpreter():
    """--scan-launches' table at a tiny shape in Triton's interpreter: a row per launch and precision, each
    launch as asked (the interpreter refuses none), and the kernels' own launch restored afterwards."""
    kernels = pytest.importorskip("titans.kernels.chunk_step_triton")
    cfg = gpu_step.load_variant("340m", "mac", gpu_step.TINY_OVERRIDES).model
    launch = kernels.BLOCK_HIDDEN, kernels.NUM_WARPS
    lines = list(gpu_step.scan_launch_table(cfg, 2, torch.device("cpu"), 1, seq=cfg.memory_chunk,
                                            launches=[(128, 8), (64, 4)]))
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[3:]]
    assert [row[:3] for row in rows] == [["tf32", "128", "8"], ["tf32", "64", "4"], ["ieee", "128", "8"],
                                         ["ieee", "64", "4"]], lines
    assert all(float(row[3]) > 0 and row[-1] == "" for row in rows), lines  # timed, nothing refused
    assert launch == (kernels.BLOCK_HIDDEN, kernels.NUM_WARPS)


@pytest.mark.skipif(os.environ["TRITON_INTERPRET"] != "1", reason="scan_host.py stubs interpreted kernels")
def test_scan_host_bench_prints_its_table(capsys):
    pytest.importorskip("titans.kernels.chunk_step_triton")
    import scan_host

    assert scan_host.main(["--rows", "2", "--chunks", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| forward |" in out and "| backward (the recomputing scan's) |" in out, out


def test_the_default_kernel_follows_the_float32_matmul_precision(capsys):
    """On CUDA the default is Triton only with TF32 matmuls: with exact ones its dots run on the FMA units,
    slower than the torch step (measured on an H100); an explicit --kernel is kept."""
    pytest.importorskip("titans.kernels.chunk_step_triton")
    cuda = torch.device("cuda")
    args = argparse.Namespace(kernel=None)
    assert gpu_step.choose_kernel(args, cuda, "tf32") == "triton"
    assert gpu_step.choose_kernel(args, cuda, "ieee") == "torch"
    assert "exact float32 matmuls" in capsys.readouterr().out
    assert gpu_step.choose_kernel(args, torch.device("cpu"), "tf32") == "torch"
    assert gpu_step.choose_kernel(argparse.Namespace(kernel="torch"), cuda, "tf32") == "torch"


def test_check_groups(capsys):
    """--check-only triton runs the Triton checks alone, --check-only attention the attention ones (a short
    GPU lease runs them in separate steps)."""
    assert gpu_step.main(["--device", "cpu", "--tiny", "--check-only", "attention"]) == 0
    out = capsys.readouterr().out
    assert "check flex attention: SKIP" in out and "check triton" not in out
    assert gpu_step.main(["--device", "cpu", "--tiny", "--check-only", "triton"]) == 0
    out = capsys.readouterr().out
    assert "check triton" in out and "attention" not in out


def test_out_of_memory_halves_the_batch(monkeypatch):
    """"Default batch or what fits": a row that runs out of memory is retried at half the batch."""
    batches = []

    def fake_time_step(cfg, batch, device, args):
        batches.append(batch)
        if batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 0.5, 3, 2**30

    monkeypatch.setattr(gpu_step, "time_step", fake_time_step)
    row = gpu_step.Row("340m", "mac", TitansConfig(memory_kernel="triton"), batch=8)
    gpu_step.run_row(row, torch.device("cpu"), argparse.Namespace(fallback_kernel="torch", kernel="triton"))
    assert batches == [8, 4, 2] and row.batch == 2 and row.seconds == 0.5 and row.error is None
    assert row.cfg.memory_kernel == "triton" and "out of memory at batch 4" in row.note


def test_tiny_run_rejects_unknown_sizes_and_full_configs_on_cpu():
    with pytest.raises(SystemExit):
        gpu_step.parse_args(["--device", "cpu", "--tiny", "--sizes", "1.3b"])
    with pytest.raises(SystemExit):
        gpu_step.parse_args(["--device", "cpu"])


def force_flash(monkeypatch) -> None:
    """The flash path on CPU tensors in bf16 whenever a flash function is set (as on a GPU)."""
    monkeypatch.setattr(attention, "_use_flash",
                        lambda q: attention.flash_attn_func is not None and q.dtype == torch.bfloat16)


def test_checks_on_cpu(monkeypatch):
    """The checks' own code: the Triton check in the interpreter, the flash check with a torch stand-in for
    flash-attn (forced onto the flash path on CPU), so a GPU run tests the kernels, not the checks."""
    if gpu_step.triton_status() is None and gpu_step.triton_interpreted():
        checks = gpu_step.check_triton_chunk_step(torch.device("cpu"), gpu_step.SMALL_CHUNK_STEP_SHAPES[:1])
        checks.append(gpu_step.check_triton_memory(torch.device("cpu"), small=True))
    else:
        checks = []
    monkeypatch.setattr(attention, "flash_attn_func", fake_flash_attn_func)
    force_flash(monkeypatch)
    checks += gpu_step.check_fused_attention(torch.device("cpu"), "flash", gpu_step.SMALL_ATTENTION_CASES)
    assert len(checks) >= len(gpu_step.SMALL_ATTENTION_CASES)
    assert all(check.passed for check in checks), "\n".join(check.line() for check in checks)


def test_a_wrong_kernel_fails_the_check(monkeypatch):
    """The flash check catches a wrong attention: a stand-in that drops the window fails it."""
    def no_window(*args, **kwargs):
        kwargs["window_size"] = (-1, -1)
        return fake_flash_attn_func(*args, **kwargs)

    monkeypatch.setattr(attention, "flash_attn_func", no_window)
    force_flash(monkeypatch)
    checks = gpu_step.check_fused_attention(torch.device("cpu"), "flash", gpu_step.SMALL_ATTENTION_CASES[:1])
    assert [check.passed for check in checks] == [False]
    assert "max rel err" in checks[0].detail  # failed on its error, not by raising


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checks_on_gpu():
    """The GPU checks at the paper's shapes: the Triton kernels compiled (only when TRITON_INTERPRET=0:
    otherwise this module set 1, and they are skipped here), flash-attn against the torch path."""
    checks = list(gpu_step.run_checks(torch.device("cuda"), small=False))
    print("\n".join(check.line() for check in checks))
    assert not [check for check in checks if check.passed is False], "\n".join(c.line() for c in checks)
