"""Submit the training job to Slurm: `python -m slurm.submit --config configs/tiny.yaml [section.key=value]`.

Builds one `sbatch` call of `slurm/train.sbatch` (one task per GPU, or per CPU process without GPUs), in a
log folder of its own, after checking the config and the layout here, so a bad field fails in one line
before anything is queued. `--sweep FILE` submits an array job: task i trains with line i of the file
appended to the overrides. Preemption: Slurm warns the job with USR1 `--signal-seconds` before its time
limit; the job saves, exits 75 and requeues itself (slurm/train.sbatch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "train.sbatch"


class SubmitError(RuntimeError):
    """Something to fix before submitting; the message names the option or file."""


@dataclass
class JobSpec:
    """One submission: what to train (config, overrides, sweep lines) and what to ask Slurm for."""

    config: str | None
    overrides: list[str] = field(default_factory=list)
    sweep: list[list[str]] = field(default_factory=list)  # array job: one override list per task
    sweep_lines: list[int] = field(default_factory=list)  # each task's line in the sweep file (for errors)
    check_data: bool = True  # data.train, data.mix and data.val must be there before the job is queued
    nodes: int = 1
    tasks_per_node: int = 0  # 0: gpus_per_node, or 1 without GPUs
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None
    log_dir: str = "logs/slurm"
    signal_seconds: int = 300  # USR1 this long before the time limit
    requeue: bool = True
    max_parallel: int = 0  # array tasks running at once (0: no limit)
    sbatch_args: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world(self) -> int:
        return self.nodes * self.tasks

    @property
    def name(self) -> str:
        return self.job_name or (Path(self.config).stem if self.config else "titans")


def check(spec: JobSpec) -> None:
    """The run config and layout of every task, as the job would load them; raises SubmitError."""
    from parallel.mesh import Layout, LayoutError
    from pretrain.config import ConfigError, load_config
    from pretrain.data import dataset_problem

    for name in ("nodes", "cpus_per_task", "signal_seconds"):
        if getattr(spec, name) < 1:
            raise SubmitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    if spec.tasks_per_node < 0 or spec.gpus_per_node < 0 or spec.max_parallel < 0:
        raise SubmitError("--tasks-per-node, --gpus-per-node and --max-parallel must be >= 0")
    limit = time_limit_seconds(spec.time)
    if limit is not None and spec.signal_seconds >= limit:
        raise SubmitError(f"--signal-seconds {spec.signal_seconds} is not below --time {spec.time} "
                          f"({limit} s): the run would be told to save and stop as it starts")
    if spec.config and not Path(spec.config).is_file():
        raise SubmitError(f"--config {spec.config}: no such file")
    out_dirs: dict[Path, str] = {}  # each array task needs its own run folder
    for i, extra in enumerate(spec.sweep or [[]]):
        where = ""
        if spec.sweep:
            line = spec.sweep_lines[i] if spec.sweep_lines else i + 1
            where = f" (sweep line {line}, array task {i})"
        try:
            cfg = load_config(spec.config, spec.overrides + extra)
            p = cfg.parallel
            Layout.of(spec.world, p.tp, p.pp, p.sp)
        except ConfigError as err:
            raise SubmitError(f"config error{where}: {err}") from None
        except LayoutError as err:
            raise SubmitError(f"layout error{where}: {err} (this job has {spec.nodes} node(s) x "
                              f"{spec.tasks} task(s) = {spec.world} processes)") from None
        out_dir = Path(cfg.train.out_dir).resolve()
        if spec.sweep and out_dir in out_dirs:  # they would write one folder's checkpoints at once
            raise SubmitError(f"train.out_dir={cfg.train.out_dir} is the run folder of {out_dirs[out_dir]} "
                              f"and {where.strip(' ()')}: each array task needs its own; set train.out_dir "
                              "on every sweep line")
        out_dirs[out_dir] = where.strip(" ()")
        problem = dataset_problem(cfg) if spec.check_data else None
        if problem:
            raise SubmitError(f"data error{where}: {problem}; the job reads relative paths from the folder "
                              "you submit from (--no-data-check if only the compute nodes see the data)")


TIME_FORMAT = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_seconds(text: str) -> int | None:
    """Seconds of a Slurm --time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None for
    UNLIMITED / INFINITE. sbatch would refuse a bad one only after the job's files were written."""
    if text.strip().lower() in ("unlimited", "infinite"):
        return None
    match = TIME_FORMAT.match(text.strip())
    if not match:
        raise SubmitError(f"--time {text!r}: expected Slurm's time format, e.g. 90 (minutes), 04:00:00 or "
                          "2-00:00:00 (days-hours:minutes:seconds)")
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = first * 3600 + second * 60 + third
    elif second is not None:  # MM:SS
        seconds = first * 60 + second
    else:  # minutes
        seconds = first * 60
    if seconds <= 0:
        raise SubmitError(f"--time {text!r}: the limit must be positive")
    return seconds


