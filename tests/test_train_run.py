"""The training job as users run it: the CLI in a subprocess, SIGTERM, TensorBoard contents."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.corpus import expand_inputs
from data_pipeline.prepare import prepare
from pretrain.checkpoint import latest_checkpoint, load_checkpoint

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


@pytest.mark.timeout(180)
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(dataset, tmp_path):
    args = cli_args(dataset, tmp_path, "train.steps=100000", "train.checkpoint_every=100000",
                    "train.eval_every=100000")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while latest_checkpoint(tmp_path) is None and not (tmp_path / "tensorboard").exists():
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.5)
    time.sleep(3)  # some steps
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "signal received: saved step" in out
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert 0 < state["step"] < 100000


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
