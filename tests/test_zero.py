"""DeepSpeed ZeRO stages 1–3 (and plain DDP, stage 0) in 2-process CPU runs over gloo, against the 1-process
run on the same global batch; exact resume from the ranks' ZeRO shards; non-finite steps skipped on all ranks.

All 2-process jobs run in one launch of two worker processes (tests/train_worker.py), which saves paying for
interpreter, torch and DeepSpeed start-up per job; each test then checks its part of the results. The
launch has a hard deadline: a hang fails with both ranks' logs. The data is an in-memory loader whose
global batch does not depend on the number of ranks (see train_worker.py for why the real one cannot).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from launcher import launch
from train_worker import base_overrides, one_process

from pretrain.checkpoint import load_checkpoint
from pretrain.config import ConfigError, load_config

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("train_worker.py")
WORLD = 2
MICRO_BATCH = 2  # per rank; the 1-process reference takes WORLD × MICRO_BATCH
LAUNCH_TIMEOUT_S = 400  # the first launch on a machine compiles DeepSpeed's shm comm op (~40 s on 2 cores)
STAGES = (0, 1, 2, 3)


def job(name: str, out: Path, stage: int, *extra: str, **fields) -> dict:
    overrides = base_overrides(out, MICRO_BATCH) + [f"parallel.zero_stage={stage}", *extra]
    return {"name": name, "overrides": overrides, **fields}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process plain run (stage 0) on the global batch: WORLD × MICRO_BATCH rows per step."""
    return one_process(tmp_path_factory.mktemp("reference"), WORLD * MICRO_BATCH)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """1-process plain runs with 2 accumulated micro-batches of WORLD rows, with bf16 autocast, and with
    WORLD separate synthetic sequences a step."""
    return {"accum": one_process(tmp_path_factory.mktemp("accum"), WORLD, "train.grad_accum=2"),
            "separate": one_process(tmp_path_factory.mktemp("separate"), WORLD * MICRO_BATCH,
                                    f"data.synthetic_sequences={WORLD}"),
            "bf16": one_process(tmp_path_factory.mktemp("bf16"), WORLD * MICRO_BATCH, "train.precision=bf16")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    jobs = [job(f"stage{s}", tmp / f"stage{s}", s) for s in STAGES]
    for s in STAGES[1:]:  # stop after 3 of 6 steps, then resume in a new engine
        jobs.append(job(f"stage{s}_first", tmp / f"split{s}", s, "train.stop_after_steps=3"))
        jobs.append(job(f"stage{s}_resumed", tmp / f"split{s}", s))
    # rank 1's second micro-batch loss (call 2: step 2) is NaN
    jobs += [job(f"stage{s}_nan", tmp / f"nan{s}", s, nan_rank=1, nan_calls=[2]) for s in (1, 3)]
    # accumulation: 2 micro-batches of 1 row per rank (the global micro-batch of the "accum" reference)
    jobs += [job(f"stage{s}_accum", tmp / f"accum{s}", s, "data.batch_size=1", "train.grad_accum=2")
             for s in STAGES[1:]]
    # bf16 (the GPU default) through DeepSpeed's torch_autocast mode; autocast works on CPU too
    jobs += [job(f"stage{s}_bf16", tmp / f"bf16{s}", s, "train.precision=bf16") for s in (2, 3)]
    # data.synthetic_sequences: two forwards per step, the gradients synced after the second
    jobs.append(job("stage0_separate", tmp / "separate0", 0, "data.synthetic_sequences=1"))
    jobs.append(job("wrong_stage", tmp / "stage0", 2, "train.steps=7", expect_error=True))
    started = time.monotonic()
    results = launch(WORKER, jobs, tmp, WORLD, LAUNCH_TIMEOUT_S)
    results["_seconds"] = time.monotonic() - started
    return results


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_match_one_process_on_the_same_global_batch(runs, reference, stage):
    got = runs[f"stage{stage}"]
    if stage == 3:  # parameters are sharded: nothing is left whole on a rank
        assert got["local_parameter_elements"] == 0, got["local_parameter_elements"]
    assert len(got["losses"]) == len(reference.losses) == 6
    assert all(close(a, b) for a, b in zip(got["losses"], reference.losses)), \
        (got["losses"], reference.losses)
    assert reference.losses[-1] < reference.losses[0]
    for step, val in reference.val_losses.items():
        assert close(got["val_losses"][str(step)], val), (step, got["val_losses"], reference.val_losses)


def test_ddp_with_separate_synthetic_sequences_matches_one_process(runs, references):
    got, want = runs["stage0_separate"]["losses"], references["separate"].losses
    assert all(close(a, b) for a, b in zip(got, want, strict=True)), (got, want)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_trains_with_the_fused_loss(runs, stage):
    """ZeRO-3's partitioned head too: the loss reading its weight in the engine's forward gathers it."""
    assert runs[f"stage{stage}"]["fused_loss_calls"] == 6  # one per training step, none in evaluation


@pytest.mark.parametrize("stage", STAGES[1:])
def test_zero_gradient_accumulation_matches_one_process(runs, references, stage):
    got, want = runs[f"stage{stage}_accum"]["losses"], references["accum"].losses
    assert len(got) == 6 and all(close(a, b) for a, b in zip(got, want)), (got, want)


@pytest.mark.parametrize("stage", (2, 3))
def test_zero_bf16_autocast_matches_one_process(runs, references, stage):
    got, want = runs[f"stage{stage}_bf16"]["losses"], references["bf16"].losses
    assert len(got) == 6 and all(close(a, b, rel=1e-3) for a, b in zip(got, want)), (got, want)


@pytest.mark.parametrize("stage", STAGES[1:])
def test_zero_resume_continues_bitwise(runs, stage):
    assert runs[f"stage{stage}_first"]["last_step"] == 3
    resumed, whole = runs[f"stage{stage}_resumed"], runs[f"stage{stage}"]
    assert resumed["last_step"] == 6
    assert resumed["losses"] == whole["losses"]  # bitwise on CPU
    assert resumed["val_losses"]["6"] == whole["val_losses"]["6"]  # (val losses are not checkpointed)


@pytest.mark.parametrize("stage", STAGES[1:])
def test_zero_checkpoint_holds_every_rank_shard_and_consolidates(runs, reference, stage):
    from parallel.zero import CHECKPOINT_DIR, CHECKPOINT_TAG, consolidated_state_dict

    ckpt = Path(runs[f"stage{stage}"]["checkpoint"])
    assert ckpt.name == "step_00000006"
    state = load_checkpoint(ckpt)
    assert "model" not in state and "optimizer" not in state
    assert state["zero"] == {"stage": stage, "dir": CHECKPOINT_DIR, "world_size": WORLD}
    assert len(state["data"]) == len(state["rng"]) == WORLD
    shards = sorted(p.name for p in (ckpt / CHECKPOINT_DIR / CHECKPOINT_TAG).glob("*optim_states.pt"))
    assert len(shards) == WORLD, shards
    assert not list(ckpt.parent.glob(".*.partial"))
    full = consolidated_state_dict(ckpt)
    ref = load_checkpoint(reference.checkpoint)["model"]
    params = {k for k, v in ref.items() if v.is_floating_point()}
    assert params <= set(full), sorted(params - set(full))
    for name in params:  # 6 AdamW steps from the same start on the same data: equal up to rounding
        torch.testing.assert_close(full[name], ref[name], rtol=0, atol=2e-5, msg=name)


@pytest.mark.parametrize("stage", (1, 3))
def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(runs, stage):
    got, clean = runs[f"stage{stage}_nan"], runs[f"stage{stage}"]
    assert got["skipped_steps"] == 1 and math.isnan(got["losses"][1])
    assert got["losses"][0] == clean["losses"][0]
    assert all(math.isfinite(x) for i, x in enumerate(got["losses"]) if i != 1)
    # the skipped step changed nothing: step 3 sees the same weights as step 2 did in the clean run,
    # on the next batch, so its loss differs from the clean run's step 3 but stays finite
    assert got["losses"][2] != clean["losses"][2]


def test_resume_with_another_stage_is_refused(runs):
    message = runs["wrong_stage"]["error"]
    assert "holds checkpoints of another model or layout (parallel.zero_stage=0 there, 2 here)" in message


def test_zero_stage_is_validated():
    with pytest.raises(ConfigError, match="parallel.zero_stage must be 0 .*, 1, 2 or 3 .*got 4"):
        load_config(None, ["parallel.zero_stage=4"])
    assert load_config(None, ["parallel.zero_stage=3"]).parallel.zero_stage == 3


def test_deepspeed_config_is_generated_from_ours():
    from parallel.zero import deepspeed_config

    cfg = deepspeed_config(2, micro_batch=4, grad_accum=3, world_size=8, grad_clip=1.0, precision="fp32")
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 96 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 2}
    assert "bf16" not in cfg and "fp16" not in cfg and "torch_autocast" not in cfg
    bf16 = deepspeed_config(3, 1, 1, 1, 1.0, "bf16")
    assert bf16["torch_autocast"]["enabled"] and bf16["torch_autocast"]["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="stage 0 is plain data parallel"):
        deepspeed_config(0, 1, 1, 1, 1.0, "fp32")
