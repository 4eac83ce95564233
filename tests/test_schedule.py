"""The learning-rate schedule (pretrain/schedule.py): its shapes, warmup-stable-decay, and the exactness
a WSD cooldown branched from a longer run's checkpoint rests on."""

from __future__ import annotations

import math

import pytest
import torch
from run_helpers import small_config

from pretrain.checkpoint import list_checkpoints
from pretrain.config import ConfigError, TrainConfig, load_config
from pretrain.schedule import decay_start, lr_at
from pretrain.train import train


def schedule(**fields) -> TrainConfig:
    return TrainConfig(**{"steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1, **fields})


def test_the_default_is_warmup_then_cosine_to_the_minimum():
    t = schedule()
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    progress = (55 - 10) / 90
    assert lr_at(55, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lr_at(100, t) == pytest.approx(0.1)


@pytest.mark.parametrize("shape, middle", [("linear", 0.5), ("sqrt", 1 - math.sqrt(0.5)), ("cosine", 0.5),
                                           ("none", 1.0)])
def test_wsd_holds_the_peak_then_decays_over_the_last_fraction(shape, middle):
    t = schedule(lr_decay=shape, lr_decay_fraction=0.2)
    assert decay_start(t) == 80
    assert all(lr_at(s, t) == 1.0 for s in range(10, 81))
    assert lr_at(90, t) == pytest.approx(0.1 + 0.9 * middle)
    assert lr_at(100, t) == pytest.approx(1.0 if shape == "none" else 0.1)


def test_a_decay_longer_than_the_steps_after_warmup_starts_when_warmup_ends():
    assert decay_start(schedule(warmup_steps=30, lr_decay_fraction=0.9)) == 30


def test_wsd_runs_of_two_lengths_agree_until_the_shorter_ones_decay():
    short, long = schedule(lr_decay_fraction=0.25, steps=40), schedule(lr_decay_fraction=0.25, steps=100)
    assert [lr_at(s, short) for s in range(decay_start(short))] == [lr_at(s, long) for s in range(30)]


@pytest.mark.parametrize("override, message", [
    ("train.lr_decay=exp", "train.lr_decay must be one of cosine, linear, sqrt, none, got 'exp'$"),
    ("train.lr_decay=wsd", "got 'wsd' (warmup-stable-decay is a fraction below 1: e.g. train.lr_decay=sqrt "
                           "train.lr_decay_fraction=0.2)"),
    ("train.lr_decay_fraction=0", "train.lr_decay_fraction must be in (0, 1]"),
    ("train.lr_decay_fraction=1.5", "train.lr_decay_fraction must be in (0, 1]"),
    ("train.checkpoint_at=0,400", "train.checkpoint_at: step(s) [0, 400] outside 1..train.steps=300"),
    ("train.keep_every=150", "train.keep_every=150 must be 0 .none. or a multiple of train.checkpoint_every"),
])
def test_bad_schedule_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_checkpoints_of_checkpoint_at_and_keep_every_are_never_pruned(dataset, tmp_path):
    train(small_config(dataset, tmp_path / "run", "train.steps=8", "train.checkpoint_every=2",
                       "train.keep_last=1", "train.checkpoint_at=3", "train.keep_every=4",
                       "train.eval_every=0"))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000003", "step_00000004",
                                                                    "step_00000008"]


def test_a_cooldown_branched_from_a_longer_wsd_run_is_the_shorter_wsd_run_bitwise(dataset, tmp_path):
    """A WSD run of 8 steps decays over its last 2; one of 12 steps is the same run up to step 9. So the
    12-step run's checkpoint at step 6, trained on to 8 steps, is the 8-step run: the scaling study's
    budgets as cooldowns of one run per size."""
    wsd = ("train.lr_decay=sqrt", "train.lr_decay_fraction=0.25", "train.warmup_steps=1",
           "train.eval_every=4")
    alone = train(small_config(dataset, tmp_path / "alone", "train.steps=8", *wsd))
    train(small_config(dataset, tmp_path / "long", "train.steps=12", "train.checkpoint_at=6", *wsd))
    branch = train(small_config(dataset, tmp_path / "branch", "train.steps=8", *wsd,
                                f"train.resume_from={tmp_path / 'long' / 'checkpoints' / 'step_00000006'}"))
    assert branch.losses == alone.losses and branch.val_losses[8] == alone.val_losses[8]
    weights = [torch.load(tmp_path / run / "checkpoints" / "step_00000008" / "state.pt",
                          weights_only=False)["model"] for run in ("alone", "branch")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_logged_learning_rate_is_the_one_each_step_used(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_config(dataset, tmp_path / "run", "train.steps=6", "train.log_every=1", "train.eval_every=0",
                       "train.lr_decay=linear", "train.lr_decay_fraction=0.5")
    train(cfg)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/lr")}
    assert logged == pytest.approx({s: lr_at(s - 1, cfg.train) for s in range(1, 7)})


def test_a_finished_wsd_run_keeps_its_last_stable_step_and_says_how_to_extend_it(dataset, tmp_path, capsys):
    """Forked from that checkpoint with more steps, it is the longer WSD run, bitwise."""
    from pretrain.train import main

    wsd = ["train.lr_decay=sqrt", "train.lr_decay_fraction=0.25", "train.warmup_steps=1",
           "train.eval_every=0", "train.checkpoint_every=100"]
    base = [f"data.train={dataset}", "data.default_corpus=false", "data.seq_len=32", "data.batch_size=2",
            "model.vocab_size=257", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.window=8",
            "model.segment_len=16", "model.memory_chunk=8", *wsd]
    assert main([*base, "train.steps=8", f"train.out_dir={tmp_path / 'short'}"]) == 0
    stable = tmp_path / "short" / "checkpoints" / "step_00000006"
    assert [p.name for p in list_checkpoints(tmp_path / "short")] == ["step_00000006", "step_00000008"]
    assert f"extend:      the same command with train.resume_from={stable} train.steps=MORE" in (
        capsys.readouterr().out)
    assert main([*base, "train.steps=8", f"train.out_dir={tmp_path / 'short'}"]) == 0
    assert f"To train on past its cooldown: the same command with train.resume_from={stable}" in (
        capsys.readouterr().out)
    extended = train(load_config(None, [*base, "train.steps=12", f"train.out_dir={tmp_path / 'longer'}",
                                        f"train.resume_from={stable}"]))
    alone = train(load_config(None, [*base, "train.steps=12", f"train.out_dir={tmp_path / 'alone'}"]))
    assert extended.losses == alone.losses
