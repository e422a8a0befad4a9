"""Multi-process gloo workers for tests: one set-up and one orderly tear-down."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def run_rank(rank: int, world_size: int, init_file: str, body: Callable[[], T]) -> T:
    """``body()`` run as ``rank`` of a gloo group, which is destroyed once every rank is done.

    The body's objects (a model, an optimizer, layer-wise hooks that hold the group) are gone
    when it returns, so destroying the group frees it here, while the interpreter is whole. A
    group still referenced at exit is freed during finalization, with gloo's worker threads
    alive, which can abort the process after its work is done.
    """
    torch.set_num_threads(1)  # two ranks on a 2-core machine beside another test worker
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    finished = False
    try:
        result = body()
        finished = True
        return result
    finally:
        end_group(barrier=finished)


def end_group(barrier: bool) -> None:
    """Destroy the default group after collecting the cycles (modules with their hooks, DDP's
    reducer) that would otherwise hold it into interpreter finalization. ``barrier``: first wait
    for every rank, since a rank that tears gloo down while its peer still holds the connection
    can abort the peer (skip it after a failure, which a peer may never reach)."""
    gc.collect()
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
