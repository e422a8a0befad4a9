"""Two-process gloo workers for tests: one set-up and one orderly tear-down."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


@contextmanager
def gloo_rank(rank: int, world_size: int, init_file: str) -> Iterator[None]:
    """Run the body as ``rank`` of a gloo group; tear the group down only once every rank is done.

    Gloo's worker threads must not outlive the interpreter: a group still referenced at exit
    (by a hook, a handle or a cycle) is destroyed during finalization, which can abort the
    process. The body drops its references (e.g. removes layer-wise hooks) before it ends; the
    collection here clears what cycles remain before the group is destroyed.
    """
    torch.set_num_threads(1)  # two ranks on a 2-core machine beside another test worker
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        gc.collect()
        # a rank that tears gloo down while its peer still holds the connection can abort the peer
        dist.barrier()
        dist.destroy_process_group()
