"""Scaling studies: `python -m pretrain.scaling --family configs/scaling/tiny-family.yaml --out DIR`.

A family file lists model sizes (model overrides) and token budgets; the sweep trains every size on every
budget (its own schedule each, as Chinchilla's approach 3 wants), as a Slurm array job (slurm.submit) or
local processes (`--local`), then reads each run's final validation loss from its TensorBoard events,
fits L(N, D) = E + A/N^α + B/D^β (pretrain/scaling_fit.py) and writes the table, the fit and a plot
(pretrain/scaling_report.py). N is the non-embedding parameter count, D the training tokens. Finished
runs are kept: running the command again continues an interrupted sweep.

With a warmup-stable-decay schedule (train.lr_decay_fraction < 1, pretrain/schedule.py) a run is the same
run as a longer one up to the start of its decay. So each size trains its largest budget once, and every
smaller budget is a cooldown branched from that run's checkpoint where its decay starts (Hägele et al.
2024): the same runs, bitwise on CPU, for a fraction of the tokens (`--independent` trains each alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.checkpoint import STATE_FILE, checkpoint_path, checkpoint_step, list_checkpoints
from pretrain.config import ConfigError, load_config, read_yaml
from titans.model import TitansConfig, TitansLM, count_parameters

FAMILY_KEYS = ("base", "overrides", "sizes", "tokens")


@dataclass
class Family:
    base: str | None  # the run config every run starts from (relative to the family file)
    overrides: list[str] = field(default_factory=list)  # for every run
    sizes: dict[str, list[str]] = field(default_factory=dict)  # name → model overrides
    tokens: list[int] = field(default_factory=list)  # training-token budgets D


@dataclass
class Run:
    name: str
    size: str
    n_params: int  # non-embedding parameters N
    tokens: int  # D = steps × tokens per step (the budget rounded to whole steps)
    steps: int
    out_dir: str
    overrides: list[str]
    branch_of: str = ""  # a WSD cooldown: the run whose checkpoint `start_from` it continues
    start_from: str = ""

    @property
    def trained_tokens(self) -> float:
        """The tokens this run trains itself: a cooldown only those after its branch point."""
        first = checkpoint_step(Path(self.start_from)) if self.start_from else 0
        return self.tokens * (1 - first / self.steps)


def load_family(path: str) -> Family:
    """A family file, checked: unknown keys, empty lists and wrong types name the field and the file."""
    file = Path(path)
    try:
        raw = read_yaml(file) or {}
    except OSError as err:
        raise ConfigError(f"--family {path}: {err.strerror}") from None
    if not isinstance(raw, dict) or set(raw) - set(FAMILY_KEYS):
        raise ConfigError(f"{path}: unknown key(s) {sorted(set(raw) - set(FAMILY_KEYS))}; valid keys: "
                          f"{', '.join(FAMILY_KEYS)}")
    sizes, tokens = raw.get("sizes") or {}, raw.get("tokens") or []
    if not isinstance(sizes, dict) or not sizes or not all(isinstance(v, list) for v in sizes.values()):
        raise ConfigError(f"{path}: sizes must map each size name to a list of model overrides")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) and t > 0 for t in tokens):
        raise ConfigError(f"{path}: tokens must be a list of positive integers (training-token budgets)")
    base = raw.get("base")
    base = str((file.parent / base).resolve()) if base else None
    return Family(base, [str(o) for o in raw.get("overrides") or []],
                  {str(k): [str(o) for o in v] for k, v in sizes.items()}, tokens)


def non_embedding_parameters(model: TitansConfig) -> int:
    """N as in the scaling-law literature: every trainable parameter but the (tied) token embedding."""
    import torch

    with torch.device("meta"):
        return count_parameters(TitansLM(model), include_embedding=False)


def _keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].strip() for o in overrides}


def check_extra(family: Family, extra: list[str]) -> None:
    """Command-line overrides apply to every run, so they may not set what the sizes vary (the sizes'
    values would replace them silently), nor ask for more than the one process each run gets."""
    for size, model in family.sizes.items():
        clash = sorted(_keys(extra) & _keys(model))
        if clash:
            raise ConfigError(f"{', '.join(clash)} on the command line: size {size} sets it (every size sets "
                              f"its own model); edit the sizes in the family file instead")
    count = len(family.sizes) * len(family.tokens)
    if count < 3:
        raise ConfigError(f"{len(family.sizes)} size(s) x {len(family.tokens)} budget(s) make {count} runs; "
                          f"the fit of L(N, D) needs at least 3")


def build_sweep(family: Family, out: Path, extra: list[str], check_data: bool = True,
                independent: bool = False) -> list[Run]:
    """Every size × budget, each with its own steps, warmup ≤ 10 % of them, one validation at the end;
    with `check_data`, each run's dataset must be there (before hours of training the others). Under a
    WSD schedule, unless `independent`, a size's smaller budgets are cooldowns of its largest (above)."""
    check_extra(family, extra)
    runs: list[Run] = []
    for size, model in family.sizes.items():
        common = family.overrides + extra + model
        try:
            cfg = load_config(family.base, common)
        except ConfigError as err:
            raise ConfigError(f"size {size}: {err}") from None
        layout = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.sp
        if layout > 1:
            raise ConfigError(f"size {size}: parallel.tp x pp x sp = {layout}, but every run of a sweep "
                              f"is one process (one device); remove the parallel.* overrides")
        per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum
        all_steps = []
        for budget in sorted(family.tokens):
            steps = round(budget / per_step)
            if steps < 1:
                raise ConfigError(f"tokens: budget {budget:,} is under one step ({per_step:,} tokens: "
                                  f"data.batch_size x data.seq_len x train.grad_accum)")
            if steps in all_steps:
                raise ConfigError(f"tokens: two budgets round to the same {steps} steps of {per_step:,} "
                                  f"tokens (run {size}-D{steps * per_step}); make the budgets differ by at "
                                  "least one step")
            all_steps.append(steps)
        wsd = cfg.train.lr_decay_fraction < 1
        runs += size_runs(family, size, common, cfg.train.warmup_steps, all_steps, per_step, out, check_data,
                          wsd, branch=wsd and not independent)
    return runs


