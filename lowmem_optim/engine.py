"""The engine: one optimizer loop that composes a projector, an inner rule and a refresh schedule.

For a parameter W in a group with ``rank`` (a low-rank group), with gradient G viewed as a
matrix (m x n; N-D weights as (shape[0], -1)), at step t:

    1. schedule:  refresh due at t?  then  projector.refresh(G) -> new subspace in state,
                  schedule.record(...), rule.carry(...) (how moments enter the new subspace)
    2. projector: R = project(G)                  (r x n, m x r or r x r)
    3. rule:      N, lr_t = update(R)             (Adam, Adafactor, 8-bit Adam, ...)
    4. engine:    W <- W (1 - lr_t wd);  W <- W - scale * back_project(N)

Groups without ``rank`` skip 1, 2 and the back-projection: the rule on the full gradient (for
the Adam rule, exactly ``torch.optim.AdamW``). Which parts a group uses is named by its
``rule``, ``proj_method`` and ``refresh`` keys, looked up in the registries of
:mod:`lowmem_optim.rules`, :mod:`lowmem_optim.projection` and :mod:`lowmem_optim.schedules`;
the named optimizers in :mod:`lowmem_optim.optimizers` only choose defaults.

State is data: every per-parameter entry is a tensor or a plain number, so ``state_dict`` needs
no custom code beyond keeping integer codes and fixed-precision keys out of torch's
cast-to-param-dtype on load.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from lowmem_optim.projection import PROJECTORS
from lowmem_optim.projection.feedback import FEEDBACK_KEYS, load_error, store_error, validate_error_feedback
from lowmem_optim.projection.base import projection_sides
from lowmem_optim.rules import RULES
from lowmem_optim.schedules import SCHEDULES

logger = logging.getLogger(__name__)

#: hyperparameters every low-rank group carries, with galore-torch's names and defaults
LOWRANK_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "proj_method": "svd",
    "refresh": "fixed",
    "seed": 0,
    "error_feedback": None,
}


@dataclass(frozen=True)
class Parts:
    rule: Any
    projector: Any
    schedule: Any


def _lookup(registry: dict[str, type], key: str, value: Any) -> Any:
    if value not in registry:
        raise ValueError(f"Invalid {key}: {value!r} (allowed: {', '.join(sorted(registry))})")
    return registry[value]()


def group_parts(group: dict[str, Any]) -> Parts:
    """The parts a param group names."""
    return Parts(
        rule=_lookup(RULES, "rule", group["rule"]),
        projector=_lookup(PROJECTORS, "proj_method", group["proj_method"]),
        schedule=_lookup(SCHEDULES, "refresh", group["refresh"]),
    )


def is_lowrank_group(group: dict[str, Any]) -> bool:
    return group.get("rank") is not None


def matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """The matrix a weight is projected as: (out, everything else), like conv weights in Muon."""
    return (param.shape[0], math.prod(param.shape[1:]))


def uses_projection(param: torch.Tensor, group: dict[str, Any]) -> bool:
    """A low-rank group's parameter is projected unless the rank saves nothing."""
    return is_lowrank_group(group) and group["rank"] < min(matrix_shape(param))


def _param_label(group: dict[str, Any], i: int, p: torch.Tensor) -> str:
    names = group.get("param_names")
    name = f"{names[i]!r} " if names else ""
    return f"parameter {name}(index {i} in its group, shape {tuple(p.shape)})"


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(p, DTensor)


def _refresh_seed(seed: int, index: int, step: int) -> int:
    """A seed per (group seed, parameter, step): the same on every rank, resume and hook order."""
    return ((seed * 1_000_003 + index) * 1_000_033 + step) % (2**63 - 1)


