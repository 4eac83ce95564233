"""The main job: `python -m pretrain.train --config configs/<run>.yaml [section.key=value ...]`.

Trains a TitansLM with AdamW, warmup + cosine, clipping and accumulation; logs to TensorBoard; writes
atomic, checksummed checkpoints and resumes from the newest good one; SIGTERM / SIGUSR1 / SIGINT save
and exit with code 75 (interrupted: run again to continue). Launch with `torchrun` or `srun` for several
processes (gloo on CPU, NCCL on GPU). The `parallel:` section sets the layout (tp, pp, sp, ZeRO); the
loop below is the same for every layout: it talks to an engine (pretrain/engine.py) that owns the model
pieces, the wrapping and the optimizer.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import torch
import yaml

from data_pipeline.loader import DataError
from parallel.fsdp import local_numel, precision_policy
from parallel.mesh import LayoutError, Mesh, init_mesh, launch_environment
from parallel.plan import CHECKPOINT_BYTES_PER_PARAMETER, local_parameter_counts, preflight_problem
from parallel.sequence import zigzag_split
from parallel.tensor import padded_vocab
from pretrain.async_checkpoint import AsyncCheckpointWriter, CheckpointWriteFailed, detached_copy
from pretrain.batch import Batch, as_batch
from pretrain.checkpoint import (
    CorruptCheckpointError,
    begin_checkpoint,
    checkpoint_path,
    fsync_tree,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    staging_dir,
)
from pretrain.config import ConfigError, ParallelConfig, RunConfig, load_config
from pretrain.config_doc import describe_fields
from pretrain.cpu_allocator import use_cpu_allocator
from pretrain.data import build_loaders, validation_sets
from pretrain.engine import Engine, build_engine
from pretrain.logging import MetricsLogger, ProgressBar, describe_figures, peak_flops, step_figures
from pretrain.loss import loss_denominator
from pretrain.profiling import StepProfiler
from pretrain.resume import Start, choose_start, record_start
from pretrain.run_lock import RunFolderBusy, hold_run_lock
from pretrain.schedule import lr_at, stable_end
from titans.flops import training_flops_per_token
from titans.kernels.toolchain import inductor_cpu_problem, runnable_kernel
from titans.model import TitansLM, num_parameters

PROFILE_LINES_SHOWN = 14  # the header and the top ten ops of the profile's table


class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_nonfinite_steps` non-finite losses in a row."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (on any rank); the message names the last good one."""


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # per optimizer step (NaN for skipped steps)
    val_losses: dict[int, float] = field(default_factory=dict)
    val_set_losses: dict[int, dict[str, float]] = field(default_factory=dict)  # data.val_sets by name
    recall: dict[int, dict[str, float]] = field(default_factory=dict)  # train.eval_tasks per validation
    skipped_steps: int = 0
    last_step: int = 0
    checkpoint: Path | None = None
    stopped_by_signal: bool = False
    already_finished: bool = False  # resumed at train.steps: nothing left to do
    parameters_per_rank: list[int] = field(default_factory=list)  # in rank order (a shard, a stage)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step of this invocation


@torch.no_grad()
def evaluate(engine: Engine, batches) -> float:
    """Mean validation loss over the batches, averaged over data-parallel replicas."""
    engine.train(False)
    total, count = 0.0, 0
    for batch in batches:
        loss = engine.eval_loss(as_batch(batch).to(engine.mesh.device))
        total += 0.0 if loss is None else loss.double().item()
        count += 1
    engine.train(True)
    return engine.mesh.replica_mean(total / max(count, 1))


@torch.no_grad()
def recall_accuracy(engine: Engine, cfg: RunConfig) -> dict[str, float]:
    """train.eval_tasks on the model as it trains: {"mqar/x8": accuracy, ...}. Every rank holds the whole
    model (config validation; FSDP gathers it for the while) and computes the same, so no rank waits on
    another."""
    from pretrain.evaluate import evaluate as evaluate_tasks
    from pretrain.evaluate import scalars
    from pretrain.model_io import LoadedModel

    t = cfg.train
    model = LoadedModel(engine.models[0], cfg.model, cfg.to_dict())
    engine.train(False)
    with engine.whole_model():  # FSDP: gathered on every rank for the evaluation
        results = evaluate_tasks(model, t.eval_tasks, t.eval_task_distances, t.eval_task_samples,
                                 n_pairs=t.eval_task_pairs or cfg.data.synthetic_pairs,
                                 log=lambda message: None)
    engine.train(True)
    return {key.removeprefix("eval/"): value for key, value in scalars(results).items()}


