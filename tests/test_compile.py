"""torch.compile of blocks (parallel/compile.py, `train.compile`) and the scan's custom ops behind it
(titans/scan_op.py): the ops against the eager scan in float64, every block kind compiled with
fullgraph=True against eager (MAC by its segment step, compiled once per gradient-horizon phase), and the
training job compiled against eager.

Most cases compile with the "aot_eager" backend: it runs dynamo and AOT autograd over our ops exactly as
inductor does, without generating code (seconds, not minutes, on CPU). The inductor run is slow.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from run_helpers import small_config
from torch._dynamo.testing import CompileCounterWithBackend

import titans.memory
from pretrain.config import ConfigError
from pretrain.loss import causal_lm_loss
from pretrain.train import train
from titans.memory import NeuralMemory
from titans.model import TitansConfig, TitansLM
from titans.scan_op import memory_scan  # noqa: F401 (registers torch.ops.titans.*)

slow = pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="inductor compiles for minutes; RUN_SLOW=1")


def memory_run(kernel: str, as_op: bool, monkeypatch, device: str = "cpu", chunk: int = 4,
               head_dim: int = 8) -> list[torch.Tensor]:
    """Two calls of a float64 memory (the second continuing the first's state, across a gradient-horizon
    cut and a padded last chunk): outputs, end state, and the gradients of the input and every parameter.
    `as_op` takes the branch torch.compile takes (the scan's custom op, the conv as a plain sum), eagerly."""
    torch.manual_seed(0)
    memory = NeuralMemory(dim=16, heads=2, head_dim=head_dim, depth=2, hidden=2 * head_dim,
                          chunk_size=chunk, recompute=True, grad_horizon=3, max_grad_norm=0.5, kernel=kernel)
    memory = memory.double().to(device)
    x = torch.randn(2, 15 * chunk // 2, 16, dtype=torch.float64).to(device).requires_grad_()
    with monkeypatch.context() as patch:
        patch.setattr(titans.memory, "compiling", lambda: as_op)
        y1, state = memory(x[:, : 3 * chunk])
        y2, state = memory(x[:, 3 * chunk :], state)
    outputs = [y1, y2, *state.weights, *state.momentum]
    probes = [torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(i)).to(device)
              for i, o in enumerate(outputs)]
    wrt = [x, *memory.parameters()]
    grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outputs, probes, strict=True)), wrt)
    return [o.detach() for o in outputs] + list(grads)