class LowRankOptimizer(torch.optim.Optimizer):
    """Base class of every optimizer in the package; see the module docstring for the step."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._warned_full_rank: set[int] = set()
        super().__init__(params, defaults)

    # ---- param groups -------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        parts = group_parts(group)
        parts.rule.validate(group)
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(f"{_param_label(group, i, p)} is complex; complex parameters are not supported")
        if not is_lowrank_group(group):
            return
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Invalid rank: {rank!r} (allowed: an int >= 1, or no 'rank' for a full-rank group)")
        scale = group["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"Invalid scale: {scale!r} (allowed: a finite number > 0)")
        parts.projector.validate(group)
        parts.schedule.validate(group)
        validate_error_feedback(group)
        for i, p in enumerate(group["params"]):
            if p.dim() < 2:
                raise ValueError(
                    f"{_param_label(group, i, p)} is {p.dim()}-D but sits in a group with rank={rank}: "
                    "low-rank projection needs a matrix; put biases, norms and other 1-D parameters "
                    "in a group without 'rank' (lowmem_optim.lowrank_param_groups does this)"
                )
            if _is_dtensor(p):
                raise ValueError(
                    f"{_param_label(group, i, p)} is a sharded DTensor (FSDP2) in a group with rank={rank}: "
                    f"proj_method={group['proj_method']!r} needs the whole matrix on each rank, which this "
                    "optimizer does not gather; keep low-rank parameters unsharded or use DDP"
                )

    # ---- the step -----------------------------------------------------------------------
    # torch.compile runs the step eagerly: traced by Dynamo (torch 2.13) it graph-breaks at each
    # host read of the step counter and re-traces per parameter, and the result was wrong (the
    # counter advanced twice on the second call)
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            parts = group_parts(group)
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group, parts, index)
                index += 1
        return loss

    @torch.compiler.disable
    @torch.no_grad()
    def step_param(self, param: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Update one parameter (with ``grad``, default ``param.grad``): the step of layer-wise
        training, run from a gradient hook. Same result as that parameter's share of ``step``."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p is param:
                    g = param.grad if grad is None else grad
                    if g is not None:
                        self._update(p, g, group, group_parts(group), index)
                    return
                index += 1
        raise KeyError("step_param: the tensor is not a parameter of this optimizer")

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], parts: Parts, index: int) -> None:
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            self._warn_if_full_rank(p, group, index)
        state["step"] += 1
        step = int(state["step"])
        if not uses_projection(p, group):
            update, lr_t = parts.rule.update(grad, state, group, p)
            self._apply_update(p, update, 1.0, group, lr_t, index, step)
            return
        g = grad.reshape(matrix_shape(p))
        feedback = group["error_feedback"]
        if feedback is not None:
            accumulated = load_error(state, g) + g
            g = accumulated.to(g.dtype)
        if parts.schedule.due(state, step):
            change = parts.projector.refresh(g, state, group, _refresh_seed(group["seed"], index, step))
            parts.schedule.record(state, step, group, change.similarity)
            if not g.any():
                # an all-zero gradient holds no subspace (torch.distributed.checkpoint initializes
                # empty state with one): the state now has its layout, the next gradient chooses
                state["next_refresh"] = step + 1
            left, _ = projection_sides(matrix_shape(p), group["proj_type"])
            parts.rule.carry(state, change, 0 if left else 1)
        low = parts.projector.project(g, state)
        if feedback is not None:
            store_error(state, accumulated - parts.projector.back_project(low, state), feedback)
        update, lr_t = parts.rule.update(low, state, group, p)
        full = parts.projector.back_project(update, state)
        self._apply_update(p, full.view(p.shape), group["scale"], group, lr_t, index, step)

    @staticmethod
    def _apply_update(p: torch.Tensor, update: torch.Tensor, alpha: float, group: dict[str, Any], lr_t: float,
                      index: int, step: int) -> None:
        """W <- W (1 - lr_t wd) - alpha * update. A parameter that stores its values itself
        (an INT8 weight, :mod:`lowmem_optim.quant.int8_linear`) does both in its ``apply_update``,
        with random rounding draws seeded per (seed, parameter, step)."""
        apply_update = getattr(p, "apply_update", None)
        if apply_update is not None:
            apply_update(update, alpha=alpha, decay=1 - lr_t * group["weight_decay"],
                         seed=_refresh_seed(group.get("seed", 0), index, step))
            return
        if group["weight_decay"] != 0:
            p.mul_(1 - lr_t * group["weight_decay"])
        p.sub_(update, alpha=alpha)

    def _warn_if_full_rank(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        if is_lowrank_group(group) and not uses_projection(p, group) and index not in self._warned_full_rank:
            self._warned_full_rank.add(index)
            logger.warning(
                "parameter %d (shape %s): rank %d >= min%s, so it is updated full-rank (a projection saves nothing)",
                index, tuple(p.shape), group["rank"], matrix_shape(p),
            )

    # ---- state ----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts every tensor of a floating parameter's state to the parameter's dtype;
        integer codes/indices, float32 scales, and the float32 moments kept for float16
        parameters (see :mod:`lowmem_optim.rules.adam`) keep their saved dtype."""
        super().load_state_dict(state_dict)
        parts = (*RULES.values(), *PROJECTORS.values(), *SCHEDULES.values())
        fixed = set(chain.from_iterable(cls.fixed_dtype_keys for cls in parts)) | FEEDBACK_KEYS
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                keep = not value.is_floating_point() or key in fixed or (
                    value.dtype == torch.float32 and p.dtype == torch.float16
                ) if torch.is_tensor(value) else False
                if keep and key != "step":
                    self.state[p][key] = value.to(device=p.device)

    def layer_stats(self) -> list[dict[str, Any]]:
        """Per low-rank parameter: name, shape, rank, side, refreshes, gap, last similarity and
        state bytes, for logging (one dict each, in parameter order)."""
        stats = []
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            parts = group_parts(group) if is_lowrank_group(group) else None
            for i, p in enumerate(group["params"]):
                if parts is not None:
                    state = self.state.get(p, {})
                    projected = uses_projection(p, group)
                    left, right = projection_sides(matrix_shape(p), group["proj_type"]) if projected else (False, False)
                    stats.append({
                        "index": index,
                        "name": names[i] if names else f"param{index}",
                        "shape": tuple(p.shape),
                        "rank": group["rank"] if projected else None,
                        "side": {(True, False): "left", (False, True): "right", (True, True): "both"}.get((left, right), "full-rank"),
                        "refreshes": state.get("refreshes", 0),
                        "gap": parts.schedule.gap(state, group) if projected else None,
                        "last_similarity": _measured(state.get("last_similarity")),
                        "state_bytes": _state_bytes(state),
                    })
                index += 1
        return stats

    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state (moments, projections, codes, scales)."""
        return sum(_state_bytes(s) for s in self.state.values())


def _measured(similarity: float | None) -> float | None:
    """None until a similarity was measured (schedules store NaN before, to keep the key)."""
    return None if similarity is None or math.isnan(similarity) else similarity


def _state_bytes(state: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
