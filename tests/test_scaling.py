"""Scaling studies: the Chinchilla-style fit recovers known exponents from synthetic losses; family files
are checked; a local sweep of tiny runs writes the table, the fit and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_helpers import tiny_family

from pretrain.config import ConfigError
from pretrain.scaling import build_sweep, load_family
from pretrain.scaling_fit import Fit, bootstrap, fit

ROOT = Path(__file__).resolve().parents[1]
TRUE = Fit(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Chinchilla's published fit


def synthetic(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.repeat(np.geomspace(1e6, 1e9, 5), 4)
    d = np.tile(np.geomspace(1e8, 1e11, 4), 5)
    loss = TRUE.predict(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.shape))
    return n, d, loss


@pytest.mark.parametrize("noise", [0.0, 0.005], ids=["exact", "0.5% noise"])
def test_the_fit_recovers_known_exponents_within_5_percent(noise):
    got = fit(*synthetic(noise))
    for name in ("alpha", "beta", "E"):
        assert abs(getattr(got, name) / getattr(TRUE, name) - 1) < 0.05, (name, got)
    if noise == 0:
        assert abs(got.alpha - TRUE.alpha) < 1e-4 and abs(got.beta - TRUE.beta) < 1e-4, got
    # the compute-optimal split follows: N_opt ∝ C^(β/(α+β))
    c = np.array([1e20, 1e22])
    slope = np.diff(np.log(got.optimal_n(c))) / np.diff(np.log(c))
    assert abs(slope[0] - TRUE.beta / (TRUE.alpha + TRUE.beta)) < 0.02


def test_bootstrap_intervals_hold_the_true_exponents():
    n, d, loss = synthetic(0.005, seed=1)
    best = fit(n, d, loss)
    intervals = bootstrap(n, d, loss, best, samples=12)
    for name in ("alpha", "beta"):
        lo, hi = intervals[name]
        assert lo <= getattr(best, name) <= hi and hi - lo < 0.1 * getattr(TRUE, name), (name, lo, hi)


def test_a_fit_needs_three_positive_points():
    with pytest.raises(ValueError, match="at least 3 runs"):
        fit(np.array([1e6, 1e7]), np.array([1e8, 1e8]), np.array([3.0, 2.5]))
    with pytest.raises(ValueError, match="positive"):
        fit(np.array([1e6, 1e7, 0]), np.array([1e8] * 3), np.array([3.0, 2.5, 2.0]))


@pytest.mark.parametrize(("text", "match"), [
    ("sizes: {a: [model.dim=32]}\ntokens: [100]\nsteps: 3\n", r"unknown key\(s\) \['steps'\]"),
    ("sizes: {a: model.dim=32}\ntokens: [100]\n", "sizes must map each size name to a list"),
    ("sizes: {a: [model.dim=32]}\ntokens: [0]\n", "tokens must be a list of positive integers"),
])
def test_a_bad_family_file_names_the_field(tmp_path, text, match):
    path = tmp_path / "family.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_family(str(path))


SWEEP = "sizes:\n  a: [model.dim=32, model.n_heads=2]\n  b: [model.dim=64, model.n_heads=2]\n"


@pytest.mark.parametrize(("tokens", "extra", "match"), [
    ("[2048, 4096]", ["model.dim=48"], "model.dim on the command line: size a sets it"),
    ("[2048, 4096]", ["parallel.tp=2"], r"parallel.tp x pp x sp = 2, but every run of a sweep is one"),
    ("[100, 4096]", [], "budget 100 is under one step"),
    ("[2048, 2100]", [], "two budgets round to the same 1 steps"),
    ("[2048]", [], "make 2 runs; the fit of L.N, D. needs at least 3"),
    ("[2048, 4096]", ["data.train=nowhere"], "size a: data.train=nowhere: no prepared dataset there"),
])
def test_a_sweep_that_cannot_give_what_was_asked_is_refused_before_training(tmp_path, tokens, extra, match):
    family = tmp_path / "family.yaml"
    family.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\noverrides: [data.seq_len=64, "
                      f"data.batch_size=32]\n{SWEEP}tokens: {tokens}\n")  # 2048 tokens per step
    with pytest.raises(ConfigError, match=match):
        build_sweep(load_family(str(family)), tmp_path / "out", extra)


def test_a_short_budget_gets_no_warmup_and_other_overrides_reach_every_run(tmp_path):
    family = tmp_path / "family.yaml"
    family.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\noverrides: [data.seq_len=64, "
                      f"data.batch_size=32]\n{SWEEP}tokens: [2048, 40960]\n")
    runs = build_sweep(load_family(str(family)), tmp_path / "out", ["model.n_layers=3"])
    assert [(r.name, r.steps) for r in runs] == [("a-D2048", 1), ("a-D40960", 20), ("b-D2048", 1),
                                                 ("b-D40960", 20)]
    assert "train.warmup_steps=0" in runs[0].overrides and "train.warmup_steps=2" in runs[1].overrides
    assert all("model.n_layers=3" in r.overrides for r in runs)


def test_under_wsd_the_smaller_budgets_are_cooldowns_of_the_largest(tmp_path):
    family = tmp_path / "family.yaml"
    family.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\noverrides: [data.seq_len=64, "
                      f"data.batch_size=32, train.lr_decay_fraction=0.2]\n{SWEEP}"
                      "tokens: [81920, 40960, 204800]\n")  # 40, 20, 100 steps
    runs = build_sweep(load_family(str(family)), tmp_path / "out", [])
    a = runs[:3]
    assert [(r.name, r.steps, r.branch_of) for r in a] == [
        ("a-D40960", 20, "a-D204800"), ("a-D81920", 40, "a-D204800"), ("a-D204800", 100, "")]
    longest = tmp_path / "out" / "a-D204800" / "checkpoints"
    assert a[0].overrides[-1] == f"train.resume_from={longest / 'step_00000016'}"
    assert a[1].start_from.endswith("step_00000032") and "train.checkpoint_at=16,32" in a[2].overrides
    assert all("train.warmup_steps=2" in r.overrides for r in a)  # one warmup: 10 % of the shortest
    independent = build_sweep(load_family(str(family)), tmp_path / "out", [], independent=True)
    assert not any(r.branch_of for r in independent)  # the same runs, each from scratch
    assert all("train.warmup_steps=2" in r.overrides and not any("resume_from" in o for o in r.overrides)
               for r in independent[:3])


@pytest.mark.timeout(600)  # training runs, two at a time, beside another test worker
def test_a_local_wsd_sweep_writes_the_table_the_fit_and_the_plot(dataset, tmp_path):
    family = tiny_family(tmp_path / "family.yaml", dataset, [640, 1920], "train.threads=1",
                         "train.lr_decay=sqrt", "train.lr_decay_fraction=0.25")  # 10, 30 steps
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "pretrain.scaling", "--family", str(family), "--out", str(out),
               "--local", "--jobs", "2"]  # two at a time, a core each
    done = subprocess.run(command + ["--bootstrap", "4"], cwd=ROOT, capture_output=True, text=True,
                          timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "s16-D640: N=" in done.stdout and "(cooldown from s16-D1920 at step 8)" in done.stdout
    assert "s64-D1920: N=" in done.stdout and "val loss" in done.stdout  # a line per finished run
    assert "run 2/6: s16-D1920" in done.stdout and "\r" not in done.stdout + done.stderr  # a log, no bar
    branch_log = (out / "s16-D640" / "train.log").read_text()
    assert f"resumed from {out / 's16-D1920' / 'checkpoints' / 'step_00000008'} at step 8" in branch_log
    assert done.stdout.count(" val loss ") == 6
    assert "fit of 6 runs" in done.stdout and "compute-optimal" in done.stdout
    table = (out / "results.md").read_text()
    assert table.count("\n") == 2 + 6 and "| s16-D640 |" in table
    result = json.loads((out / "fit.json").read_text())
    assert set(result["fit"]) >= {"E", "A", "alpha", "B", "beta"} and result["runs"] == 6
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    # a second call trains nothing: every run has its final validation loss
    again = subprocess.run(command + ["--bootstrap", "0"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "training" not in again.stdout, again.stdout + again.stderr


def test_the_fit_can_use_a_validation_set_of_the_runs(tmp_path, capsys):
    """--loss val/<set>/loss fits the runs' losses on a data.val_sets dataset (here written directly as
    TensorBoard events: --report-only trains nothing)."""
    from torch.utils.tensorboard import SummaryWriter

    from pretrain.scaling import main

    family = tmp_path / "family.yaml"
    family.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\noverrides: [data.seq_len=64, "
                      f"data.batch_size=32]\n{SWEEP}tokens: [2048, 4096, 8192]\n")
    runs = build_sweep(load_family(str(family)), tmp_path / "out", [], check_data=False)
    for run in runs:
        writer = SummaryWriter(str(Path(run.out_dir) / "tensorboard"))
        base = 1 + 50 / run.n_params ** 0.3 + 40 / run.tokens ** 0.3
        writer.add_scalar("val/loss", base, run.steps)
        writer.add_scalar("val/books/loss", base + 0.5, run.steps)
        writer.close()
    command = ["--family", str(family), "--out", str(tmp_path / "out"), "--report-only", "--bootstrap", "2"]
    assert main([*command, "--loss", "val/books/loss"]) == 0
    table = (tmp_path / "out" / "results.md").read_text()
    first = runs[0]
    assert f"| {1.5 + 50 / first.n_params ** 0.3 + 40 / first.tokens ** 0.3:.4f} |" in table
    assert main([*command, "--loss", "val/code/loss"]) == 1
    assert "--loss val/code/loss: finished runs without it (a-D2048, " in capsys.readouterr().err


def test_a_failed_run_stops_new_ones_and_is_reported_with_its_log(tmp_path, monkeypatch):
    from pretrain import scaling

    family = tmp_path / "family.yaml"
    family.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\noverrides: [data.seq_len=64, "
                      f"data.batch_size=32]\n{SWEEP}tokens: [2048, 4096]\n")
    runs = build_sweep(load_family(str(family)), tmp_path / "out", [])
    for run in runs:  # a trainer that fails at once, in the real subprocess machinery
        run.overrides = ["train.steps=oops"]
    with pytest.raises(RuntimeError, match=r"run a-D2048 failed \(exit 2\); its log .*train.log ends:\n.*"
                                           r"train.steps: 'oops' is not a valid int"):
        scaling.run_local(runs, None, [{}, {}])
    started = [r.name for r in runs if (Path(r.out_dir) / "train.log").exists()]
    assert started == ["a-D2048", "a-D4096"]  # the two slots' runs; none after the failure
