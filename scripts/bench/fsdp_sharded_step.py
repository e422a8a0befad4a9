"""FSDP2-sharded optimizers against one process: per-rank state, step time and bytes communicated.

Run on CPU with 2 processes (gloo):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m scripts.bench.fsdp_sharded_step [--steps 3] [--json out.json]

Protocol:
- Model: GaLore's 60M (:func:`scripts.bench.toolkit.llama`), float32, CPU. Sharded copy:
  ``fully_shard`` per decoder layer and on the root over a 1-D mesh of the 2 ranks
  (``Shard(0)``); unsharded copy: the same weights, whole, in the same process.
- Optimizers: every optimizer of this package through ``build_optimizer`` (``all-linear``
  low-rank/matrix group, the rest full-rank AdamW or the optimizer's rule), rank 128 for the
  low-rank ones, Newton-Schulz in float32, other hyperparameters at their defaults.
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
  counted by :func:`lowmem_optim.sharding.count_traffic`, per plain step and per refresh step;
  next to the naive way, gathering every gradient each step ((w-1)/w of all gradient bytes).
  The same counts are predicted from the shapes alone (:func:`predicted_bytes`) for the
  60M shape (checked against the count) and for LLaMA-7B (hidden 4096, intermediate 11008,
  32 layers; rank 1024 for the 7B, fp32 gradients: a prediction, not run).
- Left projections: the rule's moments of R = P^T G per rank, split by R's rows (what this
  package does) against kept whole on every rank, and the all-gather of the update the split
  adds, from shapes (:func:`left_split`), for both shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from lowmem_optim import available_optimizers, sharding
from lowmem_optim.engine import matrix_shape, splits_projected_rows
from lowmem_optim.projection.base import projection_sides
from lowmem_optim.registry import LOWRANK_OPTIMIZERS, build_optimizer
from lowmem_optim.rules import RULES
from scripts.bench.toolkit import LLAMA_7B, llama, write_json
from train.optim import state_bytes

#: every optimizer of this package (``adamw`` and ``adamw8bit`` are torch's and bitsandbytes' classes)
OPTIMIZERS = tuple(name for name in available_optimizers() if name not in ("adamw", "adamw8bit"))


def hparams(name: str, rank: int, gap: int) -> dict[str, Any]:
    hp: dict[str, Any] = {"rank": rank, "update_proj_gap": gap} if name in LOWRANK_OPTIMIZERS else {}
    if name in ("hybrid_auon", "muon"):
        hp["ns_dtype"] = "float32"
    return hp


# ---- the prediction from shapes --------------------------------------------------------------
def _ring(op: str, nbytes: float, world: int) -> float:
    return (2 if op == "all_reduce" else 1) * (world - 1) / world * nbytes


def predicted_bytes(name: str, optimizer, world: int) -> tuple[float, float]:
    """(bytes per plain step, bytes per refresh step) this rank sends, from the param groups'
    shapes and parts alone (what :mod:`lowmem_optim.sharding`'s collectives carry), fp32."""
    step = refresh = 0.0
    for group in optimizer.param_groups:
        for p in group["params"]:
            m, n = matrix_shape(p) if p.dim() >= 2 else (p.shape[0], 1)
            rank = group.get("rank")
            rule = group["rule"]
            if rank is not None and rank < min(m, n):
                left, right = projection_sides((m, n), group["proj_type"])
                low = (rank, rank) if left and right else (rank, n) if left else (m, rank)
                split = left and splits_projected_rows(RULES[rule](), group, (m, n), p.dtype, world)
                if left:  # P^T G all-reduced; where split, the rule's update of each rank's rows of it gathered
                    step += _ring("all_reduce", 4 * low[0] * low[1], world)
                if split:
                    step += _ring("all_gather", 4 * low[0] * low[1], world)
                refresh += _ring("all_reduce", 4, world)  # is the gradient all-zero (on some rank)?
                if group["proj_method"] == "dct" and not left:
                    refresh += _ring("all_reduce", 4 * n, world)  # the column scores
                else:
                    refresh += _ring("all_gather", 4 * m * n, world)
                if group["proj_method"] == "dct" and left:  # R is read from the gathered spectrum
                    refresh -= _ring("all_reduce", 4 * low[0] * low[1], world)
                rows_sharded = split or not left  # the weight's rows (right) or a block of R's rows (left, split)
            else:
                low, rows_sharded = (m, n), True
            step += _rule_bytes(rule, group, low, rows_sharded, p.dim(), world)
    return step, step + refresh


def _rule_bytes(
    rule: str, group: dict[str, Any], shape: tuple[int, int], rows_sharded: bool, dim: int, world: int
) -> float:
    """Bytes a rule's reductions send for a tensor of ``shape`` (its rows sharded or whole)."""
    if rule == "adafactor":
        param_rms = 4 if group["scale_parameter"] else 0
        if not rows_sharded:
            return _ring("all_reduce", param_rms, world)
        stats = 4 * (shape[1] + 1) if dim >= 2 else 0  # column statistic, mean of the row statistic
        return _ring("all_reduce", stats + 4 + param_rms, world)  # and RMS(update)
    if not rows_sharded:
        return 0.0
    if rule == "auon":
        return _ring("all_reduce", 8, world)  # ||X||_F and the mean of cosh^2
    if rule in ("muon", "hybrid_auon"):
        return _ring("all_gather", 4 * shape[0] * shape[1], world)
    return 0.0


def left_split(optimizer, world: int) -> dict[str, float]:
    """What splitting R = P^T G by rows for the rule costs and saves against every rank keeping its
    moments whole (from shapes): moments bytes per rank either way, the bytes the gather of the
    update adds per step, and whether the optimizer splits (:func:`splits_projected_rows`)."""
    out = {"split_state": 0.0, "replicated_state": 0.0, "gather_bytes": 0.0, "split": False}
    for group in optimizer.param_groups:
        rule = RULES[group["rule"]]()
        for p in group["params"]:
            m, n = matrix_shape(p) if p.dim() >= 2 else (p.shape[0], 1)
            rank = group.get("rank")
            if rank is None or rank >= min(m, n) or not projection_sides((m, n), group["proj_type"])[0]:
                continue
            low = (rank, rank) if projection_sides((m, n), group["proj_type"])[1] else (rank, n)
            whole = rule.state_bytes(low, p.dtype, group)
            out["replicated_state"] += whole
            out["split_state"] += rule.state_bytes((-(-low[0] // world), low[1]), p.dtype, group)
            out["gather_bytes"] += _ring("all_gather", 4 * low[0] * low[1], world)
            out["split"] = splits_projected_rows(rule, group, (m, n), p.dtype, world)
    return out


def naive_bytes(model: torch.nn.Module, world: int) -> float:
    """Gathering every gradient each step (fp32)."""
    return _ring("all_gather", 4 * sum(p.numel() for p in model.parameters()), world)


# ---- the measurement -------------------------------------------------------------------------
def gradients(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}


def timed_step(model: torch.nn.Module, optimizer, grads: dict[str, torch.Tensor], mesh=None) -> tuple[float, float]:
    """(seconds, bytes sent) of one step on ``grads`` (distributed by rows when ``mesh`` is given)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for name, p in model.named_parameters():
        p.grad = grads[name] if mesh is None else distribute_tensor(grads[name], mesh, [Shard(0)])
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

    world = mesh.size()
    whole, sharded = llama(), llama()
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    hp = hparams(name, rank, gap=10**6)
    opts = {"unsharded": build_optimizer(name, whole, **hp), "sharded": build_optimizer(name, sharded, **hp)}
    row: dict[str, Any] = {"optimizer": name, "naive_bytes": naive_bytes(whole, world)}
    row["predicted_step_bytes"], row["predicted_refresh_bytes"] = predicted_bytes(name, opts["unsharded"], world)
    row["left_split"] = left_split(opts["unsharded"], world)
    for kind, model in (("unsharded", whole), ("sharded", sharded)):
        optimizer, on = opts[kind], (mesh if kind == "sharded" else None)
        refresh_s, refresh_sent = timed_step(model, optimizer, gradients(whole, 0), on)
        row[f"{kind}_state_bytes"] = largest(state_bytes(optimizer))
        plain = [timed_step(model, optimizer, gradients(whole, i), on) for i in range(1, steps + 1)]
        row[f"{kind}_refresh_s"] = largest(refresh_s)
        row[f"{kind}_step_s"] = largest(statistics.median(s for s, _ in plain))
        if kind == "sharded":
            row["refresh_bytes"], row["step_bytes"] = largest(refresh_sent), largest(max(b for _, b in plain))
    return row


def predict_7b(world: int) -> list[dict[str, Any]]:
    model = llama(LLAMA_7B, device="meta")
    rows = []
    for name in OPTIMIZERS:
        optimizer = build_optimizer(name, model, **hparams(name, 1024, gap=200))
        step, refresh = predicted_bytes(name, optimizer, world)
        rows.append(
            {
                "optimizer": name,
                "step_bytes": step,
                "refresh_bytes": refresh,
                "naive_bytes": naive_bytes(model, world),
                "left_split": left_split(optimizer, world),
            }
        )
    return rows


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
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rows = [measure(name, mesh, args.steps, args.rank) for name in args.optimizers.split(",")]
    big = predict_7b(dist.get_world_size())
    if dist.get_rank() == 0:
        mib = 2**20
        print(
            f"LLaMA-60M shape, {dist.get_world_size()} ranks (gloo, CPU, 1 thread each), rank {args.rank}, fp32, "
            f"torch {torch.__version__}; largest over ranks\n"
        )
        print(
            "| optimizer | state MiB per rank: sharded / one process (ratio) | plain step s: sharded / one "
            "process | refresh step s: sharded / one process |"
        )
        print("|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['optimizer']} | {r['sharded_state_bytes'] / mib:.1f} / {r['unsharded_state_bytes'] / mib:.1f} "
                f"({r['sharded_state_bytes'] / r['unsharded_state_bytes']:.3f}) | {r['sharded_step_s']:.3f} / "
                f"{r['unsharded_step_s']:.3f} | {r['sharded_refresh_s']:.2f} / {r['unsharded_refresh_s']:.2f} |"
            )
        print("\nBytes each rank sends per optimizer step (MiB): measured (predicted from shapes)\n")
        print("| optimizer | plain step | refresh step | naive: gather every gradient |")
        print("|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['optimizer']} | {r['step_bytes'] / mib:.3f} ({r['predicted_step_bytes'] / mib:.3f}) | "
                f"{r['refresh_bytes'] / mib:.2f} ({r['predicted_refresh_bytes'] / mib:.2f}) | "
                f"{r['naive_bytes'] / mib:.1f} |"
            )
        print("\nLLaMA-7B shape, rank 1024, predicted from shapes (MiB each rank sends)\n")
        print("| optimizer | plain step | refresh step | naive: gather every gradient |")
        print("|---|---|---|---|")
        for r in big:
            print(
                f"| {r['optimizer']} | {r['step_bytes'] / mib:.1f} | {r['refresh_bytes'] / mib:.0f} | "
                f"{r['naive_bytes'] / mib:.0f} |"
            )
        print(
            "\nLeft projections (R = P^T G, r x n): the rule's state of R per rank with R's rows split over the "
            "ranks or kept whole on every rank, the bytes the gather of the split update adds per step "
            "(MiB, from shapes), and the choice\n"
        )
        print("| shape | optimizer | state of R split / whole per rank | gather of the update per step | split |")
        print("|---|---|---|---|---|")
        for label, table in (("60M", rows), ("7B", big)):
            for r in table:
                split = r["left_split"]
                if split["replicated_state"]:
                    print(
                        f"| {label} | {r['optimizer']} | {split['split_state'] / mib:.1f} / "
                        f"{split['replicated_state'] / mib:.1f} | {split['gather_bytes'] / mib:.1f} | "
                        f"{'yes' if split['split'] else 'no'} |"
                    )
        write_json(args.json, {"llama_60m": rows, "llama_7b": big, "world": dist.get_world_size()})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
