"""SIGTERM and SIGINT end a run with a checkpoint instead of losing the work since the last one.

SLURM and Kubernetes send SIGTERM some time before they kill a job; Ctrl-C sends SIGINT. The
first of either only sets a flag: the loop finishes the step in flight, saves a checkpoint of it
(rank 0 writes it; under FSDP2 every rank takes part in gathering it), prints one line naming
it, releases the output folder and stops with :class:`RunPreempted` (``python -m train`` exits 1
with a line that says "preempted"); ``--resume`` continues exactly. A second signal exits at
once (status 128 + the signal's number) without running any more Python: a checkpoint write
cut short leaves only a temporary file (removed by the next run), never a ``step_*.pt``, and
the lock's flock dies with the process.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from train import RunStopped, distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunPreempted(RunStopped):
    """The run stopped on SIGTERM or SIGINT after saving the step it was in."""


class _Received:
    signal: int | None = None


def _handle(signum: int, frame: FrameType | None) -> None:
    if _Received.signal is None:
        _Received.signal = signum  # the loop stops after the step in flight
        return
    name = signal.Signals(signum).name
    os.write(2, f"error: second signal ({name}): exiting now; the checkpoints already written are intact\n".encode())
    os._exit(128 + signum)


@contextmanager
def handled() -> Iterator[None]:
    """SIGTERM and SIGINT recorded for :func:`received` while inside (main thread only: Python
    runs signal handlers there; elsewhere the signals keep their previous handling)."""
    _Received.signal = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _Received.signal = None


def received() -> str | None:
    """The name of the first stop signal received in this process (e.g. 'SIGTERM'), or None."""
    return None if _Received.signal is None else signal.Signals(_Received.signal).name


def requested(d: distributed.Dist) -> str | None:
    """Whether to stop after this step: the signal's name when any rank received one (all ranks
    agree: one small all-reduce per step under torchrun, nothing in one process)."""
    name = received()
    if d.world == 1:
        return name
    if distributed.max_over_ranks(int(name is not None), d.device):
        return name or "a stop signal sent to another rank"
    return None
