"""Shared by the training tests: a small real-text dataset (fixture `dataset` in conftest.py) and a small
run config on it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from data_pipeline.corpus import expand_inputs
from data_pipeline.prepare import prepare
from pretrain.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str) -> ModuleType:
    """A script of bench/ imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_dataset(out: Path) -> Path:
    """A small real-text byte dataset: this repository's own Python sources (relative ids: a stable split)."""
    files = expand_inputs([str(ROOT / "titans"), str(ROOT / "pretrain")], ("*.py",))
    prepare(files, out, "bytes", sample_tokens=33, shard_samples=64, val_fraction=0.2, progress=False)
    return out


def small_config(dataset: Path, out: Path, *overrides: str) -> RunConfig:
    base = [
        f"data.train={dataset}", "data.default_corpus=false", "data.seq_len=32", "data.batch_size=2",
        "model.vocab_size=257", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.layers=mac,mag",
        "model.window=8", "model.segment_len=16", "model.memory_chunk=8", "model.n_persistent=2",
        f"train.out_dir={out}", "train.steps=20", "train.warmup_steps=2", "train.eval_every=10",
        "train.eval_batches=2", "train.checkpoint_every=5", "train.log_every=5", "train.lr=3e-3",
    ]
    return load_config(None, base + list(overrides))


def tiny_family(path: Path, dataset: Path, tokens: list[int], *overrides: str) -> Path:
    """A scaling family (pretrain.scaling) of three widths of a tiny MAC on `dataset`, 64 tokens a step."""
    every = ", ".join([f"data.train={dataset}", "data.default_corpus=false", "data.seq_len=32",
                       "data.batch_size=2", "model.window=8", "model.segment_len=16", "model.memory_chunk=8",
                       "train.eval_batches=2", *overrides])
    path.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\noverrides: [{every}]\n"
                    "sizes:\n  s16: [model.dim=16, model.n_heads=2]\n  s32: [model.dim=32, model.n_heads=2]\n"
                    f"  s64: [model.dim=64, model.n_heads=2]\ntokens: {tokens}\n")
    return path


def fill_disk(monkeypatch, full: Callable[[int], bool]) -> None:
    """The training job's checkpoint commit fails with ENOSPC for the steps where `full(step)`."""
    import pretrain.train as train_module

    real = train_module.save_checkpoint

    def save(out, step, *args, **kwargs):
        if full(step):
            raise OSError(28, "No space left on device")
        return real(out, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", save)
