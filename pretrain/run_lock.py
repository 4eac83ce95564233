"""One run per run folder at a time: `train.out_dir/.run.lock`, held by rank 0 for the whole run.

Two runs in one folder (a job submitted twice, a resubmission while the first still runs) would write
each other's checkpoints, prune each other's by step and move one `latest` pointer between them: the
folder would end up describing neither. The lock is an flock on a file (released by the kernel when the
process ends, however it ends), and the file says who holds it, so the refusal can name the run. A
requeued Slurm job can start while the network filesystem still shows its predecessor's lock for a moment:
the second run waits a little before it gives up. Filesystems without flock (some parallel filesystems
mounted without it) are said once and run unguarded rather than refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".run.lock"


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


def hold_run_lock(out: Path, wait_s: float = 30.0, poll_s: float = 1.0) -> tuple[IO[str] | None, str | None]:
    """Take `out`'s lock, retrying for `wait_s`; returns (the open lock file, to keep while the run lasts;
    a warning when the filesystem cannot lock, else None). Raises RunFolderBusy naming the holder."""
    path = out / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held open for the run's lifetime by the caller
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):  # ENOLCK, EOPNOTSUPP, ENOSYS: cannot lock here
                handle.close()
                return None, (f"{path}: this filesystem cannot lock files ({err.strerror}); nothing stops a "
                              "second run from using this folder at the same time")
            if time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise RunFolderBusy(f"train.out_dir={out} is in use by another run ({holder}): wait for it "
                                    "to end, or choose another train.out_dir") from None
            time.sleep(poll_s)
    handle.seek(0)
    handle.truncate()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {since}")
    handle.flush()
    return handle, None


def lock_holder(folder: Path) -> str | None:
    """Who holds the run lock now (the lock file's line), or None: tried without waiting, let go at once."""
    path = folder / LOCK_FILE
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return handle.read().strip() or "another process"
            return None  # a filesystem that cannot lock: nothing to tell
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None
