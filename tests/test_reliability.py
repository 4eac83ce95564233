"""Checkpoints that are never silently wrong, and runs that fail before they start.

Each test reproduces a fault found by trying the stack as a new user would: a corrupt or truncated
newest checkpoint, a run folder reused with another model, a mistyped data path, signals.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import small_config

from data_pipeline.loader import DataError
from data_pipeline.prepare import prepare
from pretrain.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CorruptCheckpointError,
    list_checkpoints,
    load_checkpoint,
    newest_good_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from pretrain.config import ConfigError, load_config
from pretrain.model_io import load_model
from pretrain.train import main, train

ROOT = Path(__file__).resolve().parents[1]


def flip_bytes(path: Path, offset_fraction: float = 0.5, count: int = 32) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_fraction)
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """An uninterrupted 20-step run, checkpoints every 5 steps."""
    out = tmp_path_factory.mktemp("whole")
    return train(small_config(dataset, out)), out


def test_every_checkpoint_has_a_manifest_with_the_checksum_of_every_file(finished):
    _, out = finished
    for ckpt in list_checkpoints(out):
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
        files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST_FILE}
        assert set(manifest["files"]) == files
        verify_checkpoint(ckpt)


@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["flipped bytes", "truncated"])
def test_a_damaged_newest_checkpoint_is_reported_and_skipped_for_the_newest_good_one(
        dataset, finished, tmp_path, damage, capsys):
    whole, _ = finished
    out = tmp_path / "run"
    train(small_config(dataset, out, "train.stop_after_steps=15"))
    newest = list_checkpoints(out)[-1]
    assert newest.name == "step_00000015"
    damage(newest / STATE_FILE)
    with pytest.raises(CorruptCheckpointError, match=f"{newest / STATE_FILE}"):
        verify_checkpoint(newest)
    resumed = train(small_config(dataset, out))
    assert f"skipped a bad checkpoint: checkpoint file {newest / STATE_FILE}" in capsys.readouterr().out
    assert resumed.losses == whole.losses  # resumed at step 10, never from the damaged step 15


def test_a_checkpoint_without_a_manifest_must_at_least_load(finished, tmp_path):
    """No manifest (not written by the atomic save) leaves nothing to check against: a truncated state
    file is caught by loading it, and skipped for the newest good checkpoint."""
    _, out = finished
    newest = list_checkpoints(out)[-1]
    bare = tmp_path / "bare"
    shutil.copytree(newest, bare)
    (bare / MANIFEST_FILE).unlink()
    verify_checkpoint(bare)  # intact: loads
    truncate(bare / STATE_FILE)
    with pytest.raises(CorruptCheckpointError, match=f"{bare} has no {MANIFEST_FILE} and its {STATE_FILE} "):
        verify_checkpoint(bare)


def test_no_good_checkpoint_is_a_clear_error(dataset, tmp_path):
    out = tmp_path / "run"
    train(small_config(dataset, out, "train.steps=10", "train.warmup_steps=1"))
    for ckpt in list_checkpoints(out):
        flip_bytes(ckpt / STATE_FILE)
    with pytest.raises(CorruptCheckpointError, match="no good checkpoint in .*step_00000010.*step_00000005"):
        train(small_config(dataset, out, "train.steps=10", "train.warmup_steps=1"))


def test_evaluation_refuses_a_corrupt_checkpoint(dataset, tmp_path):
    out = tmp_path / "run"
    train(small_config(dataset, out, "train.steps=5", "train.warmup_steps=1"))
    ckpt = list_checkpoints(out)[-1]
    load_model(ckpt)  # a good one loads
    flip_bytes(ckpt / STATE_FILE, 0.9)
    with pytest.raises(CorruptCheckpointError, match="does not match its manifest checksum"):
        load_model(ckpt)
    with pytest.raises(CorruptCheckpointError, match="no good checkpoint"):
        newest_good_checkpoint(out)


def test_resume_from_a_chosen_checkpoint(dataset, finished, tmp_path):
    whole, source = finished
    ckpt = [c for c in list_checkpoints(source) if c.name == "step_00000010"][0]
    resumed = train(small_config(dataset, tmp_path / "new", f"train.resume_from={ckpt}"))
    assert resumed.losses == whole.losses  # steps 1-10 from the checkpoint, 11-20 recomputed bitwise


def mapped(file: Path) -> bool:
    """Whether this process maps `file` (a tensor loaded with torch.load(mmap=True) still alive)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return any(line.endswith(str(file.resolve())) for line in maps)


