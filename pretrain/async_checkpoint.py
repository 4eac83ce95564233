"""Checkpoints written in the background while training goes on (`train.async_checkpoint`).

    writer = AsyncCheckpointWriter(mesh, out_dir, timeout_s=600)
    writer.start(step, files, finalize)   # after the collective part of a save; returns at once
    ...                                   # training steps
    final = writer.finish()               # collective: before the next save, and at the end of the run

A save has a collective part (FSDP's gathers, the layout record, every rank's data position and RNG: the
main thread does it, as a synchronous save does) and a writing part: each rank's shard files, then rank 0's
state.pt, manifest and rename (pretrain/checkpoint.py). The writing part runs in a thread, on a copy of
every tensor taken before `start` returns, so the optimizer's next steps do not leak into the checkpoint.
The thread never uses the process group (gloo and NCCL collectives from two threads could interleave):
each rank marks its files written with a file beside the staging folder, and rank 0's thread waits for
every rank's mark (up to `timeout_s`) before it commits. A failure on any rank is raised on every rank by
the next `finish`, as a synchronous save raises it. A crash while the thread writes leaves only a staging
folder: the last committed checkpoint stands, as it does for a synchronous save.

The price: host memory for the copy (this rank's share of the weights and AdamW state), and a checkpoint
that is committed one save later at the latest (`finish` runs before the next save starts).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from parallel.mesh import Mesh
from pretrain.checkpoint import checkpoint_root
from pretrain.checkpoint_shards import write_files


def detached_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to the CPU (dicts, lists and tuples walked; the rest shared)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: detached_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(value) for value in obj)
    return obj


class CheckpointWriteFailed(RuntimeError):
    """Some rank could not write its part of the background checkpoint of `step`; `problems` names each
    rank and its error."""

    def __init__(self, step: int, problems: list[str]) -> None:
        super().__init__(f"writing the checkpoint of step {step} failed ({'; '.join(problems)})")
        self.step, self.problems = step, problems


class AsyncCheckpointWriter:
    """One background checkpoint at a time for this rank (see the module docstring)."""

    def __init__(self, mesh: Mesh, out_dir: str | Path, timeout_s: float) -> None:
        self.mesh, self.root, self.timeout_s = mesh, checkpoint_root(out_dir), timeout_s
        self.thread: threading.Thread | None = None
        self.step = 0
        self.final: Path | None = None
        self.problem: str | None = None

    def marks(self, step: int) -> Path:
        return self.root / f".step_{step:08d}.ranks"

    def clear_marks(self, step: int) -> None:
        """Rank 0, before a save of `step` starts: the marks an interrupted earlier attempt at the same
        step left (a requeued run reaching it again) would otherwise commit files not yet rewritten."""
        shutil.rmtree(self.marks(step), ignore_errors=True)

    def start(self, step: int, files: dict[Path, Any], finalize: Callable[[], Path] | None) -> None:
        """Copy `files` (path → object) now, write them in the background; on rank 0, `finalize` (which
        writes state.pt from its own copy and commits) runs once every rank has marked its files done."""
        if self.thread is not None:
            raise RuntimeError("finish() the previous background checkpoint before starting another")
        files = detached_copy(files)
        self.step, self.final, self.problem = step, None, None
        self.thread = threading.Thread(target=self._write, args=(step, files, finalize),
                                       name=f"checkpoint-{step}", daemon=True)
        self.thread.start()

    def _write(self, step: int, files: dict[Path, Any], finalize: Callable[[], Path] | None) -> None:
        marks = self.marks(step)
        try:
            write_files(files)
            marks.mkdir(parents=True, exist_ok=True)
            (marks / f"{self.mesh.rank}.done").touch()
        except Exception as err:  # reported on every rank by finish()
            self.problem = f"rank {self.mesh.rank}: {err}"
            marks.mkdir(parents=True, exist_ok=True)
            (marks / f"{self.mesh.rank}.failed").write_text(self.problem)
            return
        if finalize is None:
            return
        try:
            if self._every_rank_wrote(marks):  # else the rank that failed reports it
                self.final = finalize()
        except Exception as err:
            self.problem = f"rank {self.mesh.rank}: {err}"
        finally:
            shutil.rmtree(marks, ignore_errors=True)

    def _every_rank_wrote(self, marks: Path) -> bool:
        """Wait until every rank has marked its part done or failed; whether all are done."""
        deadline = time.monotonic() + self.timeout_s
        ranks = range(self.mesh.world_size)
        while not all((marks / f"{r}.done").exists() or (marks / f"{r}.failed").exists() for r in ranks):
            if time.monotonic() > deadline:
                missing = [r for r in ranks if not (marks / f"{r}.done").exists()]
                raise TimeoutError(f"ranks {missing} did not write their part within {self.timeout_s:.0f} s")
            time.sleep(0.05)
        return not any(marks.glob("*.failed"))

    def close(self) -> None:
        """Wait for the thread without the collective (a run ending on an error): the checkpoint in flight
        is committed if every rank wrote its part, and left as a staging folder otherwise."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def finish(self) -> Path | None:
        """Collective: wait for this rank's thread; raise on every rank if any rank's write failed.
        Returns the committed checkpoint on rank 0 (None elsewhere, or when nothing was started)."""
        started = self.thread is not None
        self.close()
        problems = self.mesh.problems(self.problem)
        if problems:
            raise CheckpointWriteFailed(self.step, problems)
        return self.final if started else None
