"""The training job: exact resume, atomic checkpoints under SIGKILL, config errors, non-finite losses."""

import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import fill_disk, small_config
from test_data_helpers import copy_with_tokenizer

import pretrain.engine as engine_module
from data_pipeline.loader import DataError
from pretrain import synthetic
from pretrain.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.train import CheckpointWriteError, NonFiniteLossError, main, slow_setting_warnings, train

ROOT = Path(__file__).resolve().parents[1]


def test_resume_gives_the_same_losses_bitwise(dataset, tmp_path):
    whole = train(small_config(dataset, tmp_path / "whole"))
    first = train(small_config(dataset, tmp_path / "split", "train.stop_after_steps=10"))
    assert first.last_step == 10
    resumed = train(small_config(dataset, tmp_path / "split"))
    assert len(whole.losses) == len(resumed.losses) == 20
    assert resumed.losses == whole.losses  # bitwise on CPU
    assert whole.losses[-1] < whole.losses[0]


@pytest.mark.parametrize("mix", [("data.synthetic_rows=1",), ("data.synthetic_sequences=2",),
                                 ("data.synthetic_sequences=2", "data.synthetic_alone_steps=3"),
                                 ("data.synthetic_rows=1", "data.repeat_rows=1", "data.repeat_passage=8",
                                  "data.repeat_min_gap=8")])
def test_resume_with_synthetic_tasks_is_exact(dataset, tmp_path, mix, capsys):
    """Resumed at step 4: inside the text, or (the curriculum) on the text's first step."""
    mixed = (*mix, "train.steps=8", "train.checkpoint_every=2")
    whole = train(small_config(dataset, tmp_path / "whole", *mixed))
    curriculum = "the first 3 steps: the synthetic sequences alone"
    assert (curriculum in capsys.readouterr().out) == ("data.synthetic_alone_steps=3" in mix)
    train(small_config(dataset, tmp_path / "split", *mixed, "train.stop_after_steps=4"))
    resumed = train(small_config(dataset, tmp_path / "split", *mixed))
    assert resumed.losses == whole.losses


def test_separate_synthetic_sequences_train_as_one_weighted_batch(dataset, tmp_path, monkeypatch):
    """data.synthetic_sequences: the synthetic batch and the text batch run as two forwards in one step,
    each loss weighted by its share of the targets' weight: the same step as one batch holding both
    (made equal here by generating the separate sequences as the rows would be)."""
    mix = ("data.synthetic_weight=0.5", "train.steps=6")  # shares 4/5 and 1/5
    rows = train(small_config(dataset, tmp_path / "rows", "data.synthetic_rows=1", "data.batch_size=3", *mix))
    monkeypatch.setattr(synthetic, "instance_batch", synthetic.training_rows)
    separate = train(small_config(dataset, tmp_path / "separate", "data.synthetic_sequences=1", *mix))
    assert separate.losses == pytest.approx(rows.losses, rel=1e-5)


def test_a_slow_gpu_setting_is_named_with_its_fix(tmp_path):
    """The Triton memory kernel with exact float32 dots is slower than the torch kernel on a GPU (measured
    on an H100): the job says so at the start and names both fixes; nothing is said on CPU or with TF32."""
    def warnings(device_type: str, *overrides: str) -> list[str]:
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"train.out_dir={tmp_path}", *overrides])
        return slow_setting_warnings(cfg, device_type)

    (slow,) = warnings("cuda", "model.memory_kernel=triton")
    assert "train.fp32_matmul=tf32" in slow and "memory_kernel=torch" in slow
    assert warnings("cpu", "model.memory_kernel=triton") == []
    assert warnings("cuda", "model.memory_kernel=triton", "train.fp32_matmul=tf32") == []
    assert warnings("cuda") == []