def test_a_resumed_run_reads_its_checkpoint_mapped_and_keeps_none_of_it(dataset, finished, tmp_path,
                                                                       monkeypatch):
    """The ranks of a node share one copy of the checkpoint in the page cache while they load it; once
    training runs, no tensor maps the file (the optimizer's CPU state would, and a mapping keeps a deleted
    checkpoint's disk space taken for the whole run)."""
    _, source = finished
    ckpt = source / "checkpoints" / "step_00000010"
    state = load_checkpoint(ckpt)
    assert mapped(ckpt / STATE_FILE)
    del state
    assert not mapped(ckpt / STATE_FILE)
    import pretrain.engine as engine_module

    seen = []
    step = engine_module.Engine.step
    monkeypatch.setattr(engine_module.Engine, "step",
                        lambda self, *a, **k: seen.append(mapped(ckpt / STATE_FILE)) or step(self, *a, **k))
    train(small_config(dataset, tmp_path / "new", f"train.resume_from={ckpt}", "train.stop_after_steps=12"))
    assert seen and not any(seen)


def test_a_fork_by_resume_from_continues_from_its_own_checkpoints_when_run_again(dataset, finished,
                                                                                  tmp_path, capsys):
    """A requeued job runs the same command: starting at resume_from again would drop its progress."""
    whole, source = finished
    fork = ("train.checkpoint_every=100", f"train.resume_from={source / 'checkpoints' / 'step_00000010'}")
    train(small_config(dataset, tmp_path / "new", *fork, "train.stop_after_steps=3"))
    capsys.readouterr()
    resumed = train(small_config(dataset, tmp_path / "new", *fork))
    assert f"resumed from {tmp_path / 'new' / 'checkpoints' / 'step_00000013'}" in capsys.readouterr().out
    assert resumed.losses == whole.losses


def test_a_rollback_by_resume_from_sets_the_abandoned_checkpoints_aside(dataset, finished, tmp_path, capsys):
    whole, source = finished
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    rollback = ("train.checkpoint_every=100", f"train.resume_from={copy / 'checkpoints' / 'step_00000010'}")
    capsys.readouterr()
    train(small_config(dataset, copy, *rollback, "train.stop_after_steps=2"))
    assert re.search(r"moved this folder's 2 checkpoint\(s\) after step 10 \(step_00000015, step_00000020\) "
                     r"aside to .*abandoned-", capsys.readouterr().out)
    assert [c.name for c in list_checkpoints(copy)] == ["step_00000010", "step_00000012"]
    (aside,) = (copy / "checkpoints").glob("abandoned-*")
    assert sorted(c.name for c in aside.iterdir()) == ["step_00000015", "step_00000020"]
    resumed = train(small_config(dataset, copy, *rollback))  # the requeue: from step 12, not 10 again
    assert resumed.losses == whole.losses and [c.name for c in list_checkpoints(copy)][-1] == "step_00000020"


def test_a_resume_with_other_training_settings_says_what_changed(dataset, finished, tmp_path, capsys):
    _, source = finished
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    capsys.readouterr()
    train(small_config(dataset, copy, "train.steps=22", "data.batch_size=4", "train.stop_after_steps=1"))
    out = capsys.readouterr().out
    assert "note: settings changed since that checkpoint: train.steps 20 → 22; data.batch_size 2 → 4\n" in out
    assert "note: the learning rate follows the new schedule from here: " in out
    train(small_config(dataset, copy, "train.steps=22", "data.batch_size=4"))  # as the last invocation
    assert "note:" not in capsys.readouterr().out


