"""One parameter's step: open its state (this rank's rows of a sharded parameter), refresh the
subspace when due, run the rule, back-project, and apply the update with decoupled decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowmem_optim.engine.declarations import Parts
from lowmem_optim.engine.index import ParamEntry
from lowmem_optim.engine.sharding_policy import rule_rows
from lowmem_optim.projection.base import projection_sides
from lowmem_optim.projection.feedback import SHARDED_LAYOUT
from lowmem_optim.shapes import matrix_shape
from lowmem_optim.sharding import Placed, RowShard, local_view, row_shard, store
from lowmem_optim.update_forms import LowRankStep


def next_step(state: dict[str, Any]) -> int:
    """The number of the parameter's next step: 1 before its first."""
    return int(state["step"]) + 1 if "step" in state else 1


def refresh_seed(seed: int, index: int, step: int) -> int:
    """A seed per (group seed, parameter, step): the same on every rank, resume and hook order."""
    return ((seed * 1_000_003 + index) * 1_000_033 + step) % (2**63 - 1)


#: mixes a stream number into a step's seed (the 64-bit golden ratio: odd, so two streams never
#: give one seed)
_STREAM_MIX = 0x9E37_79B9_7F4A_7C15
#: the stream of a rule's own draws (stochastic rounding of its state), apart from stream 0 (the
#: refresh's and an INT8 weight's rounding) and 1, 2, ... (low-rank accumulation's micro-batches)
RULE_STREAM = -1


def stream_seed(seed: int, index: int, step: int, stream: int) -> int:
    """:func:`refresh_seed` of one stream of draws, so draws of one step that serve different
    ends are independent (the same counters of one seed would give them the same values)."""
    return refresh_seed(seed, index, step) ^ (stream * _STREAM_MIX % 2**63)


def back_projection_dtype(param: torch.Tensor, update: torch.Tensor) -> torch.dtype:
    """The dtype of P N: the weight's for bfloat16 weights (and INT8 weights that compute in
    bfloat16), so the m x n product runs on bf16 tensor cores and no float32 m x n update exists
    (the INT8 re-quantization still adds it in float32, in registers); the rule's otherwise
    (float32 weights; float16, whose range would clip large updates)."""
    return torch.bfloat16 if param.dtype == torch.bfloat16 else update.dtype


@dataclass
class ParamStep:
    """One parameter's step in progress (:func:`open_step`)."""

    param: torch.Tensor
    group: dict[str, Any]
    parts: Parts
    index: int
    step: int
    state: dict[str, Any]  # the parameter's state as stored
    shard: RowShard | None
    target: torch.Tensor  # what the update is applied to: the parameter, or its local rows
    view: dict[str, Any]  # the state as the parts see it on this rank
    placed: tuple[Placed, ...]  # which state entries have which rows (lowmem_optim.sharding)
    rule_shard: RowShard | None  # the rows the rule sees: the weight's (G Q), a block of R's (P^T G), or None
    projected: bool
    sides: tuple[bool, bool]  # projected from the left (P^T G), from the right (G Q)

    @property
    def left(self) -> bool:
        return self.sides[0]

    def rule_seed(self) -> int:
        """The seed of the rule's draws at this step (:data:`RULE_STREAM`)."""
        return stream_seed(self.group["seed"], self.index, self.step, RULE_STREAM)

    def matrix(self, grad: torch.Tensor) -> torch.Tensor:
        """This rank's gradient as the projected matrix (m x n)."""
        local = grad if self.shard is None else grad.to_local()
        return local.reshape(-1, matrix_shape(self.param)[1])


def open_step(state: dict[str, Any], entry: ParamEntry) -> ParamStep:
    """The step in progress of ``entry``'s parameter (its counter already advanced): an
    FSDP2-sharded parameter is stepped on this rank's rows (lowmem_optim.sharding), its state
    seen through their view."""
    p, group, parts = entry.param, entry.group, entry.parts
    shard = row_shard(p, f"parameter {entry.index}")
    target = p if shard is None else p.to_local()
    projected = entry.projected
    sides = projection_sides(matrix_shape(p), group["proj_type"]) if projected else (False, False)
    left = sides[0]
    # the feedback buffer E and P have the rows of G; the rule's state the rows it sees
    rule_shard = rule_rows(shard, parts.rule, group, matrix_shape(p), p.dtype, left)
    placed = ((rule_shard, parts.rule.sharded_layout(2 if projected else p.dim())),)
    if projected:
        placed += ((shard, parts.projector.sharded_layout(2) | SHARDED_LAYOUT),)
    view = local_view(state, *placed)
    return ParamStep(
        p,
        group,
        parts,
        entry.index,
        int(state["step"]),
        state,
        shard,
        target,
        view,
        placed,
        rule_shard,
        projected,
        sides,
    )