def test_activation_checkpointing_trains_the_same(dataset, tmp_path):
    plain = train(small_config(dataset, tmp_path / "plain", "train.steps=4", "train.warmup_steps=1"))
    for every in (1, 2):  # every block, every second one
        recomputed = train(small_config(dataset, tmp_path / f"ckpt{every}", "train.steps=4",
                                        "train.warmup_steps=1", "train.activation_checkpointing=true",
                                        f"train.activation_checkpointing_every={every}"))
        assert recomputed.losses == pytest.approx(plain.losses, rel=1e-6)
    with pytest.raises(ConfigError, match="train.activation_checkpointing_every must be >= 1"):
        small_config(dataset, tmp_path, "train.activation_checkpointing_every=0")


def test_run_writes_config_tensorboard_and_checkpoints(dataset, tmp_path, capsys):
    result = train(small_config(dataset, tmp_path, "train.keep_last=2"))
    # off a terminal (a Slurm log) a progress line every train.log_every steps, with what a log reader needs
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert [int(re.search(r"\] (\d+)/20 ", line)[1]) for line in lines] == [1, 5, 10, 15, 20]
    fields = r"\| loss [\d.]+ \| [\d,]+ tok/s \| lr [\d.e-]+ \| grad norm [\d.]+ \| [\d.,]+ GFLOP/s"
    assert all(re.search(fields, line) for line in lines), lines
    assert (tmp_path / "config.yaml").is_file()
    assert any((tmp_path / "tensorboard").iterdir())
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step_00000015", "step_00000020"]
    assert latest_checkpoint(tmp_path) == result.checkpoint == kept[-1]
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 20 and set(state) >= {"model", "optimizer", "scheduler", "data", "rng"}
    assert set(result.val_losses) == {10, 20}


def test_profile_writes_a_trace_and_a_table_of_the_window(dataset, tmp_path, capsys):
    plain = train(small_config(dataset, tmp_path / "plain", "train.steps=5", "train.eval_every=0"))
    profiled = train(small_config(dataset, tmp_path / "profiled", "train.steps=5", "train.eval_every=0",
                                  "train.profile_start=3", "train.profile_steps=2"))
    assert profiled.losses == plain.losses  # watching changes nothing
    window = tmp_path / "profiled" / "profile" / "steps3-4"
    with gzip.open(window / "rank0.trace.json.gz", "rt") as trace:
        names = {event.get("name") for event in json.load(trace)["traceEvents"]}
    assert {"ProfilerStep#3", "ProfilerStep#4", "aten::mm"} <= names and "ProfilerStep#2" not in names
    assert "aten::mm" in (window / "rank0.txt").read_text()
    assert f"profile of steps 3-4 written to {window}" in capsys.readouterr().err


def test_a_run_that_stops_inside_the_profile_writes_what_ran(dataset, tmp_path, capsys):
    train(small_config(dataset, tmp_path, "train.steps=5", "train.eval_every=0", "train.stop_after_steps=3",
                       "train.profile_start=3", "train.profile_steps=3"))
    with gzip.open(tmp_path / "profile" / "steps3-5" / "rank0.trace.json.gz", "rt") as trace:
        names = {event.get("name") for event in json.load(trace)["traceEvents"]}
    assert "ProfilerStep#3" in names and "ProfilerStep#4" not in names
    assert "profile of steps 3-5 written" in capsys.readouterr().err
    train(small_config(dataset, tmp_path, "train.steps=5", "train.eval_every=0", "train.profile_start=3"))
    assert "train.profile_start=3 is past: this run resumes at step 4" in capsys.readouterr().out