def test_a_checkpoint_of_another_data_parallel_size_is_refused_with_the_way_to_reshard_it(
        dataset, finished, tmp_path):
    _, source = finished
    state = load_checkpoint(list_checkpoints(source)[-1])
    state["data"], state["rng"] = state["data"] * 2, state["rng"] * 2  # as two data-parallel ranks write it
    save_checkpoint(tmp_path / "dp2", state["step"], state, keep_last=1)
    expected = (r"written by 2 data-parallel processes, this run has 1: .* "
                r"pretrain.convert --checkpoint .*step_00000020 --to checkpoint --dp 1")
    with pytest.raises(ConfigError, match=expected):
        train(small_config(dataset, tmp_path / "dp2", "train.steps=22"))


def test_resume_from_a_run_folder_takes_its_newest_good_checkpoint(dataset, finished, tmp_path, capsys):
    whole, source = finished
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    flip_bytes([c for c in list_checkpoints(copy) if c.name == "step_00000020"][0] / STATE_FILE)
    resumed = train(small_config(dataset, tmp_path / "new", f"train.resume_from={copy}"))
    assert resumed.losses == whole.losses  # from step 10: step 20's checkpoint is corrupt
    assert "skipped a bad checkpoint" in capsys.readouterr().out
    with pytest.raises(CorruptCheckpointError, match="neither a checkpoint .* nor a run folder"):
        train(small_config(dataset, tmp_path / "other", f"train.resume_from={tmp_path / 'nothing'}"))


def test_init_from_takes_the_weights_only(dataset, finished, tmp_path):
    whole, source = finished
    fresh = train(small_config(dataset, tmp_path / "fresh", "train.steps=3", "train.warmup_steps=1",
                               f"train.init_from={source}"))
    assert fresh.last_step == 3 and len(fresh.losses) == 3  # a new run: step 0, new optimizer
    assert fresh.losses[0] < whole.losses[0] - 0.5  # but from trained weights
    state = torch.load(list_checkpoints(tmp_path / "fresh")[-1] / STATE_FILE, weights_only=False)
    assert state["step"] == 3


def test_init_from_takes_an_export_as_it_takes_the_checkpoint(dataset, finished, tmp_path):
    from pretrain.convert import main as convert

    _, source = finished
    export = tmp_path / "export"
    assert convert(["--checkpoint", str(source), "--to", "safetensors", "--out", str(export)]) == 0
    short = ("train.steps=2", "train.warmup_steps=1")
    runs = [train(small_config(dataset, tmp_path / name, *short, f"train.init_from={origin}"))
            for name, origin in (("from_run", source), ("from_export", export))]
    assert runs[0].losses == runs[1].losses