def sbatch_command(spec: JobSpec, folder: Path, wait: bool = False) -> list[str]:
    """The sbatch call for a job whose logs go to `folder` (which must exist before Slurm opens them)."""
    out = folder / ("slurm-%A_%a.out" if spec.sweep else "slurm-%j.out")
    cmd = ["sbatch", "--parsable", f"--job-name={spec.name}", f"--nodes={spec.nodes}",
           f"--ntasks-per-node={spec.tasks}", f"--cpus-per-task={spec.cpus_per_task}", f"--time={spec.time}",
           f"--output={out}", f"--error={out}", "--open-mode=append"]
    if spec.gpus_per_node:
        cmd.append(f"--gpus-per-node={spec.gpus_per_node}")
    for option in ("mem", "partition", "account", "qos"):
        if getattr(spec, option):
            cmd.append(f"--{option}={getattr(spec, option)}")
    cmd.append(f"--signal=B:USR1@{spec.signal_seconds}")
    cmd.append("--requeue" if spec.requeue else "--no-requeue")
    if spec.sweep:
        limit = f"%{spec.max_parallel}" if spec.max_parallel else ""
        cmd.append(f"--array=0-{len(spec.sweep) - 1}{limit}")
    if wait:
        cmd.append("--wait")
    cmd += spec.sbatch_args
    cmd.append(str(SCRIPT))
    if spec.config:
        cmd += ["--config", spec.config]
    return cmd + spec.overrides


def job_environment(spec: JobSpec, folder: Path) -> dict[str, str]:
    """What the batch script reads (sbatch passes the submitting environment on)."""
    env = {**os.environ, "TITANS_LOG_DIR": str(folder), "TITANS_PYTHON": sys.executable,
           "TITANS_REPO": str(ROOT)}
    env.pop("TITANS_SWEEP", None)
    if spec.sweep:
        env["TITANS_SWEEP"] = str(folder / "sweep.txt")
    if not spec.requeue:
        env["TITANS_NO_REQUEUE"] = "1"
    return env


def new_log_folder(spec: JobSpec) -> Path:
    """<log_dir>/<name>-<time>[-n]: one per submission, absolute (the job may start elsewhere)."""
    base = Path(spec.log_dir).resolve() / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    while folder.exists():
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    folder.mkdir(parents=True)
    return folder


@dataclass
class Submission:
    job_id: str
    folder: Path
    returncode: int = 0  # with wait: the job's exit code as sbatch --wait reports it

    def log(self, task: int | None = None) -> Path:
        """The batch log of the job (or of one array task)."""
        suffix = f"_{task}" if task is not None else ""
        return self.folder / f"slurm-{self.job_id}{suffix}.out"


def submit(spec: JobSpec, wait: bool = False, checked: bool = False) -> Submission:
    """Check, make the log folder, submit; with wait, return once the job (and any requeue) has ended."""
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch is not on PATH: submit from a Slurm login node (or start the local "
                          "cluster: slurm/local_cluster.sh start)")
    if not checked:
        check(spec)
    folder = new_log_folder(spec)
    if spec.sweep:
        (folder / "sweep.txt").write_text("".join(shlex.join(line) + "\n" for line in spec.sweep))
    cmd = sbatch_command(spec, folder, wait)
    (folder / "submit.json").write_text(json.dumps({"command": cmd, "spec": asdict(spec)}, indent=1))
    done = subprocess.run(cmd, env=job_environment(spec, folder), capture_output=True,
                          text=True)
    job_id = done.stdout.strip().split(";")[0].split("\n")[0]
    if not job_id.isdigit():
        said = done.stderr.strip() or done.stdout.strip()
        raise SubmitError(f"sbatch failed (exit {done.returncode}): {said}")
    (folder / "job_id").write_text(job_id + "\n")
    return Submission(job_id, folder, done.returncode if wait else 0)