def as_parts(batch: torch.Tensor | Batch | list[Batch]) -> list[tuple[Batch, float]]:
    """A loader's item as the batches of one micro-step, each with its share of the micro-step's loss:
    its weight total over all of theirs, so that their losses add up to the weighted mean over every
    target, as if they were one batch (`data.synthetic_sequences` yields two of different lengths)."""
    if not isinstance(batch, list):  # one batch: its share is all of it, no weight total to sum
        return [(as_batch(batch), 1.0)]
    totals = [float(loss_denominator(p.tokens[:, 1:], p.weights)) for p in batch]
    return [(p, w / sum(totals)) for p, w in zip(batch, totals, strict=True)]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


EXIT_INTERRUPTED = 75  # a signal stopped the run after saving: requeue it (sysexits' EX_TEMPFAIL)


class StopSignal:
    """SIGTERM, SIGUSR1 (Slurm's preemption warnings) and SIGINT (Ctrl-C) set a flag; the loop saves at
    the end of the step and exits with EXIT_INTERRUPTED. A second signal exits at once with 128 + its
    number, as a shell reports a killed process: the last saved checkpoint stands."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            print(f"\nsecond signal ({signal.Signals(signum).name}): exiting now without saving; the last "
                  "checkpoint stands", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: saving at the end of this step (signal again to "
              "exit at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


LAYOUT_FIELDS = ("tp", "pp", "sp", "zero_stage", "pp_schedule", "pp_stages_per_rank")  # fix the shards


def check_run_folder(cfg: RunConfig, out: Path) -> None:
    """A run folder with checkpoints keeps describing them: its model and layout may not change (training
    fields such as steps or lr may), and a new run may not start in it. Checked on every rank, before
    anything is written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir={out} is a file, not a folder")
    held = list_checkpoints(out)
    if held and not cfg.train.resume and not cfg.train.resume_from:
        # the new run's checkpoints would sit beside the old ones: pruned by step order (the new run's
        # first, when the old reached further), and a lost `latest` pointer would resume the old run
        raise ConfigError(f"train.resume=false starts a new run, and train.out_dir={out} holds checkpoints "
                          f"of an earlier one (newest: {held[-1].name}): choose a new train.out_dir, or "
                          f"remove {out / 'checkpoints'} to start over there")
    saved_file = out / "config.yaml"
    if not saved_file.is_file() or not held:
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    now = cfg.to_dict()
    fields = [("model", key) for key in now["model"]] + [("parallel", key) for key in LAYOUT_FIELDS]
    changed = [f"{section}.{key}={saved[section][key]!r} there, {now[section][key]!r} here"
               for section, key in fields
               if key in saved.get(section, {}) and saved[section][key] != now[section][key]]
    if changed:
        raise ConfigError(f"train.out_dir={out} holds checkpoints of another model or layout ("
                          + "; ".join(changed) + "): choose a new train.out_dir for this run, or the same "
                          "settings to resume that one")


# where the run is and what this invocation does (stop early, profile), not what the run computes
INVOCATION_FIELDS = ("out_dir", "resume", "resume_from", "stop_after_steps", "profile_start", "profile_steps")
SCHEDULE_FIELDS = ("steps", "warmup_steps", "lr", "min_lr_ratio", "lr_decay", "lr_decay_fraction")