def test_bad_init_from_and_out_dir_are_config_errors(dataset, finished, tmp_path):
    _, source = finished
    short = ("train.steps=3", "train.warmup_steps=1")
    with pytest.raises(ConfigError, match=rf"train.init_from={tmp_path / 'nope'}: .*does not exist"):
        train(small_config(dataset, tmp_path / "a", *short, f"train.init_from={tmp_path / 'nope'}"))
    differ = r"train.init_from: embed.weight is \(257, 32\) in the checkpoint and \(257, 64\) here: the model"
    with pytest.raises(ConfigError, match=differ):
        train(small_config(dataset, tmp_path / "b", *short, "model.dim=64", f"train.init_from={source}"))
    with pytest.raises(ConfigError, match=r"tensors have no place in this model \(blocks\.0\."):
        train(small_config(dataset, tmp_path / "c", *short, "model.layers=mag", f"train.init_from={source}"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=r"train.out_dir=.*afile is a file, not a folder"):
        train(small_config(dataset, tmp_path / "afile", *short))


# ------------------------------------------------------------ a run folder describes its checkpoints


def test_changing_the_model_on_a_run_folder_is_refused_before_anything_is_written(dataset, tmp_path):
    out = tmp_path / "run"
    train(small_config(dataset, out, "train.steps=5", "train.warmup_steps=1"))
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        train(small_config(dataset, out, "train.steps=8", "model.layers=mag", "model.dim=48"))
    message = str(err.value)
    assert re.match(r"train.out_dir=.*run holds checkpoints of another model or layout \(model.dim=32 there, "
                    r"48 here; .*model.layers='mac,mag' there, 'mag' here.*\): choose a new train.out_dir",
                    message), message
    assert (out / "config.yaml").read_text() == saved  # the folder still describes its checkpoints
    longer = train(small_config(dataset, out, "train.steps=8", "train.warmup_steps=1"))  # steps may change
    assert longer.last_step == 8


def test_cli_reports_a_changed_model_in_one_line(dataset, tmp_path):
    out = tmp_path / "run"
    train(small_config(dataset, out, "train.steps=2", "train.warmup_steps=1"))
    args = [f"data.train={dataset}", "data.default_corpus=false", "data.seq_len=32", "model.vocab_size=257",
            "model.dim=32", "model.n_heads=2", "model.layers=mag", f"train.out_dir={out}", "train.steps=4",
            "train.warmup_steps=1"]
    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), *args]) == 2


# ------------------------------------------------------------------------- no silent data substitution