@pytest.mark.parametrize("kernel", ["torch", "analytic"])
def test_scan_op_equals_eager_scan_in_float64(kernel, monkeypatch):
    """The custom op's forward and registered backward (the analytic chunk backward, autograd being off
    inside an op) against the eager recomputing scan, through the gradient horizon's cuts."""
    eager, op = memory_run(kernel, False, monkeypatch), memory_run(kernel, True, monkeypatch)
    for a, b in zip(op, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_scan_op_passes_opcheck():
    """torch.library.opcheck: the schema, the fake (meta) implementation and the autograd registration."""
    torch.manual_seed(0)
    memory = NeuralMemory(dim=16, heads=2, head_dim=8, depth=2, hidden=16, chunk_size=4, recompute=True)
    x = torch.randn(1, 12, 16)
    q, k, v, _ = memory.project(x, None, ())
    state = memory.initial_state(1)
    inputs = [t.detach().requires_grad_(t.is_floating_point())
              for t in memory.chunk_inputs(q, k, v, *memory.gates(x), torch.float32)]
    flat = [t.reshape(2, *t.shape[2:]).detach().requires_grad_() for t in (*state.weights, *state.momentum)]
    options = (0, 2, True, None, None, "torch")  # first_chunk, then ScanOptions' fields
    torch.library.opcheck(torch.ops.titans.memory_scan.default, (inputs, flat, *options))


def tiny(layers: str) -> TitansConfig:
    return TitansConfig(vocab_size=97, dim=32, n_layers=2, n_heads=2, head_dim=16, layers=layers, window=16,
                        segment_len=16, n_persistent=2, memory_chunk=8, recompute_memory=True)


def loss_and_grads(model: TitansLM, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss = causal_lm_loss(model, tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(("layers", "seq_len"), [("swa", 48), ("mac", 48), ("mac", None), ("mag", 48),
                                                  ("mal", 48), ("lmm", 48)])
def test_block_compiles_and_matches_eager(layers, seq_len):
    """fullgraph=True: a graph break anywhere in a block or MAC's segment step (the scan, the conv) fails.
    MAC compiles whole at 48 tokens (three segments) and by segment step without a length."""
    from parallel.compile import compile_blocks

    torch.manual_seed(0)
    eager = TitansLM(tiny(layers))
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="aot_eager", seq_len=seq_len)
    tokens = torch.randint(0, 97, (2, 49))  # 48 tokens: three MAC segments, the last memory chunk full
    want_loss, want = loss_and_grads(eager, tokens)
    got_loss, got = loss_and_grads(compiled, tokens)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("layers", "frames"), [("mal", 4), ("mac", 2)])
def test_relay_halves_compile_and_match_eager(layers, frames):
    """Sequence parallelism's relay calls a block's halves around the attention halo, not its forward, so
    `compile_blocks(relay=True)` compiles those (MAL's memory layer before the halo too). One block over two
    shards, the second from the first's end state and halo as the relay passes them, equals eager; the
    first shard (no state, no halo) and the second each compiled once per half."""
    from parallel.compile import compile_blocks

    torch.manual_seed(0)
    eager = TitansLM(tiny(layers))
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compile_blocks(compiled, backend=counter, seq_len=24, relay=True)
    x = torch.randn(2, 48, 32)

    def two_shards(model: TitansLM) -> torch.Tensor:
        block, halo = model.blocks["0"], model.cfg.window - 1
        h1, state = block.before_halo(x[:, :24], None)
        y1, state = block.after_halo(h1, state, None, 0)
        h2, state = block.before_halo(x[:, 24:], state)
        y2, _ = block.after_halo(h2, state, h1[:, -halo:] if layers == "mal" else None, 24)  # MAC: no halo
        return torch.cat([y1, y2], dim=1)

    want, got = two_shards(eager), two_shards(compiled)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    want_grads = torch.autograd.grad(want.square().mean(), list(eager.blocks["0"].parameters()))
    got_grads = torch.autograd.grad(got.square().mean(), list(compiled.blocks["0"].parameters()))
    for name, g, w in zip(dict(eager.blocks["0"].named_parameters()), got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)
    assert counter.frame_count == frames


@pytest.mark.parametrize("horizon", [None, 1, 3, 16])
@pytest.mark.parametrize("length", [8, 24, 40])
def test_cut_phase_cuts_where_the_true_index_does(horizon, length):
    memory = NeuralMemory(dim=16, heads=2, head_dim=8, depth=2, hidden=16, chunk_size=8, grad_horizon=horizon)
    cuts = memory.scan_options.cuts_before
    for first in range(60):
        phase = memory.cut_phase(first, length)
        assert 0 <= phase <= (horizon or 0)
        assert [cuts(phase + i) for i in range(length // 8)] == [cuts(first + i) for i in range(length // 8)]


def test_mac_segment_step_compiles_once_per_phase():
    """Twelve segments (more than compile whole) across three gradient-horizon cuts, two MAC layers: the
    segment step compiles for the first segment, a segment cut at its start and the rest, not once per
    segment, and equals eager."""
    from parallel.compile import compile_blocks

    torch.manual_seed(0)
    eager = TitansLM(replace(tiny("mac"), memory_grad_horizon=8))  # segment 16 = 2 chunks: a cut every 4th
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compile_blocks(compiled, backend=counter, seq_len=12 * 16)
    tokens = torch.randint(0, 97, (2, 12 * 16 + 1))
    want_loss, want = loss_and_grads(eager, tokens)
    got_loss, got = loss_and_grads(compiled, tokens)
    assert counter.frame_count == 3
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("checkpointing", "seq_len"), [(False, 32), (True, 32), (False, 144)])
def test_training_job_compiled_matches_eager(dataset, tmp_path, checkpointing, seq_len):
    """train.compile through the whole job: same losses as the eager run (validation without gradients and
    a logging step's memory statistics compile too), also inside activation checkpointing, and with MAC
    compiled by segment step (144 tokens: nine segments of 16)."""
    common = ("model.layers=mac,lmm", "train.steps=6", "train.eval_every=3", "train.log_every=2",
              "train.checkpoint_every=3", f"train.activation_checkpointing={str(checkpointing).lower()}",
              f"data.seq_len={seq_len}")
    eager = train(small_config(dataset, tmp_path / "eager", *common))
    compiled = train(small_config(dataset, tmp_path / "compiled", *common, "train.compile=true",
                                  "train.compile_backend=aot_eager"))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)


@slow
def test_training_job_compiled_with_inductor_matches_eager(dataset, tmp_path):
    common = ("model.layers=mac", "model.n_layers=1", "train.steps=4", "train.eval_every=0",
              "train.checkpoint_every=4")
    eager = train(small_config(dataset, tmp_path / "eager", *common))
    compiled = train(small_config(dataset, tmp_path / "compiled", *common, "train.compile=true"))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)