def refresh_if_due(s: ParamStep, g: torch.Tensor) -> None:
    """Choose the subspace from ``g`` when the schedule says so; the rule's moments follow."""
    if not s.parts.schedule.due(s.view, s.step):
        return
    change = s.parts.projector.refresh(g, s.view, s.group, refresh_seed(s.group["seed"], s.index, s.step), s.shard)
    s.parts.schedule.record(s.view, s.step, s.group, change.similarity)
    if not (g.any() if s.shard is None else s.shard.any(bool(g.any()))):
        # an all-zero gradient holds no subspace (torch.distributed.checkpoint initializes
        # empty state with one): the state now has its layout, the next gradient chooses
        s.parts.schedule.defer(s.view, s.step)
    s.parts.rule.carry(s.view, change, 0 if s.left else 1, s.rule_shard)


def finish_projected(s: ParamStep, low: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    """N = rule(R); U = the group's update form of N (``back_project(N)`` by default; ``grad``, the
    matrix G, for the forms that scale it: :mod:`lowmem_optim.update_forms`);
    W <- W (1 - lr_t wd) - scale * U."""
    if s.rule_shard is s.shard or s.rule_shard is None:
        update, lr_t = s.parts.rule.update(low, s.view, s.group, s.param, s.rule_shard, seed=s.rule_seed())
    else:  # this rank's block of the rows of R = P^T G, the update gathered whole
        rows = s.rule_shard
        update, lr_t = s.parts.rule.update(
            low[rows.start : rows.stop], s.view, s.group, s.param, rows, seed=s.rule_seed()
        )
        update = rows.gather_rows(update)
    step = LowRankStep(grad, low, update, lr_t, s.sides, s.shard, back_projection_dtype(s.param, update))
    full = s.parts.form.update(step, lambda t: s.parts.projector.back_project(t, s.view, s.shard), s.view, s.group)
    store(s.state, s.view, *s.placed)
    apply_update(s.target, full.view(s.target.shape), s.group["scale"], s.group, lr_t, s.index, s.step)


def finish_full_rank(s: ParamStep, grad: torch.Tensor) -> None:
    """N = rule(G); W <- W (1 - lr_t wd) - N."""
    local_grad = grad if s.shard is None else grad.to_local()
    update, lr_t = s.parts.rule.update(local_grad, s.view, s.group, s.param, s.shard, seed=s.rule_seed())
    store(s.state, s.view, *s.placed)
    apply_update(s.target, update, 1.0, s.group, lr_t, s.index, s.step)


def apply_update(
    p: torch.Tensor,
    update: torch.Tensor,
    alpha: float,
    group: dict[str, Any],
    lr_t: float | torch.Tensor,
    index: int,
    step: int,
) -> None:
    """W <- W (1 - lr_t wd) - alpha * update. A parameter that stores its values itself
    (an INT8 weight, :mod:`lowmem_optim.quant.int8_linear`) does both in its ``apply_update``,
    with random rounding draws seeded per (seed, parameter, step). ``lr_t`` may be a 0-D
    tensor on the device (Adafactor's relative step): then, on a GPU, the factor 1 - lr_t wd
    is rounded to a bfloat16 or float16 weight's dtype, which changes nothing for
    lr_t wd < 2^-9 (bfloat16)."""
    self_stored = getattr(p, "apply_update", None)
    if self_stored is not None:
        self_stored(
            update,
            alpha=alpha,
            decay=1 - lr_t * group["weight_decay"],
            seed=refresh_seed(group.get("seed", 0), index, step),
        )
        return
    if group["weight_decay"] != 0:
        p.mul_(1 - lr_t * group["weight_decay"])
    p.sub_(update, alpha=alpha)
