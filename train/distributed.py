"""Processes and parallelism: torchrun's environment, DDP, FSDP2 (``fully_shard``).

One process without torchrun. Under ``torchrun --nproc_per_node N`` a process group is
started (NCCL on GPUs, gloo on CPU) and the model is wrapped:

- ``ddp``: every rank holds the whole model and optimizer; gradients are averaged before the
  step, so every rank computes the same projections and keeps identical parameters.
- ``fsdp``: FSDP2, each decoder layer and the root sharded by rows across ranks. Every
  optimizer of this package steps the sharded parameters on each rank's rows with the math of
  one process (:mod:`lowmem_optim.sharding`); torch's AdamW runs on them through DTensor;
  bitsandbytes' optimizers step plain tensors only and are refused. Layer-wise updates and INT8
  weights are refused under FSDP2 (:mod:`train.config`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this run started the process group (and so ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def one_process(cls, device: torch.device) -> Dist:
        """A run of one process on ``device`` that started no process group (probes of the step)."""
        return cls(rank=0, world=1, local_rank=0, device=device, owns_group=False)


def setup() -> Dist:
    """The process's place in the job, from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        # float32 matmuls (projections, subspace refreshes, fp32 runs) on tensor cores as TF32:
        # 10-bit mantissa products, float32 accumulation; bfloat16 matmuls are unaffected
        torch.set_float32_matmul_precision("high")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    return Dist(rank, world, local_rank, device, owns)


def teardown(d: Dist, finished: bool = True) -> None:
    """Destroy the process group this run created. After a run that finished, the ranks first
    meet at a barrier: a rank that tears its group down while a peer is still in its last
    collective can abort that peer (seen with gloo). After a failure there is no barrier, since
    a peer that failed elsewhere would never reach it."""
    if d.owns_group and dist.is_initialized():
        if finished and d.world > 1:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, parallel: str, d: Dist) -> nn.Module:
    """``model`` wrapped for ``parallel`` ("ddp" or "fsdp") when there are several processes."""
    if d.world == 1:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # INT8 weights (lowmem_optim.quant.int8_linear) hold no values to broadcast: every rank
        # builds the same model from the seed, and their codes stay equal (same gradient, same
        # seeded rounding), so neither the initial sync nor the buffer broadcast is needed
        int8 = any(hasattr(p, "apply_update") for p in model.parameters())
        return DistributedDataParallel(
            model,
            device_ids=[d.local_rank] if d.device.type == "cuda" else None,
            init_sync=not int8,
            broadcast_buffers=not int8,
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def check_shardable(optimizer: torch.optim.Optimizer) -> None:
    """ValueError for an optimizer that cannot step FSDP2's DTensor parameters."""
    if type(optimizer).__module__.split(".")[0] == "bitsandbytes":
        raise ValueError(
            f"{type(optimizer).__name__} (bitsandbytes) steps plain tensors, not the DTensor shards "
            "FSDP2 holds (allowed: --parallel ddp, or an optimizer of lowmem_optim)"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself (DDP keeps it in ``.module``; FSDP2 shards it in place)."""
    return getattr(model, "module", model)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (all but the last)."""
    if enabled or not dist.is_initialized():
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync() if hasattr(model, "no_sync") else nullcontext():
            yield


def mean_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def max_over_ranks(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def gather_from_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` (1-D) of every rank, stacked: (world, len) on the CPU, one device-to-host copy."""
    if not dist.is_initialized():
        return values.unsqueeze(0).cpu()
    out = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(out, values.contiguous())
    return torch.stack(out).cpu()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state as whole tensors on CPU (gathered under FSDP2: call on all ranks)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), optimizer.state_dict()


def load_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optim_state: dict[str, Any]
) -> None:
    """Inverse of :func:`full_state_dicts` (scattered back into shards under FSDP2)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True),
        )
        return
    unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)
