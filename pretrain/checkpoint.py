"""Atomic checkpoints: write aside, fsync, rename; a `latest` pointer; keep the last k.

Layout under `<out_dir>/checkpoints/`:
    step_00000100/state.pt    everything needed to resume (model, optimizer, scheduler, step, data, RNG)
    latest                    text file naming the newest complete checkpoint directory

A checkpoint directory only ever appears under its final name after all its files are written and
flushed, and `latest` is replaced by rename, so a crash (even SIGKILL) at any moment leaves the
previous checkpoint loadable and `latest` pointing to a complete one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` as the checkpoint of `step`, move `latest` to it, prune all but the last k."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, staging = root / name, root / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    with open(staging / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(staging)
    shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step after a resume
    os.replace(staging, final)
    _fsync_dir(root)
    _write_file_atomic(root / "latest", name.encode())
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (half-written `.partial` ones are ignored)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; if the pointer is missing, the newest complete directory."""
    root = checkpoint_root(out_dir)
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / STATE_FILE).is_file():
            return target
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise RuntimeError(f"checkpoint {file} cannot be read: {err}") from err