def test_recall_is_measured_at_every_validation(dataset, tmp_path, capsys):
    """train.eval_tasks: MQAR accuracy per distance at each validation, in the result, the log and
    TensorBoard, without changing the training itself (the tasks draw from their own generators)."""
    plain = train(small_config(dataset, tmp_path / "plain", "train.steps=10", "train.eval_every=5"))
    result = train(small_config(dataset, tmp_path / "recall", "train.steps=10", "train.eval_every=5",
                                "train.eval_tasks=mqar", "train.eval_task_distances=2,8",
                                "train.eval_task_samples=4", "data.synthetic_pairs=2"))
    assert result.losses == plain.losses
    assert set(result.recall) == {5, 10}
    for recall in result.recall.values():
        assert set(recall) == {"mqar/x2", "mqar/x2/first", "mqar/x8", "mqar/x8/first"}
        assert all(0 <= v <= 1 for v in recall.values())
    assert re.search(r"step 10: mqar/x2 \d\.\d{3}, mqar/x2/first \d\.\d{3}, mqar/x8 \d\.\d{3}",
                     capsys.readouterr().err)


def test_recall_pairs_can_differ_from_the_training_pairs(dataset, tmp_path, monkeypatch):
    """train.eval_task_pairs fixes MQAR's pairs while training; 0 follows data.synthetic_pairs."""
    import pretrain.evaluate

    asked: list[int] = []

    def record(*args, n_pairs: int, **kwargs) -> dict:
        asked.append(n_pairs)
        return {}

    monkeypatch.setattr(pretrain.evaluate, "evaluate", record)
    base = ("train.steps=4", "train.eval_every=4", "train.eval_tasks=mqar", "data.synthetic_pairs=4")
    train(small_config(dataset, tmp_path / "fixed", *base, "train.eval_task_pairs=2"))
    train(small_config(dataset, tmp_path / "follows", *base))
    assert asked == [2, 4]


def test_nonfinite_losses_are_skipped_then_stop_with_the_step(dataset, tmp_path, monkeypatch):
    real = engine_module.loss_on
    calls = {"n": 0}

    def flaky(model, batch, autocast):
        calls["n"] += 1
        loss = real(model, batch, autocast)
        return loss * float("nan") if calls["n"] in (3, 7, 8, 9, 10) else loss

    monkeypatch.setattr(engine_module, "loss_on", flaky)
    cfg = small_config(dataset, tmp_path, "train.max_nonfinite_steps=3")
    with pytest.raises(NonFiniteLossError, match="step 9: 3 non-finite losses or gradients in a row"):
        train(cfg)
    calls["n"] = 100  # no more NaN: a run that sees isolated NaNs goes on and counts them
    calls_nan = {3}

    def isolated(model, batch, autocast):
        calls["n"] += 1
        loss = real(model, batch, autocast)
        return loss * float("nan") if calls["n"] in calls_nan else loss

    calls["n"] = 0
    monkeypatch.setattr(engine_module, "loss_on", isolated)
    result = train(small_config(dataset, tmp_path / "b", "train.steps=6", "train.warmup_steps=1"))
    assert result.skipped_steps == 1 and math.isnan(result.losses[2])
    assert all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)


