"""One rank of a multi-process training test (tests/test_zero.py, tests/test_parallel.py).

    python tests/train_worker.py spec.json

RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT come from the environment. The spec lists jobs
(run config overrides, optional NaN injection); each runs `pretrain.train.train` on an in-memory loader
(below); rank 0 writes every job's result to spec["results"]. The process ends with a barrier and
`os._exit(0)`: gloo can abort at interpreter exit after the work is done.

Why an in-memory loader. The real loader splits *shards* among dp ranks, so 1 process × batch 2B and
2 processes × batch B read different samples: no way to compare losses. `GlobalBatches` defines global
batch i (G rows of real text: standard-library sources) independently of the layout; dp rank r of n
takes rows [r·G/n, (r+1)·G/n). One process with batch G and n processes with batch G/n therefore see the
same global batch at every step, and the mean of the ranks' mean losses is the mean over the global batch.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def corpus_tokens() -> np.ndarray:
    """Bytes of a few standard-library sources: real text that no one edits while the test runs."""
    stdlib = Path(os.__file__).parent
    files = [stdlib / "argparse.py", stdlib / "textwrap.py", *sorted((stdlib / "json").glob("*.py"))]
    return np.frombuffer(b"\n".join(f.read_bytes() for f in files), dtype=np.uint8).astype(np.int64)


class GlobalBatches:
    """The loader of one dp rank: its rows of global batch 0, 1, 2, …; resumable by batch count."""

    def __init__(self, tokens: np.ndarray, global_batch: int, seq_len: int, rank: int, world: int,
                 offset: int = 0) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} ranks")
        self.tokens, self.global_batch, self.width = tokens, global_batch, seq_len + 1
        self.rows = range(rank * global_batch // world, (rank + 1) * global_batch // world)
        self.offset, self.consumed = offset, 0

    def batch(self, index: int) -> torch.Tensor:
        span = len(self.tokens) - self.width
        starts = [(self.offset + (index * self.global_batch + row) * 7919 * self.width) % span
                  for row in self.rows]
        return torch.from_numpy(np.stack([self.tokens[s:s + self.width] for s in starts]))

    def __iter__(self):
        while True:
            batch = self.batch(self.consumed)
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = state["batches"]


class GlobalSyntheticSequences:
    """data.synthetic_sequences over dp ranks the same way: global synthetic batch i (one distance, G
    sequences) generated from the run's seed alone; dp rank r takes its rows [r·G/n, (r+1)·G/n)."""

    def __init__(self, text: GlobalBatches, cfg, rank: int, world: int) -> None:
        from pretrain.data import SyntheticMix

        d, self.rank, self.world = cfg.data, rank, world
        self.mix = SyntheticMix(text, d.synthetic_sequences * world, d.synthetic_task, d.seq_len,
                                cfg.model.vocab_size, d.synthetic_weight, seed=d.seed, separate=True,
                                n_pairs=d.synthetic_pairs)

    def __iter__(self):
        for synthetic, text in self.mix:
            share = self.mix.rows // self.world
            rows = slice(self.rank * share, (self.rank + 1) * share)
            yield [type(synthetic)(synthetic.tokens[rows], synthetic.weights[rows]), text]

    def state_dict(self) -> dict[str, Any]:
        return self.mix.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mix.load_state_dict(state)


def in_memory_loaders(cfg, dp_rank: int, dp_size: int, barrier=None, is_main=None):
    """Drop-in for pretrain.data.build_loaders: global batch = data.batch_size × dp_size (and
    data.synthetic_sequences × dp_size synthetic sequences)."""
    tokens = corpus_tokens()
    global_batch = cfg.data.batch_size * dp_size
    train = GlobalBatches(tokens, global_batch, cfg.data.seq_len, dp_rank, dp_size)
    if cfg.data.synthetic_sequences:
        train = GlobalSyntheticSequences(train, cfg, dp_rank, dp_size)
    val = GlobalBatches(tokens, global_batch, cfg.data.seq_len, dp_rank, dp_size, offset=12345)

    def val_batches():
        return (val.batch(i) for i in range(cfg.train.eval_batches))

    return train, val_batches


