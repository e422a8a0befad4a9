"""The output directory belongs to one run at a time.

- ``<output-dir>/run.lock`` is held for the whole run with ``fcntl.flock`` (an exclusive lock the
  kernel releases when the process ends, however it ends) and holds the process id and host of
  its holder, for the message a second run gets. Taking the lock is one atomic step: of several
  runs started together on one folder exactly one gets it, and a lock file left by a killed run
  is taken over (with a note) by whichever run locks it first. The holder removes the file at
  the end; a run that locked a file removed meanwhile locks the new one instead.
- The folder must be the run's own: ``--output-dir ""`` (the current folder) is refused, and so
  is a ``config.json`` that is not a run's (e.g. a Hugging Face model folder's).
- A run without ``--resume`` refuses a folder that holds checkpoints or another run's
  ``metrics.jsonl``; with ``--resume`` the metrics after the resumed step are dropped.
- Temporary files of checkpoint writes that were killed midway are removed at start.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from train import checkpoint

LOCK_NAME = "run.lock"
#: keys every ``config.json`` written by a run holds (train.metrics writes it)
RUN_CONFIG_KEYS = frozenset({"optimizer", "max_steps", "model_config", "world_size"})


@dataclass(frozen=True)
class Lock:
    """A held ``run.lock``: its path and the open descriptor that holds the flock."""

    path: Path
    fd: int

    def release(self) -> None:
        """Remove the file while still holding it (a run that opened it meanwhile sees it is gone), then unlock."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _flock(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive flock, or None while another process holds it."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            opened = os.fstat(fd)
            current = os.stat(path)
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:  # its holder removed it after we opened it: lock the new file
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
            return fd
        os.close(fd)  # removed and created anew after we opened it: lock the new file


def _holder(text: str) -> str:
    """'process PID on HOST' from a lock file's contents, or 'an unknown process'."""
    fields = text.split()
    return f"process {fields[0]} on {fields[1]}" if len(fields) == 2 and fields[0].isdigit() else "an unknown process"


def acquire(out: Path) -> Lock:
    """Create ``out`` and lock it; ValueError naming the folder when it cannot be written or is in use."""
    path = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _flock(path)
        if fd is None:
            holder = _holder(path.read_text())
            raise ValueError(
                f"--output-dir {str(out)!r} is in use by another run ({holder}, see {LOCK_NAME}); wait for it "
                "or choose another --output-dir"
            )
        left = os.pread(fd, 4096, 0).decode(errors="replace")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as err:
        raise ValueError(
            f"--output-dir {str(out)!r} is not writable ({err.strerror or err}); choose a folder this user can write"
        ) from err
    if left.strip():
        print(
            f"note: {str(path)!r} was left by {_holder(left)}, which no longer holds it; taking it over",
            file=sys.stderr,
        )
    return Lock(path, fd)


def _check_own_config(out: Path) -> None:
    """A ``config.json`` in ``out`` must be a run's: never overwrite another tool's file."""
    path = out / "config.json"
    if not path.exists():
        return
    try:
        keys = set(json.loads(path.read_text()))
    except (ValueError, TypeError, UnicodeDecodeError, OSError):
        keys = set()
    if not RUN_CONFIG_KEYS <= keys:
        raise ValueError(
            f"--output-dir {str(out)!r} holds a config.json that is not a training run's (e.g. a model's); "
            "choose another --output-dir, the run would overwrite it"
        )


@contextmanager
def claimed(out: Path, *, resume: bool) -> Iterator[None]:
    """Hold ``out`` for this run: locked, checked (see the module docstring), stale files removed."""
    lock = acquire(out)
    try:
        _check_own_config(out)
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
        lock.release()