def changed_on_resume(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The train / data settings that differ from those the checkpoint was written with, `section.key` →
    (old, new): allowed (a run may go on longer, at another lr or batch size), but said at the resume."""
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    return {f"{section}.{key}": (plain(saved[section][key]), plain(value))
            for section in ("train", "data") for key, value in now[section].items()
            if key not in INVOCATION_FIELDS and key in saved.get(section, {})
            and plain(saved[section][key]) != plain(value)}


def check_shared_out_dir(out: Path, mesh: Mesh, wait_s: float = 10.0) -> None:
    """Every rank writes its part of each checkpoint into train.out_dir, so it must be one folder for all
    of them. Rank 0 leaves a file under a name no rank has looked up before (no stale negative cache on a
    network filesystem) and every rank looks for it, for up to `wait_s`: a node whose out_dir is its own
    disk fails the run here, at start, not at its first checkpoint hours later."""
    if mesh.world_size == 1:
        return
    host = socket.gethostname()
    token, host0 = mesh.gather_objects((uuid.uuid4().hex, host))[0]
    probe = out / f".shared-check-{token}"
    if mesh.is_main:
        probe.write_text(host)
    mesh.barrier()
    deadline = time.monotonic() + wait_s
    while not probe.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    blind = mesh.gather_objects(None if probe.is_file() else f"rank {mesh.rank} on {host}")  # all looked
    if mesh.is_main:
        probe.unlink()
    blind = [who for who in blind if who]
    if blind:
        raise ConfigError(f"train.out_dir={out} is not one folder for every rank: {', '.join(blind)} cannot "
                          f"see the file rank 0 on {host0} wrote there. "
                          "Every rank writes its part of each checkpoint into it: put it on a filesystem "
                          "that every node mounts, at the same path")


def fsdp_dtypes(p: ParallelConfig, precision: str) -> str:
    """What FSDP gathers parameters and reduces gradients in, for the run's opening line."""
    policy = precision_policy(p.fsdp_param_dtype, p.fsdp_reduce_dtype, precision)
    names = {None: "fp32", torch.bfloat16: "bf16", torch.float32: "fp32"}
    return f" (gathered in {names[policy.param_dtype]}, gradients reduced in {names[policy.reduce_dtype]})"


def check_memory(cfg: RunConfig, mesh: Mesh, precision: str) -> None:
    """Pre-flight: the planner's estimate of this rank's memory against what the device has; a run that
    cannot fit fails before it allocates anything (on every rank, if any rank cannot)."""
    (rank,) = local_parameter_counts(cfg, only=(mesh.tp_rank, mesh.pp_rank))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    problem = preflight_problem(cfg, mesh.layout.dp, rank.parameters, rank.layers, rank.memory_layers,
                                mesh.device, local_processes, 2 if precision == "bf16" else 4,
                                rank.full_layers)
    problems = mesh.problems(problem)
    if problems:
        raise ConfigError(problems[0])


def choose_checkpoint(cfg: RunConfig, mesh: Mesh) -> Start:
    """Where this run starts (pretrain/resume.py): `train.resume_from` (a checkpoint, verified, an error if
    bad; or a run folder, its newest good checkpoint) the first time, else the newest good one in out_dir
    (newer corrupt ones reported and skipped), else nothing. Rank 0 reads the files; every rank gets its
    verdict, so no rank is left waiting on one that failed."""
    verdict: tuple[Start | None, str | None] = (None, None)
    if mesh.is_main:
        try:
            verdict = (choose_start(cfg.train), None)
        except CorruptCheckpointError as err:
            verdict = (None, str(err))
    start, error = mesh.gather_objects(verdict)[0]
    if error:
        raise CorruptCheckpointError(error)
    for problem in start.skipped:
        mesh.print(f"warning: skipped a bad checkpoint: {problem}")
    for note in start.notes:
        mesh.print(f"note: {note}")
    return start


GATHERED_NOTE_BYTES = 8 * 2**30  # FSDP checkpoints gathered past this size: the start says so


def gathered_checkpoint_note(p: ParallelConfig, dp: int, n_params: int) -> str | None:
    """Where FSDP checkpoints are gathered and large: how much rank 0's host holds, and the setting that
    writes slices instead."""
    gathered = CHECKPOINT_BYTES_PER_PARAMETER * n_params / (p.tp * p.pp)  # of a tp shard / stage
    if not (p.fsdp and dp > 1 and p.fsdp_checkpoint == "gathered" and gathered > GATHERED_NOTE_BYTES):
        return None
    return (f"note: each checkpoint gathers {gathered / 2**30:.0f} GiB of state into rank 0's host memory "
            "and writes it from there; parallel.fsdp_checkpoint=sharded has every rank write its own "
            "slices instead")


def initial_weights(path: str) -> dict[str, torch.Tensor]:
    """The dense weights of a checkpoint of any layout (or the newest good one of a run folder), or of a
    `pretrain.convert` export, for train.init_from."""
    from pretrain.convert import read_source

    return read_source(path).weights


def slow_setting_warnings(cfg: RunConfig, device_type: str) -> list[str]:
    """Settings that run but are known to be slow on this device (measured: bench/RESULTS.md), each with
    the fix: said at the start, not found out from the step time."""
    warnings = []
    if device_type == "cuda" and cfg.model.memory_kernel == "triton" and cfg.train.fp32_matmul == "ieee":
        warnings.append("model.memory_kernel=triton with train.fp32_matmul=ieee: the kernel's exact float32 "
                        "dots run on the GPU's FMA units, several times slower than memory_kernel=torch; "
                        "set train.fp32_matmul=tf32 (tensor cores) or memory_kernel=torch")
    return warnings


def check_toolchain(cfg: RunConfig, mesh: Mesh) -> None:
    """What the configured kernels need from this machine, asked before any work instead of failing at the
    first step with a traceback: the Triton memory kernel a CUDA device; inductor on CPU a C++ compiler
    (asked on every rank, all raise if any lacks one). The errors name the settings and the fix."""
    device = mesh.device.type
    if cfg.model.memory_kernel == "triton" and runnable_kernel("triton", device) != "triton":
        raise ConfigError(f"model.memory_kernel=triton needs a CUDA device, and this run is on {device}: set "
                          "model.memory_kernel=torch or compiled (the same function)")
    fixes = {setting: fix for setting, fix, used in (  # what needs inductor here: how to do without it
        ("model.memory_kernel=compiled", "model.memory_kernel=torch", cfg.model.memory_kernel == "compiled"),
        ("train.compile=true", "train.compile=false (or train.compile_backend=aot_eager)",
         cfg.train.compile and cfg.train.compile_backend == "inductor")) if used}
    if not fixes or device != "cpu":
        return
    problems = mesh.problems(inductor_cpu_problem())
    if problems:
        raise ConfigError(f"{' and '.join(fixes)} compile C++ with torch.compile's inductor on CPU, which "
                          f"cannot build here ({problems[0]}): install a C++ compiler (g++ or clang++, or "
                          f"point CXX at one), or set {' and '.join(fixes.values())} (the same function, run "
                          "eagerly)")


LOCK_WAIT_S = 30.0  # how long a run waits for the folder's lock (a requeued job's predecessor ending)


def train(cfg: RunConfig, mesh: Mesh | None = None) -> TrainResult:
    """Run (or resume) the configured training; returns the per-step losses and where it saved. The run
    folder's lock (pretrain/run_lock.py) is released however the run ends."""
    held: list[IO[str] | AsyncCheckpointWriter] = []
    try:
        return _train(cfg, mesh, held)
    finally:
        for handle in held:
            handle.close()


def _train(cfg: RunConfig, mesh: Mesh | None, held: list[IO[str] | AsyncCheckpointWriter]) -> TrainResult:
    p, t = cfg.parallel, cfg.train
    mesh = mesh or init_mesh(p.tp, p.pp, p.sp, p.comm_timeout_s)
    if t.threads:
        torch.set_num_threads(t.threads)
    use_cpu_allocator(t.cpu_allocator, mesh.device.type)
    torch.backends.cuda.matmul.fp32_precision = t.fp32_matmul  # CUDA only; CPU float32 stays IEEE
    torch.manual_seed(t.seed)
    out = Path(t.out_dir)
    run_config = cfg.to_dict()  # what the checkpoints, config.yaml and the loggers record
    for line in mesh.gather_objects(mesh.describe()):  # every rank's coordinates, once, in rank order
        mesh.print(line)
    check_run_folder(cfg, out)
    precision = ("bf16" if mesh.device.type == "cuda" else "fp32") if t.precision == "auto" else t.precision
    if precision == "bf16" and mesh.device.type == "cpu" and cfg.parallel.tp > 1:
        raise ConfigError(f"train.precision=bf16 with parallel.tp={cfg.parallel.tp} runs on GPUs only: "
                          "megatron-core's tensor-parallel layers restore autocast in their backward on CUDA "
                          "alone (on a CPU it would multiply bf16 by float32): set train.precision=fp32")
    for warning in slow_setting_warnings(cfg, mesh.device.type):
        mesh.print(f"warning: {warning}")
    check_toolchain(cfg, mesh)
    if not t.allow_oversubscribe:
        check_memory(cfg, mesh, precision)
    problem = None
    if mesh.is_main:  # only now: a run refused above leaves the folder as it was
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock, warning = hold_run_lock(out, LOCK_WAIT_S)
            if lock:
                held.append(lock)
            if warning:
                mesh.print(f"warning: {warning}")
        except RunFolderBusy as err:
            problem = str(err)
    problems = mesh.problems(problem)  # every rank stops, none waits for rank 0
    if problems:
        raise ConfigError(problems[0])
    check_shared_out_dir(out, mesh)
    start = choose_checkpoint(cfg, mesh)
    ckpt = start.checkpoint
    try:
        initial = initial_weights(t.init_from) if ckpt is None and t.init_from else None
    except (OSError, CorruptCheckpointError, ValueError, KeyError) as err:
        raise ConfigError(f"train.init_from={t.init_from}: {err}") from err
    if initial is not None:
        with torch.device("meta"):
            unused = sorted(set(initial) - set(TitansLM(cfg.model).state_dict()))
        if unused:  # e.g. another block kind: its tensors would be dropped without a word
            raise ConfigError(f"train.init_from={t.init_from}: {len(unused)} of its tensors have no place in "
                              f"this model ({', '.join(unused[:3])}{', …' if len(unused) > 3 else ''}): the "
                              "model configs differ")
    engine = build_engine(cfg, mesh, precision, initial)
    if initial is not None:
        mesh.print(f"initialised from the weights of {t.init_from}")
    n_params = num_parameters(cfg.model)
    local = {id(t): local_numel(t) for t in engine.parameters()}  # a tied matrix once
    result = TrainResult(parameters_per_rank=mesh.gather_objects(sum(local.values())))
    # the engine may wrap the optimizer; our scheduler keeps setting the lr of its groups
    scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda s: lr_at(s, t) / t.lr)
    train_loader, val_batches = build_loaders(cfg, mesh.dp_rank, mesh.layout.dp, mesh.barrier, mesh.is_main)
    val_sets = validation_sets(cfg, mesh.dp_rank, mesh.layout.dp, mesh.is_main)

    step = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        saved = state.get("config", {}).get("parallel", {})
        saved_stage = saved.get("zero_stage", state.get("config", {}).get("train", {}).get("zero_stage", 0))
        if saved_stage != p.zero_stage:
            raise RuntimeError(f"checkpoint {ckpt} was written with parallel.zero_stage={saved_stage}, this "
                               f"run has parallel.zero_stage={p.zero_stage}: resume with the same stage")
        written = len(state.get("data") or [])  # one data position per process
        if "shards" not in state and written and written != mesh.world_size:  # (shards check their layout)
            raise ConfigError(f"checkpoint {ckpt} was written by {written} data-parallel processes, this run "
                              f"has {mesh.world_size}: each resumes its own place in the data. Resume with "
                              f"{written} processes, or reshard it (its data order restarts): python -m "
                              f"pretrain.convert --checkpoint {ckpt} --to checkpoint --dp {mesh.layout.dp} "
                              "--out NEW_RUN_FOLDER")
        engine.load(ckpt, state)
        if state.get("scheduler") is not None:  # None: converted weights that start a new run
            scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler's state does not carry the lr into a wrapped optimizer's groups
        if state.get("data") is not None:
            train_loader.load_state_dict(state["data"][mesh.rank])
        if state.get("rng") is not None:
            set_rng_state(state["rng"][mesh.rank])
        step = state["step"]
        result.losses = list(state.get("losses", []))
        result.last_step, result.checkpoint = step, ckpt
        result.already_finished = step >= t.steps
        mesh.print(f"resumed from {ckpt} at step {step}")
        changes = changed_on_resume(state.get("config", {}), run_config)
        if changes:
            mesh.print("note: settings changed since that checkpoint: "
                       + "; ".join(f"{name} {old!r} → {new!r}" for name, (old, new) in changes.items()))
        if state.get("scheduler") and any(f"train.{name}" in changes for name in SCHEDULE_FIELDS):
            mesh.print(f"note: the learning rate follows the new schedule from here: {lr_at(step, t):.3e} "
                       f"at step {step}, where the checkpoint's run had {scheduler.get_last_lr()[0]:.3e}")
        del state  # the loaded checkpoint (memory-mapped) is not kept past the start

    if mesh.is_main:  # once the run starts: a start that fails leaves the folder as it was
        (out / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        if start.from_resume_from:
            for note in record_start(t, ckpt, step):
                mesh.print(f"note: {note}")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * t.grad_accum * mesh.layout.dp
    flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops(mesh.device) * mesh.world_size
    memories = engine.memories()
    purge = step + 1 if ckpt is not None else None  # what a crashed invocation logged past its checkpoint
    wandb_settings = {"project": t.wandb_project, "entity": t.wandb_entity, "name": t.wandb_name} \
        if t.wandb_project else None
    logger = MetricsLogger(out / "tensorboard", purge, wandb_settings, run_config) \
        if mesh.is_main else None
    if logger:
        logger.text("config", yaml.safe_dump(run_config, sort_keys=False))
    vocab = padded_vocab(cfg.model.vocab_size, p.tp)
    mesh.print(f"model: {n_params:,} parameters, layers {','.join(cfg.model.layer_kinds)}; "
               f"{tokens_per_step:,} tokens per step"
               + (" and the synthetic sequences'" if cfg.data.synthetic_sequences else "")
               + (f" (the first {cfg.data.synthetic_alone_steps:,} steps: the synthetic sequences alone)"
                  if cfg.data.synthetic_alone_steps else "")
               + f"; device {mesh.device}, layout {mesh.layout}"
               + (f", ZeRO stage {p.zero_stage}" if p.zero_stage else "")
               + ((f", HSDP: sharded over groups of {p.fsdp_shard} dp ranks" if p.fsdp_shard
                   else ", FSDP over the dp ranks") + fsdp_dtypes(p, precision)
                  if p.fsdp and mesh.layout.dp > 1 else "")
               + (f", {p.pp_schedule} schedule" if p.pp > 1 else "")
               + ((", sequences in zigzag pieces (2 a rank, load-balanced attention)"
                   if zigzag_split(cfg.model.layer_kinds, p.sp_split) else ", sequences in contiguous shards")
                  if p.sp > 1 else "")
               + (f"; vocabulary padded from {cfg.model.vocab_size} to {vocab} for tp={p.tp} (the padded "
                  "logits are masked)" if vocab != cfg.model.vocab_size else ""))
    note = gathered_checkpoint_note(p, mesh.layout.dp, n_params)
    if note:
        mesh.print(note)
    stop = StopSignal()
    bar = ProgressBar(t.steps, enabled=mesh.is_main, every=t.log_every)
    data_iter = iter(train_loader)
    first_step = step
    nonfinite_in_a_row = 0
    interval_tokens, interval_seconds = 0, 0.0
    profiler = StepProfiler(t.profile_start, t.profile_steps, out, mesh.rank, mesh.device) \
        if t.profile_start else None
    if profiler and step >= t.profile_start:
        mesh.print(f"warning: train.profile_start={t.profile_start} is past: this run resumes at step "
                   f"{step + 1}, so nothing is profiled (set a later step)")

    kept = {*t.checkpoint_at, *(range(t.keep_every, t.steps + 1, t.keep_every) if t.keep_every else ())}
    if stable_end(t):  # a WSD run is extended from its last stable step
        kept.add(stable_end(t))

    writer = AsyncCheckpointWriter(mesh, out, p.comm_timeout_s) if t.async_checkpoint else None
    if writer is not None:  # a run that fails still lets its checkpoint in flight finish, lock held
        held.insert(0, writer)

    def finish_writing() -> None:
        """Collective: the background checkpoint committed (or its failure raised on every rank)."""
        if writer is None:
            return
        try:
            result.checkpoint = writer.finish() or result.checkpoint
        except CheckpointWriteFailed as err:
            raise write_failure(out, err.step, err.problems) from err

    def save(wait: bool) -> None:
        finish_writing()  # the previous one first: one checkpoint in flight at a time
        staging = staging_dir(out, step)
        on_every_rank = functools.partial(write_on_every_rank, mesh, out, step)
        if writer is not None and mesh.is_main:  # before any rank marks this attempt's files (a collective
            writer.clear_marks(step)  # follows): an interrupted attempt's marks must not vouch for them
        on_every_rank(lambda: begin_checkpoint(out, step), here=mesh.is_main)
        if writer is None:
            model_state = on_every_rank(lambda: save_rank_part(engine, staging))  # every rank writes its part
        else:
            files, model_state = engine.checkpoint_parts(staging)  # the collective part, now
        state = {"scheduler": scheduler.state_dict(), "step": step, "losses": result.losses,
                 "data": mesh.gather_objects(train_loader.state_dict()),
                 "rng": mesh.gather_objects(rng_state()), "config": run_config, **model_state}
        layout = {"layout": model_state["shards"]} if "shards" in model_state else None

        # bound now: the background thread commits while `step` moves on
        commit = functools.partial(save_checkpoint, out, step, keep_last=t.keep_last, staged=True,
                                   manifest=layout, keep_steps=kept)
        if writer is None:
            result.checkpoint = on_every_rank(lambda: commit(state), here=mesh.is_main) or result.checkpoint
            return
        state = detached_copy(state) if mesh.is_main else None  # training goes on while it is written
        writer.start(step, files, functools.partial(commit, state) if mesh.is_main else None)
        if wait:
            finish_writing()

    while step < t.steps:
        if profiler and profiler.next_step(step + 1):
            report_profile(profiler, bar, mesh)
        started = time.perf_counter()
        log_now = (step + 1) % t.log_every == 0 or step == 0 or step + 1 == t.steps  # the last too
        for _, m in memories:
            m.record_stats = log_now or t.compile  # compiled: one graph that has the stats, not a second
        loss_sum, held, step_tokens = 0.0, False, 0
        for micro in range(t.grad_accum):
            parts = as_parts(next(data_iter))
            for i, (batch, share) in enumerate(parts):  # the last part of the last micro-step syncs
                step_tokens += batch.tokens[:, 1:].numel() * mesh.layout.dp
                last = micro == t.grad_accum - 1 and i == len(parts) - 1
                loss = engine.forward_backward(batch.to(mesh.device, non_blocking=True),
                                               share / t.grad_accum, last)
                if loss is not None:
                    loss_sum, held = loss_sum + share * loss.item(), True
        loss_value = mesh.replica_mean(loss_sum / t.grad_accum if held else 0.0)
        grad_norm = engine.step(t.grad_clip, apply=math.isfinite(loss_value))
        if not math.isfinite(grad_norm):  # a finite loss can still backpropagate inf/nan
            loss_value = float("nan")
        if not math.isfinite(loss_value):
            nonfinite_in_a_row += 1
            result.skipped_steps += 1
            result.losses.append(float("nan"))
            mesh.print(f"step {step + 1}: non-finite loss or gradient (grad norm {grad_norm}), step skipped "
                       f"({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= t.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"stopping at step {step + 1}: {nonfinite_in_a_row} non-finite losses or gradients in a "
                    "row "
                    f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); last good checkpoint: "
                    f"{latest_checkpoint(out)}")
        else:
            nonfinite_in_a_row = 0
            result.losses.append(loss_value)
        lr = scheduler.get_last_lr()[0]  # the one this step used: logged against it
        scheduler.step()
        step += 1
        result.last_step = step
        elapsed = time.perf_counter() - started
        result.step_seconds.append(elapsed)
        # throughput over the steps since the last log line: one slow step (a page-in, a neighbour's
        # burst) does not make the line, and the steps between lines are all counted
        interval_tokens, interval_seconds = interval_tokens + step_tokens, interval_seconds + elapsed
        figures = step_figures(interval_tokens, interval_seconds, flops_per_token, peak, mesh.device)
        if log_now:
            interval_tokens, interval_seconds = 0, 0.0
        bar.update(step, loss=loss_value, throughput=f"{figures['perf/tokens_per_s']:,.0f} tok/s",
                   details=f"lr {lr:.2e} | grad norm {grad_norm:.3f} | {describe_figures(figures)}")
        if logger and log_now and math.isfinite(loss_value):
            logger.scalars(step, {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                                  **figures})
            for layer, m in memories:
                logger.scalars(step, {f"memory/layer{layer}/{k}": v.item() for k, v in m.stats.items()})
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            val = evaluate(engine, val_batches())
            result.val_losses[step] = val
            if logger:
                logger.scalars(step, {"val/loss": val, "val/perplexity": math.exp(min(val, 50.0))})
            bar.write(f"step {step}: train loss {loss_value:.4f}, val loss {val:.4f}, "
                      f"val ppl {math.exp(min(val, 50.0)):.2f}")
            for name, batches in val_sets.items():
                result.val_set_losses.setdefault(step, {})[name] = val = evaluate(engine, batches())
                if logger:
                    logger.scalars(step, {f"val/{name}/loss": val,
                                          f"val/{name}/perplexity": math.exp(min(val, 50.0))})
                bar.write(f"step {step}: val loss on {name} {val:.4f}, ppl {math.exp(min(val, 50.0)):.2f}")
            if t.eval_tasks:
                result.recall[step] = recall = recall_accuracy(engine, cfg)
                if logger:
                    logger.scalars(step, {f"val/{k}": v for k, v in recall.items()})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()))
        signalled = mesh.any_flag(stop.received is not None)
        pause = t.stop_after_steps > 0 and step - first_step >= t.stop_after_steps
        if step % t.checkpoint_every == 0 or step in kept or step == t.steps or signalled or pause:
            save(wait=step == t.steps or signalled or pause)  # the run stops after these: committed now
        if signalled:
            result.stopped_by_signal = True
            break
        if pause:
            bar.write(f"train.stop_after_steps={t.stop_after_steps} reached: saved step {step} to "
                      f"{result.checkpoint}; run again to continue")
            break
    bar.close()
    if profiler and profiler.stop():  # the window reached the last step, or the run stopped inside it
        report_profile(profiler, bar, mesh)
    stop.restore()
    for _, m in memories:
        m.record_stats = False
    if logger:
        logger.close()
    return result


