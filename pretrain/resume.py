"""Which checkpoint a run starts from: `train.resume_from` once, then the run folder's own.

`train.resume_from` forks a run (into a new out_dir: a WSD cooldown, another lr) or rolls one back (to an
older checkpoint of its own out_dir, after a loss spike). Either is asked for once: a job that Slurm
requeues runs the same command again, and starting at resume_from again would throw away what the run
trained since. So the first start records it in `<out_dir>/resumed_from.json`, and a later start with the
same resume_from continues from the folder's own newest good checkpoint. The checkpoints of out_dir past
the one resumed (a rollback's abandoned future) are moved aside to `checkpoints/abandoned-<time>/`, so that
neither a resume nor the pruning of old checkpoints takes them for this run's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.checkpoint import (
    STATE_FILE,
    CorruptCheckpointError,
    checkpoint_root,
    checkpoint_step,
    list_checkpoints,
    newest_good_checkpoint,
    verify_checkpoint,
)
from pretrain.config import TrainConfig

MARKER = "resumed_from.json"


@dataclass
class Start:
    checkpoint: Path | None
    from_resume_from: bool = False  # the first start from train.resume_from: record_start is due
    skipped: list[str] = field(default_factory=list)  # newer checkpoints that failed their checksums
    notes: list[str] = field(default_factory=list)


def _asked(t: TrainConfig) -> str:
    return str(Path(t.resume_from).resolve())


def choose_start(t: TrainConfig) -> Start:
    """The checkpoint this invocation starts from (run on one rank: it reads the files). Raises
    CorruptCheckpointError when the one asked for is bad or missing."""
    if t.resume_from:
        marker = Path(t.out_dir) / MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("resume_from") == _asked(t):
            try:
                own, skipped = newest_good_checkpoint(t.out_dir)
            except CorruptCheckpointError as err:  # none of its own is good: from resume_from again
                own, skipped = None, [str(err)]
            if own is not None:
                return Start(own, skipped=skipped, notes=[
                    f"train.resume_from={t.resume_from} was where this run started; it has checkpoints of "
                    f"its own since, so it continues from {own.name} (a requeue or a rerun of the same "
                    f"command). To start from train.resume_from again, remove {marker}"])
        path = Path(t.resume_from)
        if (path / STATE_FILE).is_file():
            verify_checkpoint(path)
            return Start(path, from_resume_from=True)
        if list_checkpoints(path):  # a run folder: its newest good checkpoint, as train.resume
            found, skipped = newest_good_checkpoint(path)
            return Start(found, from_resume_from=True, skipped=skipped)
        raise CorruptCheckpointError(f"train.resume_from={path}: neither a checkpoint (no {STATE_FILE} "
                                     "there) nor a run folder with checkpoints")
    if t.resume:
        path, skipped = newest_good_checkpoint(t.out_dir)
        return Start(path, skipped=skipped)
    return Start(None)


def record_start(t: TrainConfig, checkpoint: Path, step: int) -> list[str]:
    """Once a run has started from train.resume_from: write the marker, and move out_dir's checkpoints
    past `step` aside. Returns what was moved, as notes."""
    notes = []
    later = [c for c in list_checkpoints(t.out_dir) if checkpoint_step(c) > step]
    if later:
        aside = checkpoint_root(t.out_dir) / time.strftime("abandoned-%Y%m%d-%H%M%S")
        aside.mkdir()
        for old in later:
            old.rename(aside / old.name)
        notes.append(f"moved this folder's {len(later)} checkpoint(s) after step {step} "
                     f"({', '.join(c.name for c in later)}) aside to {aside}: this run goes on from step "
                     f"{step} of {checkpoint}")
    (Path(t.out_dir) / MARKER).write_text(json.dumps(
        {"resume_from": _asked(t), "checkpoint": str(checkpoint), "step": step,
         "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    return notes
