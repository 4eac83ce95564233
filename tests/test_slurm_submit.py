"""`python -m slurm.submit` without a cluster: the sbatch call it builds, and the errors it stops on before
anything is queued (they name the option, field or file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm.submit import main, time_limit_seconds

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_dry_run_prints_the_sbatch_call(capsys):
    assert main(["--config", TINY, "--nodes", "2", "--gpus-per-node", "4", "--time", "01:00:00",
                 "--signal-seconds", "120", "--dry-run", "parallel.tp=2", "train.out_dir=runs/x"]) == 0
    line = capsys.readouterr().out
    for part in ("sbatch --parsable", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                 "--time=01:00:00", "--signal=B:USR1@120", "--requeue", "slurm/train.sbatch",
                 f"--config {TINY} parallel.tp=2 train.out_dir=runs/x"):
        assert part in line, (part, line)


def test_an_array_job_takes_one_override_line_per_task(tmp_path, capsys):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# lr sweep\ntrain.lr=1e-3 train.out_dir=runs/a\n\ntrain.lr=3e-3 train.out_dir=runs/b\n")
    assert main(["--config", TINY, "--sweep", str(sweep), "--max-parallel", "1", "--dry-run"]) == 0
    assert "--array=0-1%1" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks-per-node", "3", "parallel.tp=2"], "layout error: world size 3 is not a multiple of tp"),
    (["train.stepz=3"], "config error: train: unknown key(s) stepz"),
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--time", "banana"], "--time 'banana': expected Slurm's time format"),
    (["--time", "0"], "--time '0': the limit must be positive"),
    (["--time", "4"], "--signal-seconds 300 is not below --time 4 (240 s)"),
    (["data.train=nowhere/at/all"], "data error: data.train=nowhere/at/all: no prepared dataset there"),
    (["train.eval_every=10", "data.val=nowhere"], "data error: data.val=nowhere: "),
    (["data.mix=elsewhere"], "data error: data.mix: elsewhere: no prepared dataset there"),
])
def test_bad_options_stop_before_submitting(capsys, args, message):
    assert main(["--config", TINY, "--dry-run", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("limit", "seconds"), [("90", 5400), ("10:30", 630), ("04:00:00", 14400),
                                              ("2-00", 172800), ("1-02:03", 93780), ("1-00:00:05", 86405),
                                              ("UNLIMITED", None)])
def test_slurm_time_formats_are_read(limit, seconds):
    assert time_limit_seconds(limit) == seconds


def test_a_missing_dataset_can_be_queued_on_request(capsys):
    assert main(["--config", TINY, "--dry-run", "--no-data-check", "data.train=nowhere"]) == 0


def test_a_bad_sweep_line_is_named_by_its_line_in_the_file(tmp_path, capsys):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("train.lr=1e-3\ntrain.lr 3e-3\n")
    assert main(["--config", TINY, "--sweep", str(sweep), "--dry-run"]) == 2
    assert "line 2: 'train.lr' is not section.key=value" in capsys.readouterr().err
    sweep.write_text("# learning rates\n\ntrain.lr=1e-3\n# the bad one\ntrain.lr=fast\n")
    assert main(["--config", TINY, "--sweep", str(sweep), "--dry-run"]) == 2
    assert "config error (sweep line 5, array task 1): train.lr: 'fast'" in capsys.readouterr().err
    sweep.write_text("train.lr=1e-3 train.out_dir=runs/a\ntrain.lr=2e-3\n# the same folder again\n"
                     "train.lr=3e-3 train.out_dir=runs/a\n")
    assert main(["--config", TINY, "--sweep", str(sweep), "--dry-run"]) == 2
    assert ("train.out_dir=runs/a is the run folder of sweep line 1, array task 0 and sweep line 4, array "
            "task 2: each array task needs its own") in capsys.readouterr().err
    sweep.write_text("train.out_dir='runs/a\n")
    assert main(["--config", TINY, "--sweep", str(sweep), "--dry-run"]) == 2
    assert "line 1: No closing quotation" in capsys.readouterr().err
