"""Bytes a rank sends through the optimizers' collectives under FSDP2, predicted from the param
groups' shapes and parts alone (what :mod:`lowmem_optim.sharding`'s collectives carry, fp32),
under ring algorithms: an all-reduce of B bytes sends 2 (w-1)/w B, an all-gather (w-1)/w B.
:func:`lowmem_optim.sharding.count_traffic` counts the same bytes in a run."""

from __future__ import annotations

from typing import Any

import torch

from lowmem_optim.engine import splits_projected_rows
from lowmem_optim.projection.base import projection_sides
from lowmem_optim.rules import RULES
from lowmem_optim.shapes import matrix_shape


def ring_bytes(op: str, nbytes: float, world: int) -> float:
    """Bytes one rank sends in an ``"all_reduce"`` or ``"all_gather"`` of ``nbytes``."""
    return (2 if op == "all_reduce" else 1) * (world - 1) / world * nbytes


def _projected(group: dict[str, Any], p: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int] | None, bool]:
    """``p``'s matrix shape, the shape of its projected gradient (None: not projected) and
    whether the projection is on the left (R = P^T G)."""
    shape = matrix_shape(p) if p.dim() >= 2 else (p.shape[0], 1)
    rank = group.get("rank")
    if rank is None or rank >= min(shape):
        return shape, None, False
    left, right = projection_sides(shape, group["proj_type"])
    low = (rank, rank) if left and right else (rank, shape[1]) if left else (shape[0], rank)
    return shape, low, left


def predicted_bytes(optimizer: torch.optim.Optimizer, world: int) -> tuple[float, float]:
    """(bytes per step without a refresh, bytes per refresh step) one rank sends."""
    step = refresh = 0.0
    for group in optimizer.param_groups:
        rule = group["rule"]
        for p in group["params"]:
            (m, n), low, left = _projected(group, p)
            if low is None:
                step += _rule_bytes(rule, group, (m, n), True, p.dim(), world)
                continue
            low_bytes = 4 * low[0] * low[1]
            split = left and splits_projected_rows(RULES[rule](), group, (m, n), p.dtype, world)
            if left:  # P^T G all-reduced; where split, the rule's update of each rank's rows of it gathered
                step += ring_bytes("all_reduce", low_bytes, world)
            if split:
                step += ring_bytes("all_gather", low_bytes, world)
            refresh += ring_bytes("all_reduce", 4, world)  # is the gradient all-zero (on some rank)?
            if group["proj_method"] == "dct" and not left:
                refresh += ring_bytes("all_reduce", 4 * n, world)  # the column scores
            else:
                refresh += ring_bytes("all_gather", 4 * m * n, world)
            if group["proj_method"] == "dct" and left:  # R is read from the gathered spectrum
                refresh -= ring_bytes("all_reduce", low_bytes, world)
            # sharded rows: the weight's (right) or a block of R's (left, split)
            step += _rule_bytes(rule, group, low, split or not left, p.dim(), world)
    return step, step + refresh


def _rule_bytes(
    rule: str, group: dict[str, Any], shape: tuple[int, int], rows_sharded: bool, dim: int, world: int
) -> float:
    """Bytes a rule's reductions send for a tensor of ``shape`` (its rows sharded or whole)."""
    if rule == "adafactor":
        param_rms = 4 if group["scale_parameter"] else 0
        if not rows_sharded:
            return ring_bytes("all_reduce", param_rms, world)
        stats = 4 * (shape[1] + 1) if dim >= 2 else 0  # column statistic, mean of the row statistic
        return ring_bytes("all_reduce", stats + 4 + param_rms, world)  # and RMS(update)
    if not rows_sharded:
        return 0.0
    if rule == "auon":
        return ring_bytes("all_reduce", 8, world)  # ||X||_F and the mean of cosh^2
    if rule in ("muon", "hybrid_auon"):
        return ring_bytes("all_gather", 4 * shape[0] * shape[1], world)
    return 0.0


def left_split(optimizer: torch.optim.Optimizer, world: int) -> dict[str, Any]:
    """What splitting R = P^T G by rows for the rule costs and saves against every rank keeping
    its moments whole: the moments' bytes per rank either way, the bytes the gather of the update
    adds per step, and whether the optimizer splits (:func:`splits_projected_rows`)."""
    out: dict[str, Any] = {"split_state": 0.0, "replicated_state": 0.0, "gather_bytes": 0.0, "split": False}
    for group in optimizer.param_groups:
        rule = RULES[group["rule"]]()
        for p in group["params"]:
            shape, low, left = _projected(group, p)
            if low is None or not left:
                continue
            out["replicated_state"] += rule.state_bytes(low, p.dtype, group)
            out["split_state"] += rule.state_bytes((-(-low[0] // world), low[1]), p.dtype, group)
            out["gather_bytes"] += ring_bytes("all_gather", 4 * low[0] * low[1], world)
            out["split"] = splits_projected_rows(rule, group, shape, p.dtype, world)
    return out


def gather_every_gradient_bytes(model: torch.nn.Module, world: int) -> float:
    """The naive way: every fp32 gradient gathered whole on every rank each step."""
    return ring_bytes("all_gather", 4 * sum(p.numel() for p in model.parameters()), world)