def base_overrides(out: Path, batch_size: int, steps: int = 6) -> list[str]:
    return [
        "data.default_corpus=false", "data.seq_len=32", f"data.batch_size={batch_size}",
        "model.vocab_size=257", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.layers=mac,mag",
        "model.window=8", "model.segment_len=16", "model.memory_chunk=8", "model.n_persistent=2",
        f"train.out_dir={out}", f"train.steps={steps}", "train.warmup_steps=2", "train.eval_every=3",
        "train.eval_batches=2", "train.checkpoint_every=3", "train.log_every=3", "train.lr=3e-3",
    ]


def one_process(out: Path, batch_size: int, *extra: str, steps: int = 6):
    """The multi-process tests' reference: one process on the global batch of `batch_size` rows, with the
    in-memory loader."""
    import pretrain.train as train_module
    from pretrain.config import load_config

    real, train_module.build_loaders = train_module.build_loaders, in_memory_loaders
    try:
        return train_module.train(load_config(None, base_overrides(out, batch_size, steps) + list(extra)))
    finally:
        train_module.build_loaders = real


LOCAL_PARAMETER_ELEMENTS: list[int] = []  # this rank's parameter elements in the last ZeRO engine


def patch_for_tests() -> None:
    """In-memory data, and ZeRO-3 partitioning every parameter (DeepSpeed keeps parameters below 1e5
    elements whole by default: all of this tiny model's); records what the ZeRO engine left locally."""
    import parallel.zero as zero
    import pretrain.engine as engine_module
    import pretrain.train as train_module

    train_module.build_loaders = in_memory_loaders

    class TestEngine(zero.ZeroEngine):
        def __init__(self, model, *args, **kwargs):
            kwargs["config_overrides"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
            super().__init__(model, *args, **kwargs)
            LOCAL_PARAMETER_ELEMENTS[:] = [sum(p.numel() for p in model.parameters())]

    engine_module.ZeroEngine = TestEngine


def run_job(job: dict[str, Any], dist) -> dict[str, Any]:
    import pretrain.checkpoint_shards as shards_module
    import pretrain.engine as engine_module
    import pretrain.loss as loss_module
    import pretrain.train as train_module
    from parallel.fsdp import CollectiveBytes
    from pretrain.config import load_config

    real_loss_on, real_fused = engine_module.loss_on, loss_module.linear_cross_entropy_sum
    calls = {"n": 0, "fused": 0}
    nan_at = set(job.get("nan_calls", [])) if dist.rank == job.get("nan_rank", -1) else set()

    def loss_on(model, batch, autocast):
        calls["n"] += 1
        loss = real_loss_on(model, batch, autocast)
        return loss * math.nan if calls["n"] in nan_at else loss

    def fused(*args, **kwargs):
        calls["fused"] += 1
        return real_fused(*args, **kwargs)

    real_save = shards_module._save
    full_at = job.get("full_disk_step", 0) if dist.rank == job.get("full_disk_rank", -1) else 0

    def save_shard(obj, path):  # this rank's disk is full from the checkpoint of step `full_at` on
        if full_at and int(path.parent.parent.name.split("_")[1].split(".")[0]) >= full_at:
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    engine_module.loss_on, loss_module.linear_cross_entropy_sum = loss_on, fused
    shards_module._save = save_shard
    try:
        with CollectiveBytes() as moved:  # what FSDP's parameters were gathered and gradients reduced in
            result = train_module.train(load_config(None, job["overrides"]))
    except Exception as err:
        if not job.get("expect_error"):
            raise
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        engine_module.loss_on, loss_module.linear_cross_entropy_sum = real_loss_on, real_fused
        shards_module._save = real_save
    return {"losses": result.losses, "fused_loss_calls": calls["fused"],
            "val_losses": {str(k): v for k, v in result.val_losses.items()},
            "local_parameter_elements": LOCAL_PARAMETER_ELEMENTS[0] if LOCAL_PARAMETER_ELEMENTS else None,
            "skipped_steps": result.skipped_steps, "last_step": result.last_step,
            "parameters_per_rank": result.parameters_per_rank,
            "recall": {str(k): v for k, v in result.recall.items()},
            "fsdp_bytes": {"gathered": moved.gathered, "reduced": moved.reduced},
            "checkpoint": str(result.checkpoint) if result.checkpoint else None}


def main() -> None:
    from launcher import serve_jobs

    from parallel.mesh import init_mesh

    patch_for_tests()
    serve_jobs(sys.argv[1], init_mesh(), run_job)


if __name__ == "__main__":
    main()