def test_a_mistyped_data_path_is_an_error_not_the_default_corpus(tmp_path):
    cfg = load_config(None, [f"data.train={tmp_path / 'fineweb'}", "data.default_corpus=true",
                             f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=r"data.train=.*fineweb: no prepared dataset there \(manifest.json is "
                                        r"missing\).*leave data.train at its default"):
        train(cfg)
    assert not (tmp_path / "fineweb").exists()


def test_prepare_gives_a_small_corpus_a_validation_split(tmp_path):
    files = sorted((ROOT / "titans").glob("*.py"))[:3]
    manifest = prepare(files, tmp_path / "small", "bytes", sample_tokens=65, shard_samples=16,
                       val_fraction=0.02, progress=False)
    assert manifest.documents["val"] >= 1 and manifest.splits["val"] and manifest.splits["train"]
    # one document: whichever split its path hashes it to (the checkout's), the same error; fractions
    # near 0 and 1 send it to train and to val
    for fraction in (0.02, 1e-9, 1 - 1e-9):
        with pytest.raises(ValueError, match="too small for a validation split"):
            prepare(files[:1], tmp_path / "one", "bytes", sample_tokens=65, val_fraction=fraction,
                    progress=False)


def test_eval_every_zero_turns_validation_off(tmp_path):
    files = sorted((ROOT / "titans").glob("*.py"))
    prepare(files, tmp_path / "noval", "bytes", sample_tokens=33, shard_samples=64, val_fraction=0.0,
            progress=False)
    base = small_config(tmp_path / "noval", tmp_path / "run", "train.steps=3", "train.warmup_steps=1")
    with pytest.raises(DataError, match="split 'val' has no shards.*train.eval_every=0 to train without "
                                        "validation"):
        train(base)
    result = train(small_config(tmp_path / "noval", tmp_path / "run2", "train.steps=3",
                                "train.warmup_steps=1", "train.eval_every=0"))
    assert result.last_step == 3 and result.val_losses == {}


# --------------------------------------------------------------------------------- pre-flight memory


def test_a_run_that_cannot_fit_fails_before_it_allocates(tmp_path, monkeypatch):
    import pretrain.train as train_module

    huge = ["data.seq_len=100000", f"train.out_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"this run needs about [\d.]+ GiB per process \(params .*"
                                          r"activations [\d.]+\) but [\d.]+ GiB are available on cpu: lower "
                                          r"data.batch_size.*train.allow_oversubscribe=true"):
        train(load_config(ROOT / "configs" / "tiny.yaml", huge))
    assert not (tmp_path / "config.yaml").exists()
    checked = []

    def stop_before_allocating(*args):
        raise RuntimeError("built")

    monkeypatch.setattr(train_module, "check_memory", lambda *args: checked.append(args))
    monkeypatch.setattr(train_module, "build_engine", stop_before_allocating)
    with pytest.raises(RuntimeError, match="built"):
        train(load_config(ROOT / "configs" / "tiny.yaml", [*huge, "train.allow_oversubscribe=true"]))
    assert not checked  # insisting skips the check


SHARED_CHECK_WORKER = """
import sys
from pathlib import Path
from parallel.mesh import init_mesh
from pretrain.config import ConfigError
from pretrain.train import check_shared_out_dir
from tests.launcher import serve_jobs

def run(job, mesh):
    out = Path(job["dirs"][mesh.rank])  # one folder for all ranks, or each its own (node-local disks)
    out.mkdir(parents=True, exist_ok=True)
    try:
        check_shared_out_dir(out, mesh, wait_s=1.0)
    except ConfigError as err:
        return str(err)
    return "ok" if not list(out.iterdir()) else "a probe file was left behind"

serve_jobs(sys.argv[1], init_mesh(), run)
"""


@pytest.mark.timeout(120)
def test_an_out_dir_that_is_not_one_folder_for_every_rank_stops_the_run_at_start(tmp_path):
    """Two ranks whose train.out_dir are different folders (as node-local disks would be) are refused
    before training, naming the rank that cannot see rank 0's file; one shared folder passes clean."""
    from tests.launcher import launch

    worker = tmp_path / "shared_check_worker.py"
    worker.write_text(SHARED_CHECK_WORKER)
    jobs = [{"name": "shared", "dirs": [str(tmp_path / "run")] * 2},
            {"name": "local", "dirs": [str(tmp_path / "node0" / "run"), str(tmp_path / "node1" / "run")]}]
    results = launch(worker, jobs, tmp_path / "launch", world=2, timeout=90)
    assert results["shared"] == "ok"
    refusal = results["local"]
    assert re.match(rf"train.out_dir={tmp_path / 'node0' / 'run'} is not one folder for every rank: rank 1 "
                    r"on \S+ cannot see the file rank 0 on \S+ wrote there", refusal), refusal


def test_steps_trained_again_after_a_crash_show_once_in_tensorboard(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(small_config(dataset, out, "train.steps=10", "train.log_every=1"))
    shutil.rmtree(list_checkpoints(out)[-1])  # as if it had crashed after logging step 10, before saving it
    (out / "checkpoints" / "latest").unlink()
    resumed = train(small_config(dataset, out, "train.steps=10", "train.log_every=1"))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, 11))  # 6-10 of the first invocation purged, not shown twice
    assert [e.value for e in events.Scalars("train/loss")][5:] == pytest.approx(resumed.losses[5:])


def test_a_run_folder_in_use_by_another_run_is_refused_naming_it(dataset, tmp_path, monkeypatch):
    import pretrain.train as train_module

    out = tmp_path / "run"
    out.mkdir()
    script = ("import sys; from pathlib import Path; from pretrain.run_lock import hold_run_lock; "
              "lock = hold_run_lock(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen(  # another run's rank 0: holds the folder's lock until told to stop
        [sys.executable, "-c", script, str(out)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(train_module, "LOCK_WAIT_S", 0.5)
        with pytest.raises(ConfigError, match=rf"train.out_dir={out} is in use by another run \(host .*, "
                                              rf"pid {holder.pid}, since .*\): wait for it to end"):
            train(small_config(dataset, out, "train.steps=2", "train.warmup_steps=0"))
        assert not list_checkpoints(out)  # nothing written beside the other run's
    finally:
        holder.communicate("", timeout=30)  # its end releases the lock
    assert train(small_config(dataset, out, "train.steps=2", "train.warmup_steps=0")).last_step == 2
    again = train(small_config(dataset, out, "train.steps=3", "train.warmup_steps=0"))  # own lock released
    assert again.last_step == 3