@pytest.mark.parametrize(("override", "named"), [("parallel.zero_stage=3", "parallel.zero_stage=3"),
                                                 ("train.compile_backend=nope", "train.compile_backend")])
def test_compile_config_errors_name_the_field(override, named, tmp_path):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        small_config(tmp_path, tmp_path / "out", "train.compile=true", override)


def test_inductor_check_reports_a_missing_compiler(monkeypatch):
    import torch._inductor.config as inductor_config

    from titans.kernels.toolchain import inductor_cpu_problem

    if shutil.which("g++"):  # .ci/run installs it where it can
        assert inductor_cpu_problem() is None
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/g++",))
    assert "InvalidCxxCompiler" in inductor_cpu_problem.__wrapped__()


@pytest.mark.parametrize(("overrides", "named"), [
    (("model.memory_kernel=compiled",), "model.memory_kernel=compiled compile C++"),
    (("train.compile=true",), "train.compile=true compile C++"),
    (("model.memory_kernel=compiled", "train.compile=true"), "or set model.memory_kernel=torch and "
                                                              "train.compile=false"),
])
def test_a_cpu_run_without_a_compiler_fails_at_start_naming_the_setting(dataset, tmp_path, monkeypatch,
                                                                         overrides, named):
    import pretrain.train

    monkeypatch.setattr(pretrain.train, "inductor_cpu_problem", lambda: "InvalidCxxCompiler: none here")
    with pytest.raises(ConfigError, match=named):
        train(small_config(dataset, tmp_path, *overrides))
    assert not (tmp_path / "checkpoints").exists()


def test_a_triton_run_off_cuda_fails_at_start(dataset, tmp_path, monkeypatch):
    import titans.kernels.chunk_step_triton as triton_kernels

    monkeypatch.setattr(triton_kernels, "interpreted", lambda: False)  # the tests run Triton's interpreter
    want = "model.memory_kernel=triton needs a CUDA device, and this run is on cpu: set model.memory_kernel="
    with pytest.raises(ConfigError, match=want):
        train(small_config(dataset, tmp_path, "model.memory_kernel=triton"))


def test_tracing_without_generating_code_needs_no_compiler(dataset, tmp_path, monkeypatch):
    import pretrain.train

    monkeypatch.setattr(pretrain.train, "inductor_cpu_problem", lambda: "InvalidCxxCompiler: none here")
    result = train(small_config(dataset, tmp_path, "train.compile=true", "train.compile_backend=aot_eager",
                                "train.steps=1", "train.warmup_steps=0"))
    assert len(result.losses) == 1


def test_compile_time_bench_prints_its_table():
    """bench/compile_time.py end to end at a tiny size (tracing only), MAC compiled both ways."""
    root = Path(__file__).resolve().parents[1]
    args = ["--config", "configs/tiny.yaml", "--seq", "64", "--batch", "2", "--backend", "aot_eager",
            "--whole-mac", "--steps", "1"]
    out = subprocess.run([sys.executable, str(root / "bench/compile_time.py"), *args], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["model", "eager", "compiled, MAC by segment step (aot_eager)",
                    "compiled, MAC blocks whole (aot_eager)"]