def size_runs(family: Family, size: str, common: list[str], warmup: int, all_steps: list[int], per_step: int,
              out: Path, check_data: bool, wsd: bool, branch: bool) -> list[Run]:
    """One size's runs, shortest first. Under WSD they share one warmup (so that they are one run up to
    each one's decay); branched, each shorter run starts from the longest one's checkpoint at the step
    where its own decay starts, if that is past step 0."""
    from pretrain.data import dataset_problem
    from pretrain.schedule import stable_end

    longest = f"{size}-D{all_steps[-1] * per_step}"
    runs, points = [], []
    for steps in all_steps:
        name = f"{size}-D{steps * per_step}"
        overrides = common + [f"train.steps={steps}", f"train.out_dir={out / name}",
                              f"train.warmup_steps={min(warmup, (all_steps[0] if wsd else steps) // 10)}",
                              f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
        cfg = load_config(family.base, overrides)
        problem = dataset_problem(cfg) if check_data else None
        if problem:
            raise ConfigError(f"size {size}: {problem}")
        run = Run(name, size, non_embedding_parameters(cfg.model), steps * per_step, steps, str(out / name),
                  overrides)
        start = stable_end(cfg.train) if branch and name != longest else 0
        if start > 0:
            run.branch_of, run.start_from = longest, str(checkpoint_path(out / longest, start))
            run.overrides.append(f"train.resume_from={run.start_from}")
            points.append(start)
        runs.append(run)
    if points:
        runs[-1].overrides.append("train.checkpoint_at=" + ",".join(map(str, points)))
    return runs


def final_val_loss(run: Run, tag: str = "val/loss") -> float | None:
    """The validation loss (`tag`) logged at the run's last step (TensorBoard events), or None if not there
    yet."""
    folder = Path(run.out_dir) / "tensorboard"
    if not folder.is_dir():
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return None
    last = {e.step: e.value for e in events.Scalars(tag)}
    return last.get(run.steps)


def _done_line(run: Run, loss: float, seconds: float | None = None) -> str:
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    return f"{run.name}: N={run.n_params:,} D={run.tokens:,} val loss {loss:.4f}{took}"


def local_slots(jobs: int) -> list[dict[str, str]]:
    """The environment of each of `jobs` concurrent runs: a GPU each when there are that many (named as
    CUDA_VISIBLE_DEVICES names them), else an equal share of the CPU cores as OpenMP threads."""
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if jobs > len(devices):
            raise ConfigError(f"--jobs {jobs}: one GPU per run, and {len(devices)} are visible")
        return [{"CUDA_VISIBLE_DEVICES": devices[i]} for i in range(jobs)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return [{"OMP_NUM_THREADS": str(threads)} if jobs > 1 else {} for _ in range(jobs)]


def ready(run: Run) -> bool:
    """A run may start: it is no cooldown, its branch point is written, or it has started before."""
    return not run.start_from or (Path(run.start_from) / STATE_FILE).is_file() or bool(
        list_checkpoints(run.out_dir))


def run_local(runs: list[Run], base: str | None, slots: list[dict[str, str]]) -> None:
    """The runs in this machine's processes, one per slot at a time (local_slots), in order as they are
    ready (a cooldown once its branch point is written); each run's output in <out_dir>/train.log. After a
    failure no new run starts; the running ones finish (their results are kept, as every finished run's),
    then the failure is raised with its log's end."""
    from tqdm import tqdm

    bar = tqdm(total=len(runs), desc="sweep", unit="run", disable=not sys.stderr.isatty())
    free = list(slots)
    pending = list(enumerate(runs, 1))
    running: dict[subprocess.Popen, tuple[Run, dict[str, str], float, Any]] = {}
    failed: list[str] = []
    while running or (pending and not failed):
        while free and not failed:
            item = next((item for item in pending if ready(item[1])), None)
            if item is None:
                break
            pending.remove(item)
            number, run = item
            slot = free.pop(0)
            bar.set_postfix_str(run.name)
            log = Path(run.out_dir) / "train.log"
            if bar.disable:  # a log, not a terminal: a line per run instead of the bar
                print(f"run {number}/{len(runs)}: {run.name} (log {log})", flush=True)
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log, "w")  # noqa: SIM115 - closed when the run ends
            proc = subprocess.Popen([sys.executable, "-m", "pretrain.train"]
                                    + (["--config", base] if base else []) + run.overrides,
                                    stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **slot})
            running[proc] = (run, slot, time.monotonic(), handle)
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            run, slot, started, handle = running.pop(proc)
            handle.close()
            free.append(slot)
            loss = final_val_loss(run)
            if proc.returncode != 0 or loss is None:
                log = Path(run.out_dir) / "train.log"
                tail = log.read_text(errors="replace")[-2000:]
                failed.append(f"run {run.name} failed (exit {proc.returncode}); its log {log} ends:\n{tail}")
                continue
            bar.write(_done_line(run, loss, time.monotonic() - started))
            bar.update()
        if pending and not running and not failed and not any(ready(run) for _, run in pending):
            # the runs left wait for checkpoints that never came
            failed += [f"run {run.name} branches from {run.start_from}, which run {run.branch_of} did not "
                       "write" for _, run in pending]
    bar.close()
    if failed:
        raise RuntimeError("\n".join(failed))


