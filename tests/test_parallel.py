"""Tensor and pipeline parallelism (and ZeRO-1 with them) in 2- and 4-process CPU runs over gloo, against
the 1-process run on the same global batch: losses of every step and the updated weights, gathered from
the sharded checkpoint through its layout record, equal within 1e-5 (fp32).

One launch per world size runs all its jobs (tests/train_worker.py); each has a hard deadline and fails
with every rank's log. CI runs MAC in every layout and the other variants in the 4-process layouts that
combine tp and pp; the rest is marked slow (RUN_SLOW=1).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from launcher import launch
from train_worker import base_overrides, in_memory_loaders

import pretrain.train as train_module
from pretrain.checkpoint import load_checkpoint, verify_checkpoint
from pretrain.checkpoint_shards import consolidate
from pretrain.config import load_config

WORKER = Path(__file__).with_name("train_worker.py")
GLOBAL_BATCH = 4
STEPS = 3
LAUNCH_TIMEOUT_S = 600
VARIANTS = ("mac", "mag", "mal", "lmm")
SLOW = os.environ.get("RUN_SLOW") == "1"

# layout name → (world size, overrides); dp = world / (tp · pp)
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.pp_microbatches=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_microbatches=2"]),
    "tp2_dp2_zero1": (4, ["parallel.tp=2", "parallel.zero_stage=1"]),
    "pp2_dp2_zero1": (4, ["parallel.pp=2", "parallel.pp_microbatches=2", "parallel.zero_stage=1"]),
}
CI_CASES = {(v, "tp2_pp2") for v in VARIANTS} | {("mac", layout) for layout in LAYOUTS}
CASES = [(v, layout) for v in VARIANTS for layout in LAYOUTS if SLOW or (v, layout) in CI_CASES]


def model_overrides(variant: str) -> list[str]:
    """A 4-layer model (2 per stage), 4 heads (2 per tp rank), an odd vocabulary (padded under tp)."""
    return [f"model.layers={variant}", "model.n_layers=4", "model.n_heads=4", "model.dim=32",
            "model.vocab_size=257", "model.mac_memory_tokens=0"]


def job(name: str, out: Path, variant: str, layout: str, *extra: str, steps: int = STEPS) -> dict:
    world, layout_overrides = LAYOUTS[layout]
    dp = world // (2 if "tp2" in layout else 1) // (2 if "pp2" in layout else 1)
    ov = base_overrides(out, GLOBAL_BATCH // dp, steps) + model_overrides(variant) + layout_overrides
    return {"name": name, "overrides": ov + list(extra)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for world in (2, 4):
        tmp = tmp_path_factory.mktemp(f"world{world}")
        jobs = [job(f"{v}_{layout}", tmp / f"{v}_{layout}", v, layout) for v, layout in CASES
                if LAYOUTS[layout][0] == world]
        if world == 4:  # 3 + 3 steps with a resume under tp=2 × pp=2
            jobs.append(job("resume_first", tmp / "resume", "mac", "tp2_pp2", "train.stop_after_steps=3",
                            steps=6))
            jobs.append(job("resume_second", tmp / "resume", "mac", "tp2_pp2", steps=6))
            jobs.append(job("whole", tmp / "whole", "mac", "tp2_pp2", steps=6))
            jobs.append(job("wrong_layout", tmp / "mac_tp2_dp2_zero1", "mac", "tp2_pp2", "train.steps=7",
                            "parallel.zero_stage=1") | {"expect_error": True})
        started = time.monotonic()
        results.update(launch(WORKER, jobs, tmp, world, LAUNCH_TIMEOUT_S))
        results[f"_seconds_world{world}"] = time.monotonic() - started
    return results


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The 1-process runs of each variant on the global batch."""
    patch = pytest.MonkeyPatch()
    patch.setattr(train_module, "build_loaders", in_memory_loaders)
    out = {}
    try:
        for variant in sorted({v for v, _ in CASES}):
            tmp = tmp_path_factory.mktemp(f"ref_{variant}")
            cfg = load_config(None, base_overrides(tmp, GLOBAL_BATCH, STEPS) + model_overrides(variant))
            result = train_module.train(cfg)
            out[variant] = (result, load_checkpoint(result.checkpoint)["model"])
    finally:
        patch.undo()
    return out


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("variant, layout", CASES)
def test_layout_matches_one_process(runs, references, variant, layout):
    got = runs[f"{variant}_{layout}"]
    reference, ref_weights = references[variant]
    assert len(got["losses"]) == STEPS
    want = reference.losses
    assert all(close(a, b) for a, b in zip(got["losses"], want)), (got["losses"], want)
    for step, val in reference.val_losses.items():
        assert close(got["val_losses"][str(step)], val), (step, got["val_losses"], reference.val_losses)
    ckpt = Path(got["checkpoint"])
    verify_checkpoint(ckpt)
    weights = consolidate(ckpt)
    assert set(weights) == set(ref_weights), set(weights) ^ set(ref_weights)
    for name, want in ref_weights.items():  # relative in norm: Adam turns rounding in near-zero
        error = (weights[name] - want).norm() / want.norm()  # gradients into ±lr steps elementwise
        assert error <= 1e-5, (name, error.item())


def test_resume_under_tp_and_pp_continues_bitwise(runs):
    assert runs["resume_first"]["last_step"] == 3
    assert runs["resume_second"]["losses"] == runs["whole"]["losses"]
    first = consolidate(Path(runs["resume_second"]["checkpoint"]))
    second = consolidate(Path(runs["whole"]["checkpoint"]))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_with_another_layout_is_refused(runs):
    message = runs["wrong_layout"]["error"]
    assert "was written with the layout tp=2 pp=1 sp=1 dp=2, this run has tp=2 pp=2 sp=1 dp=1" in message