def read_sweep(path: str) -> tuple[list[list[str]], list[int]]:
    """Override lines of a sweep file (blank lines and # comments skipped), and their line numbers in it."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise SubmitError(f"--sweep {path}: {err.strerror}") from None
    lines, numbers = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as err:  # an unclosed quote
            raise SubmitError(f"--sweep {path}: line {number}: {err}") from None
        bad = [word for word in words if "=" not in word]
        if bad:
            raise SubmitError(f"--sweep {path}: line {number}: {bad[0]!r} is not section.key=value")
        lines.append(words)
        numbers.append(number)
    if not lines:
        raise SubmitError(f"--sweep {path}: no override lines")
    return lines, numbers


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m slurm.submit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit `python -m pretrain.train` to Slurm (slurm/train.sbatch): one task per GPU, or "
                    "per CPU process without GPUs; rendezvous on the allocation's first node; a log folder "
                    "per submission; preemption warnings save a checkpoint and requeue the job, which "
                    "resumes from it. The config and layout are checked here before anything is queued.",
        epilog="examples:\n"
               "  python -m slurm.submit --config configs/tiny.yaml --tasks-per-node 2 train.out_dir=runs/2\n"
               "  python -m slurm.submit --config configs/tiny.yaml --nodes 2 --gpus-per-node 8 \\\n"
               "      --time 24:00:00 train.out_dir=/shared/runs/big parallel.tp=2 parallel.pp=2\n"
               "  python -m slurm.submit --config configs/tiny.yaml --sweep sweep.txt --max-parallel 4\n"
               "The job runs in the folder you submit from, so relative paths (config, data, "
               "train.out_dir) mean what they mean here; train.out_dir must be on a filesystem every node "
               "sees. Details: docs/slurm.md.")
    p.add_argument("--config", help="YAML run config for pretrain.train, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*",
                   help="section.key=value overrides for every task, e.g. train.out_dir=runs/x parallel.tp=2 "
                        "(the layout: parallel.tp, parallel.pp, parallel.sp, parallel.zero_stage)")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; 0 trains on CPU (default 0)")
    g.add_argument("--tasks-per-node", type=int, default=0,
                   help="processes per node (default: one per GPU, or 1 without GPUs); world size = "
                        "nodes x tasks-per-node must be a multiple of tp*pp*sp")
    g.add_argument("--cpus-per-task", type=int, default=1,
                   help="CPU cores per process (also its torch threads on CPU; default 1)")
    g.add_argument("--mem", help="memory per node, Slurm syntax (e.g. 64G; default: the partition's)")
    g.add_argument("--time", default="04:00:00", help="time limit, Slurm syntax (default 04:00:00)")
    g.add_argument("--partition", help="partition (default: the cluster's default)")
    g.add_argument("--account", help="account to charge (default: yours)")
    g.add_argument("--qos", help="quality of service (default: the account's)")
    g = p.add_argument_group("job")
    g.add_argument("--job-name", help="job name (default: the config file's stem)")
    g.add_argument("--log-dir", default="logs/slurm",
                   help="where each submission's log folder <job-name>-<time> goes (default logs/slurm)")
    g.add_argument("--signal-seconds", type=int, default=300,
                   help="send USR1 this many seconds before the time limit, so the run saves and requeues "
                        "(Slurm may send it up to a minute early; default 300)")
    g.add_argument("--no-requeue", action="store_true",
                   help="after a signal, save and end (exit 75) instead of requeueing")
    g.add_argument("--sweep", help="array job: a file of override lines; task i adds line i (# comments ok)")
    g.add_argument("--max-parallel", type=int, default=0, help="array tasks running at once (default: all)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG to sbatch as is (repeatable), e.g. --sbatch-arg=--exclusive")
    g.add_argument("--wait", action="store_true",
                   help="return when the job has ended (requeues included), with its exit code")
    g.add_argument("--no-data-check", action="store_true",
                   help="queue the job even if data.train / data.mix / data.val are not there from here "
                        "(a dataset only the compute nodes see)")
    g.add_argument("--dry-run", action="store_true",
                   help="check and print the sbatch command; submit nothing")
    return p


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    sweep, lines = read_sweep(args.sweep) if args.sweep else ([], [])
    return JobSpec(config=args.config, overrides=list(args.overrides), sweep=sweep, sweep_lines=lines,
                   check_data=not args.no_data_check, nodes=args.nodes,
                   tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
                   cpus_per_task=args.cpus_per_task, mem=args.mem, time=args.time, partition=args.partition,
                   account=args.account, qos=args.qos, job_name=args.job_name, log_dir=args.log_dir,
                   signal_seconds=args.signal_seconds, requeue=not args.no_requeue,
                   max_parallel=args.max_parallel, sbatch_args=list(args.sbatch_arg))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)  # overrides may come before and after the options
    try:
        spec = spec_from_args(args)
        check(spec)
        if args.dry_run:
            print(shlex.join(sbatch_command(spec, Path(spec.log_dir).resolve() / f"{spec.name}-<time>",
                                            args.wait)))
            return 0
        job = submit(spec, wait=args.wait, checked=True)
    except SubmitError as err:
        print(f"submit error: {err}", file=sys.stderr)
        return 2
    kind = f"array job of {len(spec.sweep)} tasks" if spec.sweep else f"job of {spec.world} task(s)"
    print(f"submitted {kind}: {job.job_id}\nlogs: {job.folder}")
    if args.wait:
        print(f"job {job.job_id} ended with exit code {job.returncode}")
        return job.returncode
    print(f"follow: tail -f {job.folder}/slurm-{job.job_id}{'_*' if spec.sweep else ''}.out   "
          f"(squeue -j {job.job_id}; scancel {job.job_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
