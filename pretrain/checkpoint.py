"""Atomic checkpoints: write aside, fsync, rename; a `latest` pointer; keep the last k.

Layout under `<out_dir>/checkpoints/`:
    step_00000100/state.pt       everything needed to resume (model, optimizer, scheduler, step, data, RNG)
    step_00000100/deepspeed/     with DeepSpeed ZeRO (pure data parallel): every rank's shard
    step_00000100/shards/        with tp / pp: every rank's model and optimizer shard (checkpoint_shards.py)
    step_00000100/manifest.json  the sha256 and size of every file above, and the layout record if any
    latest                       text file naming the newest complete checkpoint directory

A checkpoint directory only ever appears under its final name after all its files are written and
flushed, and `latest` is replaced by rename, so a crash (even SIGKILL) at any moment leaves the
previous checkpoint loadable and `latest` pointing to a complete one.

Several writers (ZeRO: each rank saves its own shard): rank 0 calls `begin_checkpoint`, every rank
writes into the staging directory it returns and calls `fsync_tree` on what it wrote, then (after a
barrier) rank 0 calls `save_checkpoint(..., staged=True)`, which adds state.pt and renames as above. The
staging directory lives next to the final one, so every rank must see the same `out_dir` (a shared file
system on several nodes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from data_pipeline.shards import sha256_of

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1  # of the checkpoint layout; raise it when a reader of the old one would misread


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing, or differs from the checksum its manifest recorded."""


class NewerFormatError(ValueError):
    """A checkpoint written in a format this version does not know: never read it as if it were older."""


def write_manifest(directory: Path, extra: dict[str, Any] | None = None) -> None:
    """manifest.json: sha256 and size of every file under `directory` (relative paths), plus `extra`."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        files[path.relative_to(directory).as_posix()] = {"sha256": sha256_of(path),
                                                         "bytes": path.stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, "files": files, **(extra or {})}
    manifest["sha256"] = _content_hash(manifest)  # the manifest's own checksum: its layout record too
    with open(directory / MANIFEST_FILE, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _content_hash(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify_checkpoint(directory: str | Path) -> None:
    """Check the manifest against its own checksum and every file it lists against theirs; raises
    CorruptCheckpointError naming the first bad file. A checkpoint without a manifest (written before
    manifests existed, or not by this stack: the atomic save always writes one) has nothing to check
    against, so its state file must at least load."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        try:
            torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)
        except Exception as err:  # whatever the reader raises, the file is unusable
            raise CorruptCheckpointError(f"checkpoint {directory} has no {MANIFEST_FILE} and its "
                                         f"{STATE_FILE} cannot be read: {err}") from err
        return
    try:
        manifest = json.loads(manifest_path.read_text())
        intact = manifest["sha256"] == _content_hash(manifest)
        files = {name: (entry["bytes"], entry["sha256"]) for name, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptCheckpointError(f"checkpoint manifest {manifest_path} cannot be read: {err!r}") from err
    if not intact:
        raise CorruptCheckpointError(f"checkpoint manifest {manifest_path} does not match its own checksum "
                                     "(corrupt or modified)")
    if manifest.get("format_version", 1) > FORMAT_VERSION:
        raise NewerFormatError(f"checkpoint {directory} has format version {manifest['format_version']}, "
                               f"this version of the stack reads up to {FORMAT_VERSION}: update it")
    for name, (size, digest) in files.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != size or sha256_of(path) != digest:
            raise CorruptCheckpointError(f"checkpoint file {path} does not match its manifest checksum "
                                         "(corrupt or modified)")


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


def staging_dir(out_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is renamed to its final name."""
    return checkpoint_root(out_dir) / f".step_{step:08d}.partial"


def begin_checkpoint(out_dir: str | Path, step: int) -> Path:
    """A fresh, empty staging directory for `step` that other writers fill before `save_checkpoint`."""
    staging = staging_dir(out_dir, step)
    staging.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def fsync_tree(path: str | Path) -> None:
    """Flush every file and directory under `path` to disk (for files written by other libraries)."""
    path = Path(path)
    for sub, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(Path(sub) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(sub))


def save_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], keep_last: int,
                    staged: bool = False, manifest: dict[str, Any] | None = None,
                    keep_steps: Collection[int] = ()) -> Path:
    """Write `state` as the checkpoint of `step`, move `latest` to it, prune all but the last k (and
    those of `keep_steps`).

    staged=True: `begin_checkpoint` made the staging directory and other writers have filled (and
    flushed) it; state.pt and manifest.json (checksums of everything, plus `manifest`) are added last,
    and the rename commits everything at once.
    """
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final, staging = checkpoint_path(out_dir, step), staging_dir(out_dir, step)
    if staged:
        if not staging.is_dir():
            raise FileNotFoundError(f"staging directory {staging} is missing: call begin_checkpoint first")
    else:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    with open(staging / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    write_manifest(staging, manifest)
    _fsync_dir(staging)
    shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step after a resume
    os.replace(staging, final)
    _fsync_dir(root)
    _write_file_atomic(root / "latest", final.name.encode())
    for old in list_checkpoints(out_dir)[:-keep_last]:
        if checkpoint_step(old) not in keep_steps:
            shutil.rmtree(old, ignore_errors=True)
    return final


def run_folder(path: Path | None) -> Path | None:
    """The run folder a checkpoint directory sits in (<out_dir>/checkpoints/step_N); None for anything else
    (an export: a folder to share, not a run's log)."""
    return path.parent.parent if path is not None and path.parent.name == "checkpoints" else None


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory, from its name (step_00000100 → 100)."""
    return int(path.name.removeprefix("step_"))


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


def newest_good_checkpoint(out_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files all match its manifest, and one line per newer checkpoint that
    was skipped (corrupt, truncated, or missing a file). None when there is no checkpoint at all;
    CorruptCheckpointError when there are checkpoints but none is good."""
    candidates = list_checkpoints(out_dir)[::-1]
    latest = latest_checkpoint(out_dir)  # the pointer's target first, if it names a complete checkpoint
    if latest is not None and latest in candidates:
        candidates.remove(latest)
        candidates.insert(0, latest)
    skipped = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except CorruptCheckpointError as err:
            skipped.append(str(err))
            continue
        return candidate, skipped
    if skipped:
        raise CorruptCheckpointError(f"no good checkpoint in {checkpoint_root(out_dir)}: "
                                     + "; ".join(skipped))
    return None, []


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state.pt, memory-mapped: the tensors are read from the file as they are copied
    into the model (or sliced, under FSDP), so the processes of a node share one copy in the page cache
    instead of each holding the whole state (a loader that keeps a tensor must copy it:
    `pretrain.engine.copy_mapped_optimizer_state`)."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    try:
        return torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a truncated or foreign file
        raise RuntimeError(f"checkpoint {file} cannot be read: {err}") from err
