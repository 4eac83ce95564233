"""Tensor and pipeline parallelism (and ZeRO-1 with them), and compiled blocks under DDP, ZeRO-2 and the
pipeline, in 2- and 4-process CPU runs over gloo, against the 1-process run on the same global batch:
losses of every step and the updated weights (gathered from a sharded checkpoint through its layout record)
equal within 1e-5 (losses) and 5e-5 (weights, fp32).

One launch per world size runs all its jobs (tests/train_worker.py); each has a hard deadline and fails
with every rank's log. CI runs MAC in every layout and the other variants in the 4-process layouts that
combine tp and pp; the rest, and the 8-process tp=2 × pp=2 × dp=2 run, only with RUN_SLOW=1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launcher import ROOT, free_port, launch
from train_worker import base_overrides, one_process

from parallel.mesh import Layout
from pretrain.checkpoint import load_checkpoint, verify_checkpoint
from pretrain.checkpoint_shards import consolidate
from pretrain.config import load_config
from pretrain.train import initial_weights

WORKER = Path(__file__).with_name("train_worker.py")
GLOBAL_BATCH = 4
STEPS = 3
LAUNCH_TIMEOUT_S = 600
VARIANTS = ("mac", "mag", "mal", "lmm")
SLOW = os.environ.get("RUN_SLOW") == "1"
if SLOW:  # every layout × variant: the module's launches take far longer than pytest's default deadline
    pytestmark = pytest.mark.timeout(4 * 3600)

COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]
# layout name → (world size, overrides); dp = world / (tp · pp)
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.pp_microbatches=2"]),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.pp_microbatches=2",
                            "parallel.pp_schedule=interleaved"]),
    "pp2_gpipe": (2, ["parallel.pp=2", "parallel.pp_microbatches=4", "parallel.pp_schedule=gpipe"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_microbatches=2"]),
    "tp2_pp2_ckpt": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_microbatches=2",
                         "train.activation_checkpointing=true"]),
    "tp2_dp2_zero1": (4, ["parallel.tp=2", "parallel.zero_stage=1"]),
    "pp2_dp2_zero1": (4, ["parallel.pp=2", "parallel.pp_microbatches=2", "parallel.zero_stage=1"]),
    # train.compile (aot_eager: dynamo and AOT autograd as inductor runs them, no code generated) under
    # DDP, DeepSpeed ZeRO-2, tensor parallelism and the pipeline
    "dp2_compiled": (2, [*COMPILED]),
    "dp2_zero2_compiled": (2, ["parallel.zero_stage=2", *COMPILED]),
    "tp2_compiled": (2, ["parallel.tp=2", *COMPILED]),
    "pp2_compiled": (2, ["parallel.pp=2", "parallel.pp_microbatches=2", *COMPILED]),
    "tp2_pp2_compiled": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_microbatches=2", *COMPILED]),
    # FSDP over the dp ranks of each tp shard and pipeline stage (torchtitan's 2D and 3D)
    "tp2_dp2_fsdp": (4, ["parallel.tp=2", "parallel.fsdp=true"]),
    "tp2_dp2_fsdp_compiled": (4, ["parallel.tp=2", "parallel.fsdp=true", *COMPILED]),
    "pp2_dp2_fsdp": (4, ["parallel.pp=2", "parallel.pp_microbatches=2", "parallel.fsdp=true"]),
    "pp2_dp2_fsdp_interleaved": (4, ["parallel.pp=2", "parallel.pp_microbatches=2",
                                     "parallel.pp_schedule=interleaved", "parallel.fsdp=true"]),
    # HSDP: two sharded copies over dp=4, each over 2 ranks
    "dp4_hsdp": (4, ["parallel.fsdp=true", "parallel.fsdp_shard=2"]),
    "tp2_pp2_dp2_fsdp": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_microbatches=2",
                             "parallel.fsdp=true"]),
    "tp2_pp2_dp2_zero1": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_microbatches=2",
                              "parallel.zero_stage=1"]),
}
CI_LAYOUTS = [layout for layout in LAYOUTS if LAYOUTS[layout][0] <= 4 and layout != "tp2_pp2_compiled"]
CI_CASES = {(v, "tp2_pp2") for v in VARIANTS} | {("mac", layout) for layout in CI_LAYOUTS}
CASES = [(v, layout) for v in VARIANTS for layout in LAYOUTS if SLOW or (v, layout) in CI_CASES]


SLICED = "parallel.fsdp_checkpoint=sharded"
BF16 = "train.precision=bf16"
# (job prefix, layout, extra overrides): 3 + 3 steps resumed against 6 (the plain tp2_pp2 one besides)
RESUMES = [("fsdp_", "tp2_dp2_fsdp"), ("fsdp_pp_", "pp2_dp2_fsdp"), ("sliced_tp_", "tp2_dp2_fsdp", SLICED),
           ("sliced_pp_", "pp2_dp2_fsdp", SLICED), ("sliced_hsdp_", "dp4_hsdp", SLICED)]


def by_layout(cases: list[tuple]) -> list[tuple]:
    """Cases with the same layout together: a worker builds a layout's process groups again whenever the
    layout changes from one job to the next, and megatron-core never frees the old ones (each holds gloo
    threads): the slow set's hundreds of jobs in layout-alternating order piled up thousands of threads."""
    return sorted(cases, key=lambda case: case[-1])


