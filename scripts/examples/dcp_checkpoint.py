"""GaLore checkpoints with torch.distributed.checkpoint (DCP), as torchtitan saves them.

    python scripts/examples/dcp_checkpoint.py [--optimizer galore_adamw]
    torchrun --nproc_per_node 2 scripts/examples/dcp_checkpoint.py   # 2 CPU processes (gloo, DDP)

Save: ``get_optimizer_state_dict`` + ``dcp.save``. Resume: build a fresh model and optimizer,
take their state dicts as the template (on a fresh optimizer DCP first steps once with zero
gradients and lr 0, which moves nothing), ``dcp.load`` into it, ``set_optimizer_state_dict``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from tiny import tiny_llama, token_rows
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lowmem_optim import build_optimizer
from lowmem_optim.registry import LOWRANK_OPTIMIZERS


def setup(optimizer_name: str, seed: int):
    model = tiny_llama(seed)
    lowrank = {"rank": 8, "update_proj_gap": 2} if optimizer_name in LOWRANK_OPTIMIZERS else {}
    optimizer = build_optimizer(optimizer_name, model, lr=1e-2, **lowrank)  # groups from the bare model
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, optimizer


def train(model, optimizer, rows: torch.Tensor) -> list[float]:
    losses = []
    for tokens in rows.split(8):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="galore_adamw")
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    checkpoint = os.path.join(tempfile.gettempdir(), f"lowmem_optim_dcp_example_{args.optimizer}")
    model, optimizer = setup(args.optimizer, seed=0)
    train(model, optimizer, token_rows(24, seed=1 + rank))
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=checkpoint,
    )

    fresh, fresh_optimizer = setup(args.optimizer, seed=1)
    state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_optimizer)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_optimizer, state["optim"])

    more = token_rows(16, seed=10 + rank)
    expected, resumed = train(model, optimizer, more), train(fresh, fresh_optimizer, more)
    print(f"rank {rank}: uninterrupted {[round(x, 5) for x in expected]}, resumed {[round(x, 5) for x in resumed]}")
    assert resumed == expected, "resume diverged"
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
