"""Where a run stands, from its folder alone: `python -m pretrain.status runs/tiny` (or many: a table).

    python -m pretrain.status runs/tiny                    # one run in detail
    python -m pretrain.status runs/scaling/tiny/*          # a table, a run per line
    python -m pretrain.status runs/tiny --verify           # and every checkpoint against its checksums

Read from what the training job leaves: config.yaml, the checkpoints, the run lock (whether a process
holds the folder now, and which), the TensorBoard scalars (last losses, throughput), resumed_from.json
(a fork) and eval/. Nothing is loaded onto a device and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.checkpoint import CorruptCheckpointError, checkpoint_step, list_checkpoints, verify_checkpoint
from pretrain.resume import MARKER
from pretrain.run_lock import lock_holder

SCALARS = ("train/loss", "val/loss", "perf/tokens_per_s")


@dataclass
class RunStatus:
    folder: str
    state: str  # running (holder) / finished / stopped / not started
    step: int  # of the newest checkpoint
    steps: int | None  # train.steps
    layers: str = ""
    checkpoints: list[str] = field(default_factory=list)
    bad_checkpoints: list[str] = field(default_factory=list)  # with --verify
    last: dict[str, tuple[int, float]] = field(default_factory=dict)  # scalar → (step, value)
    forked_from: str | None = None
    evaluations: list[str] = field(default_factory=list)


def last_scalars(folder: Path) -> dict[str, tuple[int, float]]:
    """The newest value of each of SCALARS and of every val/<set>/loss, from the TensorBoard events."""
    board = folder / "tensorboard"
    if not board.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"]
            if t in SCALARS or (t.startswith("val/") and t.endswith("/loss"))]
    newest = {tag: events.Scalars(tag)[-1] for tag in tags}
    return {tag: (event.step, event.value) for tag, event in newest.items()}


def run_status(folder: Path, verify: bool = False) -> RunStatus:
    """A run folder's status; FileNotFoundError when it is not a run folder."""
    config_file = folder / "config.yaml"
    checkpoints = list_checkpoints(folder)
    if not config_file.is_file() and not checkpoints:
        raise FileNotFoundError(f"{folder}: not a run folder (no config.yaml, no checkpoints)")
    config: dict[str, Any] = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    steps = config.get("train", {}).get("steps")
    step = checkpoint_step(checkpoints[-1]) if checkpoints else 0
    holder = lock_holder(folder)
    state = (f"running ({holder})" if holder else "finished" if steps and step >= steps
             else f"stopped at step {step}" if checkpoints else "not started")
    status = RunStatus(str(folder), state, step, steps, str(config.get("model", {}).get("layers", "")),
                       [c.name for c in checkpoints], last=last_scalars(folder))
    if verify:
        for checkpoint in checkpoints:
            try:
                verify_checkpoint(checkpoint)
            except CorruptCheckpointError as err:
                status.bad_checkpoints.append(str(err))
    if (folder / MARKER).is_file():
        status.forked_from = json.loads((folder / MARKER).read_text()).get("checkpoint")
    if (folder / "eval").is_dir():
        status.evaluations = sorted(p.name for p in (folder / "eval").glob("*.json"))
    return status


def describe(status: RunStatus) -> list[str]:
    """One run in detail."""
    progress = f"step {status.step}" + (f" of {status.steps}" if status.steps else "")
    lines = [f"{status.folder}: {status.state}, {progress}" + (f", layers {status.layers}" if status.layers
                                                              else "")]
    for tag, (step, value) in status.last.items():
        lines.append(f"  {tag}: {value:,.4f} at step {step}" if "perf" not in tag
                     else f"  {tag}: {value:,.0f} at step {step}")
    lines.append(f"  checkpoints: {', '.join(status.checkpoints) or 'none'}")
    lines += [f"  BAD: {problem}" for problem in status.bad_checkpoints]
    if status.forked_from:
        lines.append(f"  forked from {status.forked_from}")
    if status.evaluations:
        lines.append(f"  evaluations (eval/): {', '.join(status.evaluations)}")
    return lines


def table(statuses: list[RunStatus]) -> list[str]:
    """Many runs, a line each."""
    def value(status: RunStatus, tag: str, fmt: str) -> str:
        return format(status.last[tag][1], fmt) if tag in status.last else "-"

    lines = ["| run | state | step | train loss | val loss | tokens/s |", "|---|---|---:|---:|---:|---:|"]
    for s in statuses:
        step = f"{s.step}/{s.steps}" if s.steps else str(s.step)
        lines.append(f"| {s.folder} | {s.state} | {step} | {value(s, 'train/loss', '.4f')} | "
                     f"{value(s, 'val/loss', '.4f')} | {value(s, 'perf/tokens_per_s', ',.0f')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.status", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="run folders (train.out_dir)")
    p.add_argument("--verify", action="store_true", help="check every checkpoint against its checksums "
                   "(reads all of them)")
    p.add_argument("--json", action="store_true", help="the statuses as JSON")
    args = p.parse_args(argv)
    statuses, missing = [], []
    for folder in args.folders:
        try:
            statuses.append(run_status(Path(folder), args.verify))
        except FileNotFoundError as err:
            missing.append(str(err))
    if args.json:
        print(json.dumps([asdict(s) for s in statuses], indent=1))
    elif len(statuses) == 1 and not missing:
        print("\n".join(describe(statuses[0])))
    elif statuses:
        print("\n".join(table(statuses)))
    for problem in missing:
        print(f"error: {problem}", file=sys.stderr)
    return 2 if missing else (1 if any(s.bad_checkpoints for s in statuses) else 0)


if __name__ == "__main__":
    sys.exit(main())
