"""The training job as users run it: the CLI in a subprocess, SIGTERM, TensorBoard contents."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.corpus import expand_inputs
from data_pipeline.prepare import prepare
from pretrain.checkpoint import latest_checkpoint, load_checkpoint
from pretrain.train import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    files = expand_inputs([str(ROOT / "titans")], ("*.py",))  # ids relative: a stable split
    prepare(files, out, "bytes", sample_tokens=33, shard_samples=64, val_fraction=0.2, progress=False)
    return out


def cli_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pretrain.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"data.train={dataset}", "data.default_corpus=false", "data.seq_len=32", "data.batch_size=2",
            "model.dim=32", "model.n_heads=2", "model.window=8", "model.segment_len=16",
            "model.memory_chunk=8", f"train.out_dir={out}", "train.warmup_steps=2", "train.eval_batches=2",
            *extra]


def start_long_run(dataset: Path, out: Path) -> subprocess.Popen:
    """A CLI run that would take hours, once it has started stepping."""
    args = cli_args(dataset, out, "train.steps=100000", "train.checkpoint_every=100000",
                    "train.eval_every=100000")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while not (out / "tensorboard").exists():
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.5)
    time.sleep(3)  # some steps
    return proc


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_exits_as_interrupted(dataset, tmp_path, sig):
    proc = start_long_run(dataset, tmp_path)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, out  # not 0: a scheduler must tell it from a finished run
    assert re.search(r"interrupted at step \d+ of 100000: saved .*step_\d+; run the same command", out), out
    assert "done:" not in out
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert 0 < state["step"] < 100000


def test_a_second_signal_exits_at_once():
    """The first signal asks the loop to save at the end of the step; a second one (the step is too long,
    or the user insists) exits at once with 128 + its number."""
    script = ("import os, signal, time\n"
              "from pretrain.train import StopSignal\n"
              "stop = StopSignal()\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "time.sleep(0.2)\n"
              "assert stop.received == signal.SIGTERM\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(5)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert "SIGTERM received: saving at the end of this step" in done.stderr
    assert "second signal (SIGINT): exiting now without saving" in done.stderr


@pytest.mark.timeout(180)
def test_rerunning_a_finished_run_says_so(dataset, tmp_path):
    args = cli_args(dataset, tmp_path, "train.steps=3", "train.eval_every=3")
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=170,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=170,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "this run already finished: 3 steps, checkpoint" in again.stdout and "done:" not in again.stdout


@pytest.mark.timeout(180)
def test_cli_run_logs_training_and_memory_diagnostics(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = subprocess.run(cli_args(dataset, tmp_path, "train.steps=12", "train.eval_every=6",
                                   "train.log_every=3", "train.checkpoint_every=6"),
                          cwd=ROOT, capture_output=True, text=True, timeout=170,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tensorboard --logdir" in done.stdout and "checkpoint:" in done.stdout
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/flops_per_s",
                "val/loss", "val/perplexity"}
    for layer in (0, 1):
        expected |= {f"memory/layer{layer}/{k}" for k in ("surprise_norm", "theta", "eta", "alpha")}
    assert expected <= tags, expected - tags
    theta = [e.value for e in events.Scalars("memory/layer0/theta")]
    assert all(0 < t <= 1 / 8 for t in theta)  # θ ≤ θ_max = 1 / memory_chunk


def test_srun_environment_is_read(monkeypatch):
    """Under srun, rank and world size come from SLURM_*; a missing rendezvous address is named."""
    from parallel.mesh import init_mesh

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(RuntimeError, match="rank 1: MASTER_ADDR is not set"):
        init_mesh()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    single = init_mesh()
    assert (single.rank, single.world_size, single.is_main) == (0, 1, True)