def launch_deadline(jobs: list) -> float:
    """A launch's deadline: the CI set's, or a minute a job (8 processes on 2 cores) for the slow set."""
    return max(LAUNCH_TIMEOUT_S, 60 * len(jobs))


def model_overrides(variant: str) -> list[str]:
    """A 4-layer model (2 per stage), 4 heads (2 per tp rank), an odd vocabulary (padded under tp)."""
    return [f"model.layers={variant}", "model.n_layers=4", "model.n_heads=4", "model.dim=32",
            "model.vocab_size=257", "model.mac_memory_tokens=0"]


def job(name: str, out: Path, variant: str, layout: str, *extra: str, steps: int = STEPS) -> dict:
    world, layout_overrides = LAYOUTS[layout]
    tp = 2 if "parallel.tp=2" in layout_overrides else 1
    dp = world // tp // (2 if "parallel.pp=2" in layout_overrides else 1)
    ov = base_overrides(out, GLOBAL_BATCH // dp, steps) + model_overrides(variant) + layout_overrides
    return {"name": name, "overrides": ov + list(extra)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    folders = {}
    for world in sorted({LAYOUTS[layout][0] for _, layout in CASES}):
        tmp = folders[world] = tmp_path_factory.mktemp(f"world{world}")
        jobs = [job(f"{v}_{layout}", tmp / f"{v}_{layout}", v, layout) for v, layout in by_layout(CASES)
                if LAYOUTS[layout][0] == world]
        if world == 2:  # refused on a CPU: megatron-core's tp layers run their backward without autocast
            jobs.append(job("tp2_bf16", tmp / "tp2_bf16", "mac", "tp2", BF16) | {"expect_error": True})
        if world == 4:  # 3 + 3 steps with a resume under tp=2 × pp=2
            jobs.append(job("resume_first", tmp / "resume", "mac", "tp2_pp2", "train.stop_after_steps=3",
                            steps=6))
            jobs.append(job("resume_second", tmp / "resume", "mac", "tp2_pp2", steps=6))
            jobs.append(job("whole", tmp / "whole", "mac", "tp2_pp2", steps=6))
            for prefix, layout, *extra in RESUMES:  # FSDP's, gathered or in slices
                for part in ("resume_first", "resume_second", "whole"):
                    stop = ["train.stop_after_steps=3"] if part == "resume_first" else []
                    folder = tmp / (prefix + ("whole" if part == "whole" else "resume"))
                    jobs.append(job(prefix + part, folder, "mac", layout, *extra, *stop, steps=6))
            # the same config on 4 processes (dp 2) resuming a 2-process (dp 1) tp=2 checkpoint
            jobs.append(job("wrong_layout", folders[2] / "mac_tp2", "mac", "tp2_dp2_zero1",
                            "parallel.zero_stage=0", "train.steps=7") | {"expect_error": True})
            jobs.append(job("changed_layout", tmp / "mac_tp2_dp2_zero1", "mac", "tp2_pp2", "train.steps=7",
                            "parallel.zero_stage=1") | {"expect_error": True})
            # rank 3 cannot write its shard of the step-6 checkpoint: every rank stops, none waits on it
            jobs.append(job("full_disk", tmp / "full", "mac", "tp2_pp2", steps=6)
                        | {"expect_error": True, "full_disk_rank": 3, "full_disk_step": 6})
            jobs.append(job("hsdp_bad", tmp / "hsdp_bad", "mac", "dp4_hsdp", "parallel.fsdp_shard=3")
                        | {"expect_error": True})
            # FSDP gathering in bf16 (the default under bf16 compute) across pipeline stages
            jobs.append(job("bf16_gather_pp2_dp2_fsdp", tmp / "bf16_gather", "mal", "pp2_dp2_fsdp", BF16))
            # the same two with checkpoints written in the background (train.async_checkpoint)
            background = "train.async_checkpoint=true"
            jobs.append(job("async_whole", tmp / "async_whole", "mac", "tp2_pp2", background, steps=6))
            jobs.append(job("full_disk_async", tmp / "full_async", "mac", "tp2_pp2", background, steps=6)
                        | {"expect_error": True, "full_disk_rank": 3, "full_disk_step": 6})
        started = time.monotonic()
        results.update(launch(WORKER, jobs, tmp, world, launch_deadline(jobs)))
        results[f"_seconds_world{world}"] = time.monotonic() - started
    return results


def reference_run(out: Path, *extra: str):
    """The 1-process run on the global batch (in-memory data): its result and final weights."""
    result = one_process(out, GLOBAL_BATCH, *extra, steps=STEPS)
    return result, load_checkpoint(result.checkpoint)["model"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The 1-process runs of each variant on the global batch."""
    return {v: reference_run(tmp_path_factory.mktemp(f"ref_{v}"), *model_overrides(v))
            for v in sorted({v for v, _ in CASES})}


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
    sharded = any(o.startswith(("parallel.tp=", "parallel.pp=")) for o in LAYOUTS[layout][1])
    weights = consolidate(ckpt) if sharded else initial_weights(str(ckpt))  # data parallel: dense
    assert set(weights) == set(ref_weights), set(weights) ^ set(ref_weights)
    # compiled blocks round differently again (AOT autograd's decompositions): under tp × FSDP MAG and MAL
    # land at 5.4e-5 to 5.7e-5 (the slow set); a wrong gradient shows as 1e-2 or more
    bound = 1e-4 if "train.compile=true" in LAYOUTS[layout][1] else 5e-5
    for name, want in ref_weights.items():  # relative in norm: Adam turns rounding in near-zero
        error = (weights[name] - want).norm() / want.norm()  # gradients into ±lr steps elementwise
        assert error <= bound, (name, error.item())  # (the losses, above, agree to 1e-5)


@pytest.mark.parametrize("prefix", ["", *(prefix for prefix, *_ in RESUMES)])
def test_resume_under_tp_and_pp_continues_bitwise(runs, prefix):
    """tp × pp, tp × FSDP and pp × FSDP (each rank loads its dp slice of its tp shard or stage), with
    gathered checkpoints or each rank's slices (under HSDP written by the replicas in turn)."""
    assert runs[f"{prefix}resume_first"]["last_step"] == 3
    assert runs[f"{prefix}resume_second"]["losses"] == runs[f"{prefix}whole"]["losses"]
    first = consolidate(Path(runs[f"{prefix}resume_second"]["checkpoint"]))
    second = consolidate(Path(runs[f"{prefix}whole"]["checkpoint"]))
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name, folder", [("full_disk", "full"), ("full_disk_async", "full_async")])
def test_a_checkpoint_one_rank_cannot_write_stops_every_rank(runs, name, folder):
    """Written in the step or in the background: the same error on every rank."""
    error = runs[name]["error"]
    assert error.startswith("CheckpointWriteError: writing the checkpoint of step 6 failed (rank 3: [Errno "
                            "28] No space left on device); the last good checkpoint is "), error
    assert f"{folder}/checkpoints/step_00000003: free space" in error, error


def test_tensor_parallelism_under_bf16_on_a_cpu_is_refused(runs):
    error = runs["tp2_bf16"]["error"]
    assert error.startswith("ConfigError: train.precision=bf16 with parallel.tp=2 runs on GPUs only"), error


def test_an_fsdp_shard_size_that_does_not_divide_dp_is_refused(runs):
    assert runs["hsdp_bad"]["error"].startswith("LayoutError: parallel.fsdp_shard=3 does not divide the 4 "
                                                "data-parallel ranks")


def test_background_checkpoints_under_tp_and_pp_equal_the_synchronous_ones(runs):
    assert runs["async_whole"]["losses"] == runs["whole"]["losses"]
    got, want = (consolidate(Path(runs[name]["checkpoint"])) for name in ("async_whole", "whole"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_with_another_layout_is_refused(runs):
    message = runs["wrong_layout"]["error"]
    assert "was written with the layout tp=2 pp=1 sp=1 dp=1, this run has tp=2 pp=1 sp=1 dp=2" in message
    message = runs["changed_layout"]["error"]  # found before anything is built or written
    assert "holds checkpoints of another model or layout (parallel.pp=1 there, 2 here)" in message


# ------------------------------------------------------------------------------- bad layouts, one line


@pytest.mark.parametrize("override, message", [
    (["model.n_heads=3", "model.dim=48", "parallel.tp=2"],
     "model.n_heads=3 is not divisible by parallel.tp=2: change model.n_heads or parallel.tp"),
    (["model.n_heads=4", "model.memory_heads=3", "parallel.tp=2"], "model.memory_heads=3 is not divisible"),
    (["model.n_layers=3", "model.layers=mac", "parallel.pp=2"],
     "model.n_layers=3 does not split into 2 pipeline stages"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved", "model.n_layers=2"],
     "does not split into 4 pipeline stages (parallel.pp=2 × pp_stages_per_rank=2)"),
    (["parallel.pp=2", "parallel.zero_stage=2"], "ZeRO-2/3 run with pure data parallelism only"),
    (["parallel.tp=2", "parallel.zero_stage=3"], "ZeRO-2/3 run with pure data parallelism only"),
    (["parallel.pp=2", "data.batch_size=6"],
     "data.batch_size=6 is not divisible by parallel.pp_microbatches=4"),
    (["parallel.pp_schedule=zigzag"], "parallel.pp_schedule must be one of 1f1b, interleaved, gpipe"),
    (["train.zero_stage=1"], "train.zero_stage has moved: write parallel.zero_stage instead"),
])
def test_bad_layout_is_refused_before_any_work(override, message):
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_world_size_that_is_not_the_product_fails_in_one_line(tmp_path):
    from parallel.mesh import LayoutError

    with pytest.raises(LayoutError, match=r"world size 6 is not a multiple of tp·pp·sp = 4·1·1 = 4"):
        Layout.of(6, tp=4)
    assert Layout.of(8, tp=2, pp=2) == Layout(tp=2, pp=2, sp=1, dp=2)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", "configs/tiny.yaml",
                           "parallel.tp=2", f"train.out_dir={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "layout error: world size 3 is not a multiple of tp·pp·sp = 2·1·1 = 2: launch a multiple of 2 "
        "processes or change parallel.tp / parallel.pp"]
    assert not (tmp_path / "checkpoints").exists()


def test_rank_coordinates_follow_megatron_order():
    layout = Layout.of(8, tp=2, pp=2)
    assert [layout.coordinates(r) for r in (0, 1, 2, 5, 7)] == [
        {"tp": 0, "sp": 0, "dp": 0, "pp": 0}, {"tp": 1, "sp": 0, "dp": 0, "pp": 0},
        {"tp": 0, "sp": 0, "dp": 1, "pp": 0}, {"tp": 1, "sp": 0, "dp": 0, "pp": 1},
        {"tp": 1, "sp": 0, "dp": 1, "pp": 1}]
    assert all(layout.rank_of(**layout.coordinates(r)) == r for r in range(8))


# ----------------------------------------------------------------- the README command, under torchrun


STEP_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


@pytest.mark.timeout(400)
def test_torchrun_tp2_pp2_prints_the_single_process_losses(tmp_path):
    """`torchrun --nproc-per-node 4 -m pretrain.train --config configs/tiny.yaml parallel.tp=2
    parallel.pp=2` (dp = 1: the same data as one process) prints the losses of the 1-process run, and
    profiling a step (`train.profile_start`) writes every rank's trace without changing them."""
    from data_pipeline.corpus import expand_inputs
    from data_pipeline.prepare import prepare

    data = tmp_path / "data"
    files = expand_inputs([str(ROOT / "titans")], ("*.py",))
    prepare(files, data, "bytes", sample_tokens=65, shard_samples=64, val_fraction=0.2, progress=False)
    common = ["--config", "configs/tiny.yaml", f"data.train={data}", "data.default_corpus=false",
              "data.seq_len=64", "train.steps=4", "train.eval_every=2", "train.eval_batches=2",
              "train.warmup_steps=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    runs = {}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
                str(free_port())]
    for name, launcher in (("single", [sys.executable, "-m", "pretrain.train"]),
                           ("tp2_pp2", torchrun + ["-m", "pretrain.train"])):
        extra = ["parallel.tp=2", "parallel.pp=2", "train.profile_start=3", "train.profile_steps=1"] \
            if name != "single" else []
        done = subprocess.run(launcher + common + extra + [f"train.out_dir={tmp_path / name}"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[name] = [tuple(map(float, m.groups())) for m in STEP_LINE.finditer(done.stdout + done.stderr)]
        if name != "single":
            assert "rank 3/4: tp 1/2, pp 1/2, sp 0/1, dp 0/1" in done.stdout
            assert "Transformer Engine and Apex" not in done.stderr  # megatron-core's noise, not ours
            window = tmp_path / name / "profile" / "steps3-3"
            assert sorted(p.name for p in window.glob("*.trace.json.gz")) == [f"rank{r}.trace.json.gz"
                                                                             for r in range(4)]
    assert [r[0] for r in runs["single"]] == [2.0, 4.0]
    for a, b in zip(runs["single"], runs["tp2_pp2"], strict=True):
        assert a == pytest.approx(b, abs=2e-4), (runs["single"], runs["tp2_pp2"])


@pytest.mark.timeout(200)
def test_a_missing_dataset_is_one_clean_error_on_every_rank(tmp_path):
    """Rank 0 checks the dataset while the others wait at a barrier: its error reaches them as their own,
    not as a closed connection and a traceback per rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]
    done = subprocess.run([*torchrun, "-m", "pretrain.train", "--config", "configs/tiny.yaml",
                           f"data.train={tmp_path / 'nope'}", f"train.out_dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert done.stderr.count(f"error: data.train={tmp_path / 'nope'}") == 2, done.stderr[-3000:]
    assert "Connection closed by peer" not in done.stderr and "]: Traceback" not in done.stderr, \
        done.stderr[-3000:]  # (torchrun's own traceback of a failed child remains: its way)


# ------------------------------------------------------------------------------------------- planner


def test_planner_counts_equal_the_real_shards(runs, tmp_path):
    from parallel.plan import local_parameter_counts

    cfg = load_config(None, job("plan", tmp_path, "mac", "tp2_pp2")["overrides"])
    planned = [r.parameters for r in local_parameter_counts(cfg)]  # rank order: tp fastest, then pp
    assert planned == runs["mac_tp2_pp2"]["parameters_per_rank"]
    assert len(set(planned)) > 1  # the stages differ (embedding vs head + norm)


@pytest.mark.parametrize("config, extra", [("mac-1.3b", ["parallel.pp_microbatches=4"]), ("mac-7b", [])])
def test_billion_parameter_configs_build_on_meta_under_tp2_pp4(config, extra):
    from parallel.plan import local_parameter_counts
    from titans.model import num_parameters

    cfg = load_config(ROOT / "configs" / "paper" / f"{config}.yaml",
                      ["parallel.tp=2", "parallel.pp=4", "parallel.zero_stage=1", *extra])
    ranks = local_parameter_counts(cfg)
    assert [(r.tp_rank, r.pp_rank) for r in ranks] == [(t, p) for p in range(4) for t in range(2)]
    total = num_parameters(cfg.model)
    held = sum(r.parameters for r in ranks)  # shards once, replicated norms per tp rank, tied copy twice
    assert total <= held <= 1.1 * total, (held, total)
    assert sum(r.layers for r in ranks) == 2 * cfg.model.n_layers


def test_planner_cli_prints_a_table_and_a_verdict():
    done = subprocess.run([sys.executable, "-m", "parallel.plan", "--config", "configs/paper/mac-7b.yaml",
                           "--gpus", "64", "parallel.tp=2", "parallel.pp=4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode in (0, 1), done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| \d \| \d \|", line)]
    assert len(rows) == 8, done.stdout
    assert "layout tp=2 pp=4 sp=1 dp=8 on 64 × h100-80gb" in done.stdout
    assert re.search(r"verdict: (GO|NO-GO)", done.stdout)
    assert re.search(r"checkpoint: up to \d+\.\d\d GiB of state per file, written by dp rank 0", done.stdout)


def test_planner_says_what_a_checkpoint_asks_of_the_host():
    from parallel.plan import checkpoint_line

    cfg = load_config(None, ["parallel.fsdp=true"])
    assert checkpoint_line(cfg, 10**9, 8) == (
        "checkpoint: up to 11.18 GiB of state per file, gathered into rank 0's host memory first; "
        "parallel.fsdp_checkpoint=sharded writes slices")
    sliced = load_config(None, ["parallel.fsdp=true", "parallel.fsdp_checkpoint=sharded"])
    want = "checkpoint: every rank writes its FSDP slice, 1.40 GiB at most"
    assert checkpoint_line(sliced, 10**9, 8) == want


def test_planner_counts_checkpointing_every_nth_block_between_none_and_all():
    from parallel.plan import rank_memory

    def total(every: int) -> float:  # 0: off
        cfg = load_config(ROOT / "configs" / "paper" / "mac-1.3b.yaml",
                          [f"train.activation_checkpointing={every > 0}",
                           f"train.activation_checkpointing_every={max(every, 1)}"])
        return rank_memory(cfg, 8, 10**9, 24, 12)["total"]

    assert total(0) > total(2) > total(1)


def test_planner_counts_full_attention_halo_on_the_last_sequence_shard():
    """Under sp the last rank holds every earlier shard's inputs of each full-attention layer: the planner
    adds them for the full layers the meta-built shard has (none for windowed attention); checkpointed
    layers have them sent again in backward, so it counts one layer's. Under a zigzag split every rank
    holds the keys and values of the rows before its late piece: 3.5 shards' at sp 4."""
    from parallel.plan import local_parameter_counts, rank_memory

    def acts(layers: str, sp: int, ckpt: bool, split: str = "contiguous") -> tuple[float, int]:
        cfg = load_config(None, [f"model.layers={layers}", "model.n_layers=4", "data.seq_len=4096",
                                 f"parallel.sp={sp}", f"train.activation_checkpointing={ckpt}",
                                 f"parallel.sp_split={split}"])
        (rank,) = local_parameter_counts(cfg)
        need = rank_memory(cfg, 1, rank.parameters, rank.layers, rank.memory_layers,
                           full_layers=rank.full_layers)
        return need["acts_ckpt" if ckpt else "acts"], rank.full_layers

    (swa, none), (full, four) = acts("swa", 4, False), acts("full", 4, False)
    assert (none, four, acts("lmm,full", 4, False)[1], acts("mac", 4, False)[1]) == (0, 4, 2, 0)
    cfg = load_config(None, ["data.seq_len=4096"])
    rows = 3 * cfg.data.batch_size * 1024 * cfg.model.dim * 2  # (sp − 1) shards of 1,024 tokens, bf16 bytes
    assert full - swa == pytest.approx(4 * rows * 4)  # received rows, their norm, keys and values (tp 1)
    assert acts("full", 4, True)[0] - acts("swa", 4, True)[0] == pytest.approx(rows * 4)  # one layer's
    assert acts("full", 4, False, "zigzag")[0] - swa == pytest.approx(4 * rows * 2 * 3.5 / 3)  # keys, values
    assert acts("full", 1, False)[0] == pytest.approx(acts("swa", 1, False)[0])  # one process: no halo


def test_planner_step_time_waits_for_the_last_sequence_shard_under_full_attention():
    """The last shard's queries see every earlier row: (2 − 1/sp) × the mean attention score FLOPs, plus
    the earlier shards' keys and values to project; the planner's step time is that rank's. A zigzag split
    projects each row's keys and values twice, nothing more."""
    from parallel.plan import format_plan, plan

    def summary(layers: str, sp: int, split: str = "contiguous") -> dict:
        cfg = load_config(None, [f"model.layers={layers}", "data.seq_len=65536", f"parallel.sp={sp}",
                                 f"parallel.sp_split={split}"])
        return plan(cfg, sp, "h100-80gb", 0.4)[1]

    assert summary("lmm", 4)["step_s"] == pytest.approx(summary("lmm", 1)["step_s"] / 4)  # 4 GPUs, balanced
    one, four = summary("full", 1), summary("full", 4)
    assert one["last_shard_extra"] == 0
    assert 0.6 < four["last_shard_extra"] < 0.75  # the scores, most of a token's FLOPs at 64K: ≈ 1 − 1/sp
    assert four["step_s"] == pytest.approx(one["step_s"] / 4 * (1 + four["last_shard_extra"]))
    cfg = load_config(None, ["model.layers=full", "data.seq_len=65536", "parallel.sp=4",
                             "parallel.sp_split=contiguous"])
    text = format_plan(cfg, *plan(cfg, 4, "h100-80gb", 0.4))
    assert "the busiest sequence shard's, 66% more FLOPs a token" in text
    assert 0 < summary("full", 4, "zigzag")["last_shard_extra"] < 0.01  # a row's keys and values again
    cfg = load_config(None, ["model.layers=full", "data.seq_len=65536", "parallel.sp=4"])  # auto: zigzag
    assert "zigzag pieces' keys and values twice" in format_plan(cfg, *plan(cfg, 4, "h100-80gb", 0.4))


def test_planner_advice_leaves_out_what_is_already_on():
    from parallel.plan import format_plan, plan

    for on in (True, False):
        cfg = load_config(ROOT / "configs" / "paper" / "mac-7b.yaml",
                          ["parallel.tp=1", "parallel.pp=1", f"train.activation_checkpointing={on}"])
        verdict = format_plan(cfg, *plan(cfg, 8, "h100-80gb", 0.4)).splitlines()[-1]
        assert verdict.startswith("verdict: NO-GO"), verdict
        assert ("turn on train.activation_checkpointing" in verdict) != on, verdict


@pytest.mark.parametrize("args, message", [(["--mfu", "0"], "--mfu is a fraction of the GPU's peak"),
                                           (["--mfu", "1.5"], "in (0, 1], got 1.5"),
                                           (["--gpus", "-8"], "--gpus must be >= 1 (0: tp·pp·sp), got -8")])
def test_planner_refuses_numbers_that_mean_nothing(args, message, capsys):
    from parallel.plan import main as plan_main

    with pytest.raises(SystemExit):
        plan_main(["--config", "configs/tiny.yaml", *args])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "long").glob("*.yaml")), ids=lambda p: p.stem)
def test_long_context_configs_validate_and_plan_per_shard(config):
    """The long-context configs load and pass the layout checks; the planner counts a rank's activations
    for its sequence shard: they fall as 1/sp."""
    from parallel.plan import rank_memory

    cfg = load_config(config)
    assert cfg.parallel.sp > 1
    acts = {sp: rank_memory(load_config(config, [f"parallel.sp={sp}"]), 1, 10**6, cfg.model.n_layers,
                            cfg.model.n_layers)["acts_ckpt"] for sp in (1, cfg.parallel.sp)}
    assert acts[cfg.parallel.sp] == pytest.approx(acts[1] / cfg.parallel.sp)


# ---------------------------------------------------------------------------- sequence parallelism

SP_SEQ_LEN = 64  # 4 shards of 16 tokens: whole memory chunks (8) and MAC segments (16)
SP_LAYOUTS = {  # name → (world size, overrides)
    "sp2": (2, ["parallel.sp=2"]),
    "sp4": (4, ["parallel.sp=4"]),
    "sp2_tp2": (4, ["parallel.sp=2", "parallel.tp=2"]),
    "sp2_dp2_zero1": (4, ["parallel.sp=2", "parallel.zero_stage=1"]),
    "sp2_pp2": (4, ["parallel.sp=2", "parallel.pp=2", "parallel.pp_microbatches=2"]),
    # train.compile under the relay: each block's halves around the halo compiled (aot_eager)
    "sp2_ckpt": (2, ["parallel.sp=2", "train.activation_checkpointing=true"]),  # each block's two halves
    "sp4_ckpt": (4, ["parallel.sp=4", "train.activation_checkpointing=true"]),  # full attention's halo resent
    "sp2_compiled": (2, ["parallel.sp=2", *COMPILED]),
    "sp2_tp2_compiled": (4, ["parallel.sp=2", "parallel.tp=2", *COMPILED]),
    # FSDP over the dp ranks of each sequence shard (each block's halves hooked for its gathers)
    "sp2_dp2_fsdp": (4, ["parallel.sp=2", "parallel.fsdp=true"]),
    "sp2_dp2_fsdp_compiled": (4, ["parallel.sp=2", "parallel.fsdp=true", *COMPILED]),
    "sp2_dp2_fsdp_ckpt": (4, ["parallel.sp=2", "parallel.fsdp=true", "train.activation_checkpointing=true"]),
    "sp2_dp2_accum": (4, ["parallel.sp=2", "data.batch_size=1", "train.grad_accum=2"]),
    "sp2_dp2_fsdp_accum": (4, ["parallel.sp=2", "parallel.fsdp=true", "data.batch_size=1",
                               "train.grad_accum=2"]),  # the same global batch in two micro-batches
    "sp2_pp2_dp2_fsdp": (8, ["parallel.sp=2", "parallel.pp=2", "parallel.pp_microbatches=2",
                             "parallel.fsdp=true"]),
    "sp2_tp2_dp2_fsdp": (8, ["parallel.sp=2", "parallel.tp=2", "parallel.fsdp=true"]),
    "sp2_dp4_hsdp": (8, ["parallel.sp=2", "parallel.fsdp=true", "parallel.fsdp_shard=2"]),
}
SP_CI = [("lmm", 1, "sp2"), ("lmm", 2, "sp2"), ("mac", 1, "sp2"), ("mac", 2, "sp2"), ("lmm", 2, "sp4"),
         ("mac", 2, "sp4"), ("mac", 2, "sp2_tp2"), ("lmm", 2, "sp2_dp2_zero1"), ("mag", 2, "sp2"),
         ("mag", 2, "sp4"), ("swa", 2, "sp4"), ("mal", 2, "sp4"), ("mag", 2, "sp2_pp2"),
         ("mal", 2, "sp2_compiled"),  # compiled: MAL's memory before the halo, the halo, and the relay
         ("mac", 2, "sp2_ckpt"), ("mag", 2, "sp2_ckpt"),
         ("mac", 2, "sp2_dp2_fsdp"), ("mal", 2, "sp2_dp2_fsdp"), ("mag", 2, "sp2_dp2_fsdp_compiled"),
         ("mal", 2, "sp2_dp2_fsdp_ckpt"), ("mag", 2, "sp2_dp2_fsdp_accum"),
         ("full,mac", 2, "sp4"), ("full,mag", 2, "sp2_dp2_fsdp"),  # full attention: every earlier row,
         ("full,mac", 2, "sp4_ckpt"), ("full,mag", 2, "sp2_dp2_fsdp_ckpt"),  # sent again in backward
         # attention alone: zigzag pieces (parallel.sp_split=auto), keys and values all-gathered
         ("full", 2, "sp4"), ("full,swa", 2, "sp2_pp2"), ("full,swa", 2, "sp2_dp2_fsdp_ckpt"),
         ("full", 2, "sp2_compiled")]
SP_CASES = ([(v, d, layout) for v in ("lmm", "mac", "mag", "mal", "swa", "full,mac", "full,swa")
             for d in (1, 2) for layout in SP_LAYOUTS if v not in ("swa", "full,swa") or d == 2]
            if SLOW else SP_CI)  # (the memory's depth: none without a memory)


def sp_job(name: str, out: Path, variant: str, depth: int, layout: str, *extra: str, steps: int = STEPS
           ) -> dict:
    world, layout_overrides = SP_LAYOUTS[layout]
    sizes = dict(o.removeprefix("parallel.").split("=") for o in layout_overrides
                 if o[9:12] in ("sp=", "tp=", "pp="))
    dp = world // int(sizes.get("sp", 1)) // int(sizes.get("tp", 1)) // int(sizes.get("pp", 1))
    ov = (base_overrides(out, GLOBAL_BATCH // dp, steps) + model_overrides(variant)
          + [f"model.memory_depth={depth}", f"data.seq_len={SP_SEQ_LEN}", *layout_overrides, *extra])
    return {"name": name, "overrides": ov}


@pytest.fixture(scope="module")
def sp_runs(tmp_path_factory):
    results = {}
    for world in sorted({SP_LAYOUTS[layout][0] for _, _, layout in SP_CASES} | {4}):
        tmp = tmp_path_factory.mktemp(f"sp_world{world}")
        jobs = [sp_job(f"{v}{d}_{layout}", tmp / f"{v}{d}_{layout}", v, d, layout)
                for v, d, layout in by_layout(SP_CASES) if SP_LAYOUTS[layout][0] == world]
        if world == 4:  # 3 + 3 steps with a resume under sp × FSDP (MAL: memory and attention both relayed)
            for prefix, extra in (("sp_fsdp_", []), ("sp_sliced_", [SLICED])):
                for part in ("resume_first", "resume_second", "whole"):
                    stop = ["train.stop_after_steps=3"] if part == "resume_first" else []
                    folder = tmp / (prefix + ("whole" if part == "whole" else "resume"))
                    jobs.append(sp_job(prefix + part, folder, "mal", 2, "sp2_dp2_fsdp", *extra, *stop,
                                       steps=6))
            # FSDP gathering in bf16 under the relay (the state and the halo keep their float32)
            jobs.append(sp_job("bf16_gather_sp2_dp2_fsdp", tmp / "bf16_gather", "mal", 2, "sp2_dp2_fsdp",
                               BF16))
            # attention alone under FSDP: zigzag pieces (the default) against contiguous shards
            for split in ("zigzag", "contiguous"):
                jobs.append(sp_job(f"split_{split}", tmp / f"split_{split}", "full,swa", 2, "sp2_dp2_fsdp",
                                   f"parallel.sp_split={split}"))
        results.update(launch(WORKER, jobs, tmp, world, launch_deadline(jobs)))
    return results


@pytest.fixture(scope="module")
def sp_references(tmp_path_factory):
    return {(v, d): reference_run(tmp_path_factory.mktemp(f"sp_ref_{v}{d}"), *model_overrides(v),
                                f"model.memory_depth={d}", f"data.seq_len={SP_SEQ_LEN}")
            for v, d in sorted({(v, d) for v, d, _ in SP_CASES})}


@pytest.mark.parametrize("variant, depth, layout", SP_CASES)
def test_sequence_parallel_matches_one_process(sp_runs, sp_references, variant, depth, layout):
    """The memory state relayed between sequence shards: the same losses and weights as one process
    reading the whole sequence."""
    got = sp_runs[f"{variant}{depth}_{layout}"]
    reference, ref_weights = sp_references[(variant, depth)]
    assert all(close(a, b) for a, b in zip(got["losses"], reference.losses, strict=True)), \
        (got["losses"], reference.losses)
    # The validation loss comes after the third update, from weights that differ by up to ~1.2e-3 (below):
    # 1e-5 was at the edge of the fp32 rounding (MAL sp=4 lands at 1.1e-5 to 1.2e-5 with any reordering of
    # the memory's sums); a broken relay moves it by far more than 1e-4.
    accumulated = "train.grad_accum=2" in SP_LAYOUTS[layout][1]  # validates batch_size=1 × eval_batches:
    for step, val in ({} if accumulated else reference.val_losses).items():  # half the reference's sequences
        assert close(got["val_losses"][str(step)], val, rel=1e-4), (step, got["val_losses"],
                                                                     reference.val_losses)
    weights = consolidate(Path(got["checkpoint"]))
    for name, want in ref_weights.items():  # the shards' gradients are summed in another order: in
        error = (weights[name] - want).norm() / want.norm()  # float64 they agree to 1e-15
        assert error <= 3e-3, (name, error.item())  # (test_sequence_gradients.py); in fp32 Adam turns
        # the rounding of near-zero gradients into ±lr steps: up to 1.2e-3 after 3 steps (MAL sp=4, after
        # the memory's coefficient sums were reordered; 2.4e-4 for MAG before); a wrong gradient shows as
        # 1e-2 or more (the blocks' gradients lost under sp × pp: 2e-1)


@pytest.mark.parametrize("layout", ["pp2_dp2_fsdp", "sp2_dp2_fsdp"])
def test_fsdp_gathering_in_bf16_stays_within_bf16_of_one_process(runs, sp_runs, tmp_path, layout):
    """Blocks gathered in bfloat16 across pipeline stages and under the relay: the losses of one process
    under bf16 autocast within bf16's tolerance (tests/test_fsdp.py has the exact one-rank check)."""
    sp = layout.startswith("sp")
    got = (sp_runs if sp else runs)[f"bf16_gather_{layout}"]
    shape = ["model.memory_depth=2", f"data.seq_len={SP_SEQ_LEN}"] if sp else []
    reference, _ = reference_run(tmp_path, *model_overrides("mal"), *shape, BF16)
    assert all(close(a, b, rel=1e-3) for a, b in zip(got["losses"], reference.losses, strict=True)), \
        (got["losses"], reference.losses)
    for step, val in reference.val_losses.items():
        assert close(got["val_losses"][str(step)], val, rel=1e-3), (step, got["val_losses"],
                                                                     reference.val_losses)
    assert list(got["fsdp_bytes"]["gathered"]) == ["bfloat16"], got["fsdp_bytes"]


def test_zigzag_pieces_gather_each_block_once_a_forward_under_fsdp(sp_runs, sp_references):
    """A zigzag shard's two pieces run in one call per block (`after_halo_pieces`), so FSDP gathers the
    block once for both: the bytes gathered equal contiguous shards', and both train as one process does."""
    zigzag, contiguous = sp_runs["split_zigzag"], sp_runs["split_contiguous"]
    assert zigzag["fsdp_bytes"] == contiguous["fsdp_bytes"], (zigzag["fsdp_bytes"], contiguous["fsdp_bytes"])
    reference, _ = sp_references[("full,swa", 2)]
    for got in (zigzag, contiguous):
        assert all(close(a, b) for a, b in zip(got["losses"], reference.losses, strict=True)), \
            (got["losses"], reference.losses)


@pytest.mark.parametrize("prefix", ["sp_fsdp_", "sp_sliced_"])
def test_resume_under_sp_and_fsdp_continues_bitwise(sp_runs, prefix):
    """Each rank reloads its dp slice (of the gathered checkpoint, or the slice file sp rank 0 wrote); the
    relay starts again from it."""
    assert sp_runs[prefix + "resume_first"]["last_step"] == 3
    assert sp_runs[prefix + "resume_second"]["losses"] == sp_runs[prefix + "whole"]["losses"]
    first = initial_weights(sp_runs[prefix + "resume_second"]["checkpoint"])
    second = initial_weights(sp_runs[prefix + "whole"]["checkpoint"])
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("override, message", [
    (["parallel.sp=4", "model.layers=mag", "model.window=32", "data.seq_len=64"],
     "model.window=32 reaches past the previous sequence shard (data.seq_len / parallel.sp = 16 tokens)"),
    (["parallel.sp=2", "parallel.pp=2", "parallel.pp_microbatches=4", "model.layers=lmm",
      "data.batch_size=2"],
     "data.batch_size=2 does not split into parallel.pp_microbatches=4 equal micro-batches"),
    (["parallel.sp=4", "model.layers=mac", "model.segment_len=64", "model.memory_chunk=16",
      "data.seq_len=300"],
     "data.seq_len=300 does not split into 4 shards of whole memory chunks (16) and MAC segments (64): use a "
     "multiple of 256, e.g. 256 or 512"),
    (["parallel.sp=2", "model.layers=full,mac", "parallel.sp_split=zigzag"],
     "parallel.sp_split=zigzag needs attention layers only, and model.layers has mac: the memory's state is "
     "relayed from shard to shard in sequence order"),
    (["parallel.sp=4", "model.layers=full", "data.seq_len=100"],
     "data.seq_len=100 does not split into 2·parallel.sp = 8 equal zigzag pieces"),
    (["parallel.sp=2", "parallel.sp_split=balanced"],
     "parallel.sp_split='balanced': use auto, contiguous, zigzag"),
])
def test_sequence_parallel_layouts_it_cannot_run_are_refused(override, message):
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value), str(err.value)


def test_zigzag_split_is_the_default_for_attention_alone():
    """auto: zigzag pieces where there is full attention and no memory to relay; a zigzag shard is an early
    and a late piece; a window longer than a piece is fine (the rows are gathered)."""
    from parallel.sequence import zigzag_pieces, zigzag_split

    assert zigzag_split(["full", "swa"], "auto") and zigzag_split(["full"], "zigzag")
    assert not zigzag_split(["swa"], "auto") and not zigzag_split(["full", "mac"], "auto")
    assert not zigzag_split(["full"], "contiguous")
    assert [zigzag_pieces(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    load_config(None, ["parallel.sp=4", "model.layers=full,swa", "model.window=32", "data.seq_len=64"])


def test_a_sharded_checkpoint_loads_for_evaluation(runs, references):
    """Evaluation (pretrain.model_io) reads a tp × pp checkpoint through its layout record."""
    from pretrain.model_io import load_model

    loaded = load_model(runs["mac_tp2_pp2"]["checkpoint"])
    _, ref_weights = references["mac"]
    state = loaded.model.state_dict()
    for name, want in ref_weights.items():
        assert (state[name] - want).norm() / want.norm() <= 5e-5, name  # as in test_layout_matches
