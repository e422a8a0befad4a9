"""The output directory belongs to one run at a time.

- ``<output-dir>/run.lock`` holds the process id and host of the run using the folder,
  created exclusively (``O_CREAT | O_EXCL``) at start and removed at the end. A second run finds
  it and is refused, unless the lock is stale: written on this host by a process that no longer
  exists (a killed run), in which case it is taken over with a note. A lock from another host
  cannot be checked from here: the error names the file to remove.
- A run without ``--resume`` refuses a folder that holds checkpoints or another run's
  ``metrics.jsonl``; with ``--resume`` the metrics after the resumed step are dropped.
- Temporary files of checkpoint writes that were killed midway are removed at start.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from train import checkpoint

LOCK_NAME = "run.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _try_create(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


def acquire(out: Path) -> Path:
    """Create ``out`` and its lock; ValueError naming the folder when it cannot be written or is in use."""
    lock = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        if _try_create(lock):
            return lock
        holder = lock.read_text().split()
    except OSError as err:
        raise ValueError(
            f"--output-dir {str(out)!r} is not writable ({err.strerror or err}); choose a folder this user can write"
        ) from err
    pid, host = (int(holder[0]), holder[1]) if len(holder) == 2 and holder[0].isdigit() else (None, None)
    if host == socket.gethostname() and pid is not None and not _pid_alive(pid):
        print(f"note: {str(lock)!r} was left by process {pid}, which no longer runs; taking it over", file=sys.stderr)
        lock.unlink(missing_ok=True)
        if _try_create(lock):
            return lock
    who = f"process {pid} on {host}" if pid is not None else "an unknown process"
    raise ValueError(
        f"--output-dir {str(out)!r} is in use by another run ({who}, see {LOCK_NAME}); wait for it, "
        f"choose another --output-dir, or delete {str(lock)!r} if no run uses the folder"
    )


@contextmanager
def claimed(out: Path, *, resume: bool) -> Iterator[None]:
    """Hold ``out`` for this run: locked, checked (see the module docstring), stale files removed."""
    lock = acquire(out)
    try:
        if not resume:
            last = checkpoint.latest(out)
            if last is not None:
                raise ValueError(
                    f"{str(out)!r} already holds checkpoints ({last.name}); pass --resume to continue "
                    "that run, or choose another --output-dir"
                )
            metrics = out / "metrics.jsonl"
            if metrics.exists() and metrics.stat().st_size > 0:
                raise ValueError(
                    f"{str(out)!r} already holds another run's metrics.jsonl; pass --resume to continue "
                    "that run, or choose another --output-dir"
                )
        for stale in checkpoint.remove_stale(out):
            print(f"note: removed {stale.name}, left by a checkpoint write that was interrupted", file=sys.stderr)
        yield
    finally:
        lock.unlink(missing_ok=True)