def write_on_every_rank(mesh: Mesh, out: Path, step: int, part: Callable[[], Any], here: bool = True) -> Any:
    """This rank's part of writing the checkpoint of `step` (`part`, where `here`), then a collective: a
    write that failed on any rank (a full disk, a quota) stops every rank with it, instead of the others
    waiting for it."""
    value, problem = None, None
    try:
        value = part() if here else None
    except OSError as err:
        problem = f"rank {mesh.rank}: {err}"
    problems = mesh.problems(problem)
    if problems:
        raise write_failure(out, step, problems)
    return value


def write_failure(out: Path, step: int, problems: list[str]) -> CheckpointWriteError:
    """The error every rank raises when some rank could not write its part of the checkpoint of `step`,
    written in the step or in the background."""
    return CheckpointWriteError(
        f"writing the checkpoint of step {step} failed ({'; '.join(problems)}); the last good checkpoint "
        f"is {latest_checkpoint(out) or 'none yet'}: free space or fix the folder's permissions, then "
        "run the same command to resume from it")


def save_rank_part(engine: Engine, staging: Path) -> dict[str, Any]:
    """This rank's part of a checkpoint, written into the staging folder and flushed to disk."""
    model_state = engine.save(staging)
    fsync_tree(staging)
    return model_state


def report_profile(profiler: StepProfiler, bar: ProgressBar, mesh: Mesh) -> None:
    """The main rank names where the traces went and prints the top of its table."""
    if mesh.is_main and profiler.table is not None:
        top = "\n".join(profiler.table.splitlines()[:PROFILE_LINES_SHOWN])
        bar.write(f"profile of steps {profiler.start}-{profiler.last} written to {profiler.dir} (a Chrome "
                  f"trace and a table per rank); rank {mesh.rank}'s top ops:\n{top}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description="Train a Titans language model. Configuration comes from a YAML file with sections "
                    "model (titans.model.TitansConfig), data, train and parallel (pretrain.config); any "
                    "field can be overridden as section.key=value, e.g. train.steps=100 model.layers=mag "
                    "parallel.tp=2. Launch several processes with torchrun or srun; the layout "
                    "(parallel.tp, parallel.pp, parallel.sp, parallel.zero_stage; dp is what remains) is "
                    "checked first. `--fields` lists every field.",
    )
    parser.add_argument("--config", help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: section.key=value")
    parser.add_argument("--fields", action="store_true",
                        help="list every config field with its default and what it does, then exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the file, then the overrides) as YAML, checked, "
                             "then exit without training")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    if args.fields:
        print(describe_fields())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        mesh = init_mesh(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.sp, cfg.parallel.comm_timeout_s)
    except LayoutError as err:
        print(f"layout error: {err}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, mesh)
    except (NonFiniteLossError, CheckpointWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ConfigError as err:  # found once the run folder or the data were looked at
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (DataError, CorruptCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.train.out_dir).resolve()
    if result.stopped_by_signal:
        mesh.print(f"\ninterrupted at step {result.last_step} of {cfg.train.steps}: saved "
                   f"{result.checkpoint}; run the same command to continue (exit code {EXIT_INTERRUPTED})")
        mesh.close()
        return EXIT_INTERRUPTED
    if result.already_finished:
        hint = extend_hint(cfg)
        mesh.print(f"\nthis run already finished: {result.last_step} steps, checkpoint {result.checkpoint}. "
                   + (f"To train on past its cooldown: {hint}" if hint else
                      "Raise train.steps to train on, or choose a new train.out_dir for a new run."))
        mesh.close()
        return 0
    if mesh.is_main:
        first, last = result.losses[0], result.losses[-1]
        print(f"\ndone: {result.last_step} steps, loss {first:.3f} → {last:.3f}"
              + (f", {result.skipped_steps} skipped" if result.skipped_steps else ""))
        print(f"checkpoint:  {Path(result.checkpoint).resolve()}")
        print(f"config:      {out / 'config.yaml'}")
        print(f"tensorboard: tensorboard --logdir {out / 'tensorboard'}   (then open http://localhost:6006)")
        hint = extend_hint(cfg)
        if hint and result.last_step == cfg.train.steps:  # (not a stop_after_steps pause)
            print(f"extend:      {hint}")
    mesh.close()
    return 0


def extend_hint(cfg: RunConfig) -> str | None:
    """How to train a finished warmup-stable-decay run for longer: fork it from its last stable step (kept
    for this), where a longer run of the same schedule would be too."""
    t = cfg.train
    if not stable_end(t):
        return None
    return (f"the same command with train.resume_from={checkpoint_path(t.out_dir, stable_end(t)).resolve()} "
            "train.steps=MORE train.out_dir=NEW (its last step before the cooldown)")


def exit_now(code: int) -> NoReturn:
    """End a multi-process run without interpreter shutdown, once main() has closed the mesh.

    DDP (torch 2.13) keeps its process group, and gloo's threads, alive past destroy_process_group. One of
    them acting while the interpreter shuts down can abort a rank after a finished run ("terminate called
    without an active exception", exit 134), and Slurm then marks a job FAILED whose last checkpoint was
    written. Every file is closed and synced by now, so the process can end at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    status = main()
    if launch_environment()[1] > 1:
        exit_now(status)
    sys.exit(status)
