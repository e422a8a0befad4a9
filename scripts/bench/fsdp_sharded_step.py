"""FSDP2-sharded optimizers against one process: per-rank state, step time and bytes communicated.

Run on CPU with 2 processes (gloo):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m scripts.bench.fsdp_sharded_step [--steps 3] [--json out.json]

Protocol:
- Model: GaLore's 60M (:func:`scripts.bench.toolkit.llama`), float32, CPU. Sharded copy:
  ``fully_shard`` per decoder layer and on the root over a 1-D mesh of the 2 ranks
  (``Shard(0)``); unsharded copy: the same weights, whole, in the same process.
- Optimizers: every optimizer of this package through ``build_optimizer`` (``all-linear``
  low-rank/matrix group, the rest full-rank AdamW or the optimizer's rule), rank 128 for the
  low-rank ones (APOLLO-Mini: its rank 1), Newton-Schulz in float32, other hyperparameters at their defaults.
- Gradients: seeded standard-normal whole gradients, the same on every rank; the sharded copy
  receives each rank's rows (``distribute_tensor``), the unsharded copy the whole gradient.
  No forward/backward: only the optimizer is measured.
- Steps: step 1 refreshes every subspace; then ``--steps`` steps without a refresh
  (``update_proj_gap`` larger than the run). Step time: wall time of the refresh step, and the
  median of the others, per rank (the largest over ranks), sharded and unsharded, measured one
  after the other in the same process with 1 intra-op thread.
- State: bytes of every tensor in ``optimizer.state`` after step 1 (a sharded entry: its local
  shard), the largest over ranks, against the unsharded optimizer's.
- Communication: bytes this rank sends through the optimizer's collectives under ring
  algorithms (an all-reduce of B bytes: 2 (w-1)/w B; an all-gather of B bytes: (w-1)/w B),
  counted by :func:`lowmem_optim.sharding.count_traffic`, per plain step and per refresh step
  (step 1: every subspace's first choice);
  next to the naive way, gathering every gradient each step ((w-1)/w of all gradient bytes),
  and next to the same counts predicted from the shapes alone (:mod:`lowmem_optim.tools.traffic`).
  Predictions at other shapes (LLaMA-7B), with what splitting a left projection's R costs and
  saves: ``lowmem-optim traffic --model-config configs/llama_7b.json --world 2 --rank 1024``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from lowmem_optim import sharding
from lowmem_optim.registry import LOWRANK_OPTIMIZERS, build_optimizer, lowrank_defaults
from lowmem_optim.tools.traffic import gather_every_gradient_bytes, predicted_bytes, sharding_optimizers
from scripts.bench.toolkit import llama, markdown_table, write_json
from train.optim import state_bytes

#: every optimizer of this package (``adamw`` and ``adamw8bit`` are torch's and bitsandbytes' classes)
OPTIMIZERS = tuple(sharding_optimizers())
MIB = 2**20


def built(name: str, model: torch.nn.Module, rank: int, gap: int) -> torch.optim.Optimizer:
    # APOLLO-Mini keeps its own rank 1 (its tensor-wise scaling is defined at rank 1)
    rank = lowrank_defaults(name).get("rank", rank)
    hp: dict[str, Any] = {"rank": rank, "update_proj_gap": gap} if name in LOWRANK_OPTIMIZERS else {}
    if name in ("hybrid_auon", "muon"):
        hp["ns_dtype"] = "float32"
    return build_optimizer(name, model, **hp)


def predicted(name: str, optimizer: torch.optim.Optimizer, model: torch.nn.Module, world: int) -> dict[str, Any]:
    """What :mod:`lowmem_optim.tools.traffic` predicts of ``optimizer`` over ``world`` ranks."""
    row = {"optimizer": name, "naive_bytes": gather_every_gradient_bytes(model, world)}
    traffic = predicted_bytes(optimizer, world)
    # step 1 chooses every subspace for the first time
    row["predicted_step_bytes"], row["predicted_refresh_bytes"] = traffic.step, traffic.refresh
    return row


def timed_step(model: torch.nn.Module, optimizer, seed: int, mesh=None) -> tuple[float, float]:
    """(seconds, bytes sent) of one step on seeded gradients (distributed by rows when ``mesh`` is given)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=gen)
        p.grad = grad if mesh is None else distribute_tensor(grad, mesh, [Shard(0)])
    if mesh is not None:
        dist.barrier()
    with sharding.count_traffic() as traffic:
        start = time.perf_counter()
        optimizer.step()
        seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    return seconds, traffic.sent


def largest(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure(name: str, mesh, steps: int, rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    whole, sharded = llama(), llama()
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    opts = {"unsharded": built(name, whole, rank, 10**6), "sharded": built(name, sharded, rank, 10**6)}
    row = predicted(name, opts["unsharded"], whole, mesh.size())
    for kind, model in (("unsharded", whole), ("sharded", sharded)):
        optimizer, on = opts[kind], (mesh if kind == "sharded" else None)
        refresh_s, refresh_sent = timed_step(model, optimizer, 0, on)
        row[f"{kind}_state_bytes"] = largest(state_bytes(optimizer))
        plain = [timed_step(model, optimizer, i, on) for i in range(1, steps + 1)]
        row[f"{kind}_refresh_s"] = largest(refresh_s)
        row[f"{kind}_step_s"] = largest(statistics.median(s for s, _ in plain))
        if kind == "sharded":
            row["refresh_bytes"], row["step_bytes"] = largest(refresh_sent), largest(max(b for _, b in plain))
    return row


def print_tables(rows: list[dict[str, Any]], world: int, rank: int) -> None:
    print(
        f"LLaMA-60M shape, {world} ranks (gloo, CPU, 1 thread each), rank {rank}, fp32, "
        f"torch {torch.__version__}; largest over ranks\n"
    )
    columns = ("optimizer", "state MiB per rank: sharded / one process (ratio)")
    columns += ("plain step s: sharded / one process", "refresh step s: sharded / one process")
    cells = []
    for r in rows:
        sharded, whole = r["sharded_state_bytes"], r["unsharded_state_bytes"]
        state = f"{sharded / MIB:.1f} / {whole / MIB:.1f} ({sharded / whole:.3f})"
        plain = f"{r['sharded_step_s']:.3f} / {r['unsharded_step_s']:.3f}"
        cells.append((r["optimizer"], state, plain, f"{r['sharded_refresh_s']:.2f} / {r['unsharded_refresh_s']:.2f}"))
    print(markdown_table(columns, cells))
    columns = ("optimizer", "plain step", "refresh step", "naive: gather every gradient")
    print("\nBytes each rank sends per optimizer step (MiB): measured (predicted from shapes)\n")
    cells = []
    for r in rows:
        step = f"{r['step_bytes'] / MIB:.3f} ({r['predicted_step_bytes'] / MIB:.3f})"
        refresh = f"{r['refresh_bytes'] / MIB:.2f} ({r['predicted_refresh_bytes'] / MIB:.2f})"
        cells.append((r["optimizer"], step, refresh, f"{r['naive_bytes'] / MIB:.1f}"))
    print(markdown_table(columns, cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = [measure(name, mesh, args.steps, args.rank) for name in args.optimizers.split(",")]
    if dist.get_rank() == 0:
        print_tables(rows, world, args.rank)
        write_json(args.json, {"llama_60m": rows, "world": world})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