@pytest.mark.parametrize("override,message", [
    ("model.colour=3", "model: unknown key(s) colour; valid keys: vocab_size, dim"),
    ("train.stepz=3", "train: unknown key(s) stepz; valid keys: out_dir, steps"),
    ("model.dim=30", "n_heads"),
    ("train.steps=ten", "train.steps: 'ten' is not a valid int"),
    ("train.betas=0.9", "train.betas: 0.9 is not a valid tuple[float, float]"),
    ("train.betas=0.9,x", "train.betas: 'x' is not a valid float"),
    ("train.warmup_steps=500", "train.warmup_steps=500 must be in"),
    ("model.layers=mac,attn", "bad item 'attn'"),
    ("train.precision=fp8", "train.precision must be"),
    ("train.fp32_matmul=bf16", "train.fp32_matmul must be ieee or tf32, got 'bf16'"),
    ("train.cpu_allocator=jemalloc", "train.cpu_allocator must be one of reuse, system, got 'jemalloc'"),
    ("steps=3", "key must be section.key with section one of model, data, train, parallel"),
    ("data.synthetic_rows=8", "data.synthetic_rows must be in [0, data.batch_size=8)"),
    ("data.synthetic_rows=2 data.synthetic_task=copy", "unknown synthetic task 'copy'"),
    ("data.synthetic_rows=2 data.seq_len=24", "a needle sequence needs at least"),
    ("data.synthetic_rows=2 data.synthetic_weight=0", "data.synthetic_weight must be > 0"),
    ("data.synthetic_rows=2 data.synthetic_task=mqar data.synthetic_pairs=0", "at least 1 key-value pair"),
    ("data.synthetic_rows=2 data.synthetic_min_distance=64 data.synthetic_max_distance=32",
     "data.synthetic_max_distance=32 is below the shortest distance 64"),
    ("data.synthetic_sequences=4 data.synthetic_rows=2", "choose one way to mix synthetic tasks in"),
    ("data.synthetic_sequences=4 data.synthetic_pack=true", "data.synthetic_pack packs rows of the batch"),
    ("data.synthetic_sequences=4 parallel.tp=2", "which parallel.tp=2 does not schedule"),
    ("data.synthetic_sequences=-1", "data.synthetic_sequences must be >= 0"),
    ("data.synthetic_alone_steps=10", "it needs data.synthetic_sequences > 0"),
    ("data.synthetic_sequences=4 data.synthetic_alone_steps=-1", "data.synthetic_alone_steps must be >= 0"),
    ("train.eval_tasks=mqar,copy", "train.eval_tasks: unknown task(s) copy; choose from needle, mqar"),
    ("train.eval_tasks=mqar train.eval_every=0", "train.eval_every=0 turns validation off"),
    ("train.eval_tasks=needle train.eval_task_distances=0,8", "must be positive multiples"),
    ("train.eval_tasks=mqar parallel.pp=2", "the whole model on every rank, and parallel.pp=2 splits it"),
    ("train.eval_tasks=mqar train.eval_task_pairs=-1", "train.eval_task_pairs must be >= 1"),
    ("train.profile_steps=0", "train.profile_steps >= 1, got 0 and 0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0, got -1.0"),
    ("data.num_workers=-2", "data.num_workers must be >= 0, got -2"),
    ("train.betas=0.9,1.0", "train.betas must both be in [0, 1) (AdamW's moment decays), got (0.9, 1.0)"),
    ("train.eval_batches=0", "train.eval_batches must be >= 1 when train.eval_every=100 validates"),
    ("train.profile_start=299", "train.profile_steps=3 profiles past train.steps=300"),
])
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs" / "tiny.yaml", override.split())


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  steps: 5\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: key 'lr' appears twice \(lines 2 and 4\)"):
        load_config(path)
    path.write_text("train: [\n")
    with pytest.raises(ConfigError, match=r'(?s)run.yaml is not valid YAML: .*in ".*run.yaml", line 2'):
        load_config(path)


def test_a_config_file_says_what_differs_from_its_base(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "root.yaml").write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\n"
                                                   "train:\n  lr: 1.0e-3\n  steps: 50\n")
    (tmp_path / "variant.yaml").write_text("base: shared/root.yaml\nmodel:\n  layers: mag\n"
                                           "train:\n  steps: 70\n")
    cfg = load_config(tmp_path / "variant.yaml", ["train.warmup_steps=5"])
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert (cfg.model.layers, cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps) == ("mag", 70, 1e-3, 5)
    assert cfg.model.dim == tiny.model.dim and cfg.data.seq_len == tiny.data.seq_len  # the rest: tiny.yaml's
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: its base: chain comes back to it \(.*a.yaml → .*b.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"file .*gone.yaml does not exist \(the base: of .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")


def test_command_line_spellings_of_tuples_and_null_are_read():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.betas=0.9,0.99", "train.resume_from=None"])
    assert cfg.train.betas == (0.9, 0.99) and cfg.train.resume_from is None
    assert load_config(None, ["train.betas=[0.8, 0.9]"]).train.betas == (0.8, 0.9)


