"""Run by ``torchrun --nproc_per_node 2`` from test_distributed.py (not a test module).

Every run in one job, so the two processes start once: DDP with GaLore; DDP with GaLore on
INT8 weights; FSDP2 with Q-GaLore (its model also saved as a DCP folder), then resumed from its
step-2 checkpoint; FSDP2 with every optimizer of the registry. Each rank writes what it holds.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from lowmem_optim.registry import LOWRANK_OPTIMIZERS, available_optimizers
from tests.helpers.gloo import end_group
from train import distributed, loop, preemption
from train.config import parse_args


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in distributed.unwrap(model).named_parameters()
    }


def _preempted(out: Path, base: list[str], d: distributed.Dist, name: str, flags: list[str]) -> None:
    """A run to ``out/name`` whose rank 1 alone receives SIGTERM during step 2; each rank writes
    what the run said to ``out/<name>_rank<rank>.txt``."""
    real_step, steps = loop.train_step, []

    def step_signalled_on_rank1(w: loop.Wiring) -> torch.Tensor | None:
        steps.append(len(steps) + 1)
        if d.rank == 1 and len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(w)

    loop.train_step = step_signalled_on_rank1
    try:
        with preemption.handled():
            loop.run(parse_args(base + flags + [f"--output-dir={out / name}"]), d)
        said = "not preempted"
    except preemption.RunPreempted as err:
        said = str(err)
    finally:
        loop.train_step = real_step
    (out / f"{name}_rank{d.rank}.txt").write_text(said)


def main(out: Path, base: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # owned here, so the runs below share it
    d = distributed.setup()
    rank = d.rank
    ddp = loop.run(
        parse_args(
            base + ["--optimizer=galore_adamw", "--rank=8", "--update-proj-gap=2", f"--output-dir={out / 'ddp'}"]
        ),
        d,
    )
    torch.save(full_parameters(ddp.model), out / f"ddp_rank{rank}.pt")

    # preemption: only rank 1 receives SIGTERM, during step 2; both ranks stop after it and save it
    _preempted(out, base, d, "preempted", ["--optimizer=adamw"])
    _preempted(out, base, d, "preempted_fsdp", ["--optimizer=galore_adamw", "--rank=8", "--parallel=fsdp"])

    int8 = loop.run(
        parse_args(
            base + ["--optimizer=galore_adamw", "--rank=8", "--weight-bits=8", f"--output-dir={out / 'ddp_int8'}"]
        ),
        d,
    )
    torch.save(distributed.unwrap(int8.model).state_dict(), out / f"ddp_int8_rank{rank}.pt")

    fsdp_flags = [
        "--optimizer=q_galore_adamw8bit",
        "--rank=8",
        "--update-proj-gap=2",
        "--parallel=fsdp",
        "--save-every=2",
    ]
    fsdp = loop.run(parse_args(base + fsdp_flags + [f"--output-dir={out / 'fsdp'}"]), d)
    torch.save(full_parameters(fsdp.model), out / f"fsdp_rank{rank}.pt")
    # the sharded model as torchtitan checkpoints it: one DCP folder, each rank writing its rows
    dcp.save({"model": get_model_state_dict(fsdp.model)}, checkpoint_id=str(out / "fsdp_dcp"))
    if rank == 0:  # as if killed after step 2's checkpoint
        shutil.copytree(out / "fsdp", out / "fsdp_cut")
        (out / "fsdp_cut" / "checkpoints" / "step_00000004.pt").unlink()
    dist.barrier()
    resumed = loop.run(parse_args(base + fsdp_flags + [f"--output-dir={out / 'fsdp_cut'}", "--resume"]), d)
    torch.save(full_parameters(resumed.model), out / f"fsdp_resumed_rank{rank}.pt")

    outcomes = {}
    for name in available_optimizers():
        lowrank = ["--rank=8", "--update-proj-gap=2"] if name in LOWRANK_OPTIMIZERS else []
        try:
            trained = loop.run(
                parse_args(
                    base
                    + [f"--optimizer={name}", "--parallel=fsdp", *lowrank, f"--output-dir={out / ('fsdp_' + name)}"]
                ),
                d,
            )
            outcomes[name] = {"losses": [r["loss"] for r in trained.records]}
            torch.save(full_parameters(trained.model), out / f"fsdp_{name}_rank{rank}.pt")
        except ValueError as err:
            outcomes[name] = {"refused": str(err)}
    (out / f"fsdp_optimizers_rank{rank}.json").write_text(json.dumps(outcomes))
    end_group(barrier=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