def run_slurm(runs: list[Run], base: str | None, out: Path, args: argparse.Namespace) -> None:
    """One Slurm array job, a task per run; follows it until every task has ended."""
    from tqdm import tqdm

    from slurm.submit import JobSpec, SubmitError, submit

    spec = JobSpec(config=base, sweep=[r.overrides for r in runs], tasks_per_node=1,
                   gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
                   partition=args.partition, account=args.account, job_name=f"scaling-{out.name}",
                   log_dir=str(out / "slurm"), max_parallel=args.max_parallel)
    try:
        job = submit(spec)
    except SubmitError as err:
        raise RuntimeError(str(err)) from None
    print(f"submitted array job {job.job_id} ({len(runs)} runs); logs: {job.folder}", flush=True)
    bar = tqdm(total=len(runs), desc="sweep", unit="run", disable=not sys.stderr.isatty())
    reported: set[str] = set()
    while True:
        squeue = subprocess.run(["squeue", "-h", "-r", "-j", job.job_id, "-o", "%i"], capture_output=True,
                                text=True)
        if squeue.returncode != 0 and "Invalid job id" not in squeue.stderr:
            raise RuntimeError(f"squeue failed while following job {job.job_id}: {squeue.stderr.strip()}")
        queued = squeue.stdout.split()
        for run in runs:
            loss = final_val_loss(run) if run.name not in reported else None
            if loss is not None:
                reported.add(run.name)
                bar.write(_done_line(run, loss))
                bar.update()
        if not queued:
            break
        bar.set_postfix_str(f"{len(queued)} task(s) queued or running")
        time.sleep(5)
    bar.close()
    missing = [(i, r.name) for i, r in enumerate(runs) if final_val_loss(r) is None]
    if missing:
        raise RuntimeError("runs without a final validation loss: " + ", ".join(
            f"{name} (log {job.log(i)})" for i, name in missing))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.scaling",
        description="Train a family of model sizes on several token budgets, fit L(N, D) = E + A/N^alpha + "
                    "B/D^beta to the final validation losses, and write results.md / results.csv (table), "
                    "fit.json (parameters with bootstrap intervals) and scaling.png (loss against compute "
                    "C = 6ND, the fitted curve of each N and the compute-optimal frontier) into --out.")
    p.add_argument("--family", required=True, help="family YAML: base, overrides, sizes, tokens")
    p.add_argument("--out", required=True, help="sweep folder: one run folder per size x budget, the results")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run, e.g. data.train=DIR")
    p.add_argument("--local", action="store_true", help="run here, --jobs at a time (default: Slurm)")
    p.add_argument("--jobs", type=int, default=1,
                   help="with --local: runs at once, each on its own GPU, or without GPUs on an equal share "
                        "of the CPU cores (default 1)")
    p.add_argument("--independent", action="store_true",
                   help="with a warmup-stable-decay schedule (train.lr_decay_fraction < 1): train every "
                        "budget from scratch instead of as cooldowns branched from each size's largest run")
    p.add_argument("--report-only", action="store_true", help="train nothing: fit and report finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the sweep (N, D, steps per run) and stop")
    p.add_argument("--loss", default="val/loss",
                   help="the final loss the fit uses: val/loss, or a data.val_sets dataset's val/<name>/loss "
                        "(e.g. long documents, where the memory has something to carry)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    g = p.add_argument_group("Slurm (without --local)")
    g.add_argument("--cpus-per-task", type=int, default=1, help="CPU cores per run (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per run (default 0)")
    g.add_argument("--time", default="04:00:00", help="time limit per run (default 04:00:00)")
    g.add_argument("--partition", help="partition (default: the cluster's default)")
    g.add_argument("--account", help="account to charge")
    g.add_argument("--max-parallel", type=int, default=0, help="runs at once (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    from pretrain.scaling_report import report

    args = parser().parse_args(argv)
    out = Path(args.out).resolve()
    try:
        if args.jobs < 1 or (args.jobs > 1 and not args.local):
            raise ConfigError(f"--jobs {args.jobs}: a number >= 1 of runs at once with --local (on Slurm: "
                              "--max-parallel)")
        family = load_family(args.family)
        runs = build_sweep(family, out, list(args.overrides), check_data=not args.report_only,
                           independent=args.independent)
        slots = local_slots(args.jobs) if args.local else []
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    for run in runs:
        branch = f"  (cooldown from {run.branch_of} at step {checkpoint_step(Path(run.start_from))})" \
            if run.branch_of else ""
        print(f"{run.name:>16}: N={run.n_params:>10,}  D={run.tokens:>12,}  steps {run.steps}{branch}")
    if any(r.branch_of for r in runs):
        trained = sum(r.trained_tokens for r in runs)
        print(f"warmup-stable-decay: each size's smaller budgets are cooldowns of its largest run, "
              f"{trained:,.0f} tokens trained in all instead of {sum(r.tokens for r in runs):,} "
              "(--independent: every run from scratch)")
    if args.dry_run:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"family": args.family, "runs": [asdict(r) for r in runs]},
                                               indent=1))
    todo = [r for r in runs if final_val_loss(r) is None]
    if todo and not args.report_only:
        print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; training {len(todo)}",
              flush=True)
        try:
            if args.local:
                run_local(todo, family.base, slots)
            else:  # cooldowns in a second array job, once the runs they branch from are done
                for phase in ([r for r in todo if ready(r)], [r for r in todo if not ready(r)]):
                    if phase:
                        run_slurm(phase, family.base, out, args)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    losses = {r.name: final_val_loss(r, args.loss) for r in runs}
    finished = [r for r in runs if losses[r.name] is not None]
    lacking = [r.name for r in runs if losses[r.name] is None and final_val_loss(r) is not None]
    if lacking:
        print(f"error: --loss {args.loss}: finished runs without it ({', '.join(lacking)}); a dataset of "
              "data.val_sets logs val/<its folder name>/loss", file=sys.stderr)
        return 1
    if len(finished) < 3:
        print(f"error: {len(finished)} finished runs in {out}; a fit needs at least 3", file=sys.stderr)
        return 1
    try:
        lines = report(finished, [losses[r.name] for r in finished], out, args.bootstrap)
    except ValueError as err:  # the fit diverged: say so instead of a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