def test_cli_reports_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: 64\n  n_headz: 4\n")
    assert main(["--config", str(bad)]) == 2
    assert "unknown key(s) n_headz" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_checkpoint_that_cannot_be_written_stops_the_run_naming_the_last_good_one(dataset, tmp_path,
                                                                                   monkeypatch):
    fill_disk(monkeypatch, lambda step: step >= 10)
    said = (r"writing the checkpoint of step 10 failed \(rank 0: \[Errno 28\] No space left on device\); the "
            r"last good checkpoint is .*step_00000005: free space")
    with pytest.raises(CheckpointWriteError, match=said):
        train(small_config(dataset, tmp_path, "train.eval_every=0"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005"]


def test_a_new_run_may_not_start_beside_an_earlier_runs_checkpoints(dataset, tmp_path):
    train(small_config(dataset, tmp_path, "train.steps=3", "train.eval_every=0", "train.checkpoint_every=3"))
    earlier = r"train\.out_dir=.* holds checkpoints of an earlier one \(newest: step_00000003\)"
    with pytest.raises(ConfigError, match=r"train\.resume=false starts a new run, and " + earlier):
        train(small_config(dataset, tmp_path, "train.steps=3", "train.eval_every=0", "train.resume=false"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]


def test_a_resume_that_would_read_other_data_names_the_setting(dataset, tmp_path):
    from data_pipeline.loader import DataError

    train(small_config(dataset, tmp_path, "train.steps=3", "train.eval_every=0"))
    with pytest.raises(DataError, match=r"saved with seed=0, this run has seed=5 \(set by data\.seed\)"):
        train(small_config(dataset, tmp_path, "train.steps=5", "train.eval_every=0", "data.seed=5"))


def test_fields_lists_every_field_with_its_default_and_comment(capsys):
    from pretrain.config import RunConfig

    assert main(["--fields"]) == 0
    listing = capsys.readouterr().out
    for section, fields in RunConfig().to_dict().items():
        for key in fields:
            assert f"  {section}.{key} = " in listing, f"{section}.{key}"
    assert re.search(r"model\.window = 256 +sliding-window size for SWA / MAG / MAL attention", listing)
    assert re.search(r"model\.memory_grad_horizon = 16 +Chunk updates the memory state's gradient", listing)
    assert re.search(r"train\.profile_steps = 3\n", listing)  # no comment of its own: the default alone


def test_print_config_resolves_and_checks_without_training(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"train.out_dir={out}", "train.steps=70",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 70 and printed["model"]["layers"] == "mac" and not out.exists()
    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), "train.stepz=7", "--print-config"]) == 2
    assert "unknown key(s) stepz" in capsys.readouterr().err


WRITER = textwrap.dedent("""
    import sys, torch
    from pretrain.checkpoint import save_checkpoint
    out = sys.argv[1]
    step = 0
    while True:
        step += 1
        save_checkpoint(out, step, {"step": step, "blob": torch.full((4_000_000,), float(step))}, keep_last=2)
        print(step, flush=True)
""")


@pytest.mark.timeout(120)
def test_sigkill_while_writing_leaves_a_loadable_latest(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    checked = 0
    for delay in (0.5, 0.8, 1.1, 1.45, 1.9):
        out = tmp_path / f"run{delay}"
        proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE)
        proc.stdout.readline()  # the first checkpoint is written (a slow import on a busy machine skips none)
        time.sleep(delay)  # then kill it at a different point of a later write each time
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        latest = latest_checkpoint(out)
        if latest is None:
            continue
        state = load_checkpoint(latest)
        assert torch.equal(state["blob"], torch.full((4_000_000,), float(state["step"])))
        pointer = (out / "checkpoints" / "latest").read_text().strip()
        assert (out / "checkpoints" / pointer / "state.pt").is_file()
        checked += 1
    assert checked >= 3, "the writer was killed before it wrote anything in most runs"


def test_checkpoint_pointer_survives_a_half_written_directory(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1}, keep_last=3)
    partial = tmp_path / "checkpoints" / ".step_00000002.partial"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"\x80\x02trunc")
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1


def test_a_vocabulary_far_larger_than_the_datasets_is_warned_about(dataset, tmp_path, capsys):
    train(small_config(dataset, tmp_path / "a", "train.steps=1", "train.warmup_steps=0",
                       "model.vocab_size=32000"))
    assert ("has a vocabulary of 257 and model.vocab_size is 32,000: 31,743 embedding rows no token uses; "
            "set model.vocab_size=257") in capsys.readouterr().out
    train(small_config(dataset, tmp_path / "b", "train.steps=1", "train.warmup_steps=0",
                       "model.vocab_size=320"))  # padded to a multiple of 64: common, not warned about
    assert "embedding rows no token uses" not in capsys.readouterr().out


def test_grad_clip_zero_turns_clipping_off_instead_of_zeroing_the_gradients():
    from types import SimpleNamespace

    from parallel.grads import clip_grad_norm_

    one_process = SimpleNamespace(layout=SimpleNamespace(model_parallel=False))
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_grad_norm_([param], 0.0, one_process) == pytest.approx(5.0)
    assert param.grad.tolist() == [3.0, 4.0, 0.0]
    clip_grad_norm_([param], 1.0, one_process)
    assert param.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_a_validation_set_of_another_tokenizer_is_refused(dataset, tmp_path):
    other = copy_with_tokenizer(dataset, tmp_path / "val", "huggingface", "tok.json")
    expected = (r"data.val=.* was tokenised with huggingface tok.json \(vocabulary 257\), data.train=.* with "
                r"bytes \(vocabulary 257\): prepare both with one tokenizer")
    with pytest.raises(DataError, match=expected):
        train(small_config(dataset, tmp_path / "run", f"data.val={other}", "train.steps=1",
                           "train.warmup_steps=0"))


class FakeWandb:
    """What the training job asks of `wandb`, recorded."""

    def __init__(self) -> None:
        import importlib.machinery

        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # as an installed module has
        self.inits: list[dict] = []
        self.rows: list[dict] = []
        self.metrics: list[tuple] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def define_metric(self, *args, **kwargs) -> None:
        self.metrics.append((args, kwargs))

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def finish(self) -> None:
        self.finished += 1


def test_weights_and_biases_gets_the_scalars_against_the_step_and_one_run_per_out_dir(
        dataset, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    train(small_config(dataset, out, "train.steps=4", "train.log_every=2", "train.wandb_project=titans",
                       "train.stop_after_steps=2"))
    train(small_config(dataset, out, "train.steps=4", "train.log_every=2", "train.wandb_project=titans"))
    first, second = fake.inits
    assert first["project"] == "titans" and first["name"] == "run" and first["resume"] == "allow"
    assert second["id"] == first["id"] == (out / "wandb_id").read_text().strip()  # the resume continues it
    assert first["config"]["train"]["steps"] == 4 and first["dir"] == str(out)
    assert (("*",), {"step_metric": "trainer/step"}) in fake.metrics and fake.finished == 2
    losses = [(row["trainer/step"], row["train/loss"]) for row in fake.rows if "train/loss" in row]
    assert [step for step, _ in losses] == [1, 2, 4]


def test_weights_and_biases_offline_writes_a_run_to_sync(dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train(small_config(dataset, out, "train.steps=2", "train.warmup_steps=0", "train.log_every=1",
                       "train.wandb_project=titans"))
    records = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1 and b"train/loss" in records[0].read_bytes()
    assert records[0].name == f"run-{(out / 'wandb_id').read_text().strip()}.wandb"
