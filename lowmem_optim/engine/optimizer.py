"""The optimizer class: param groups validated from the parts' declarations, ``step`` over all
parameters and ``step_param`` over one (the per-parameter machinery: :mod:`.param_step`)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from lowmem_optim.engine.declarations import GROUP_FIELDS, Parts, group_parts
from lowmem_optim.engine.index import ParamEntry, ParamIndex
from lowmem_optim.engine.param_step import (
    ParamStep,
    finish_full_rank,
    finish_projected,
    next_step,
    open_step,
    refresh_if_due,
)
from lowmem_optim.engine.split_step import SplitStep
from lowmem_optim.engine.state_fit import check_state_fits
from lowmem_optim.engine.state_io import check_same_layout, restore_declared_placement
from lowmem_optim.engine.statistics import layer_stats, state_bytes
from lowmem_optim.engine.validation import check_choices, chosen_defaults, hparams_doc, param_label, validate_group
from lowmem_optim.finite import all_finite
from lowmem_optim.parts import invalid
from lowmem_optim.projection.feedback import load_error, store_error
from lowmem_optim.shapes import is_lowrank_group, matrix_shape, uses_projection
from lowmem_optim.sharding import row_shard

logger = logging.getLogger("lowmem_optim.engine")

#: a group's full-rank parameters that its rule steps in one call: (parameter, gradient, index)
Batch = list[tuple[torch.Tensor, torch.Tensor, int]]


class ComposedOptimizer(SplitStep, torch.optim.Optimizer):
    """The optimizer loop over a rule, a projector and a refresh schedule per param group (see
    :mod:`lowmem_optim.engine`): the base of every optimizer of the package, low-rank or not.

    ``defaults`` may hold any key of the engine (:data:`ENGINE_HPARAMS`) and of the parts it
    names; the parts' declarations fill every key not given, in ``defaults`` and in each param
    group (a group that names other parts gets their declared defaults). A key that neither the
    engine nor the named parts declare is refused. A named optimizer subclass sets
    ``part_choices`` (per part key, the parts its groups may name, the first being its default;
    one choice fixes that part) and ``named_defaults`` (its own defaults, over the declarations).
    """

    #: per part key (``rule``, ``proj_method``, ``refresh``), the allowed parts, the first the default
    part_choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: this optimizer's defaults over the parts' declarations
    named_defaults: ClassVar[dict[str, Any]] = {}
    #: the name :mod:`lowmem_optim.registry` lists this class under (None: not registered)
    registry_name: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__doc__ = f"{inspect.cleandoc(cls.__doc__ or '')}\n\n{hparams_doc(cls)}"

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._warned_full_rank: set[int] = set()
        self._index = ParamIndex([])
        chosen = {**chosen_defaults(type(self)), **defaults}
        check_choices(type(self), chosen)
        allowed = group_parts(chosen).hparams()
        unknown = sorted(set(defaults) - allowed.keys())
        if unknown:
            raise invalid(
                f"hyperparameter{'s' if len(unknown) > 1 else ''} of {type(self).__name__}",
                ", ".join(unknown),
                ", ".join(allowed),
            )
        super().__init__(params, {**{n: hp.default for n, hp in allowed.items()}, **chosen})

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also how ``load_state_dict``, ``deepcopy`` and unpickling set the groups: the index follows."""
        super().__setstate__(state)
        self.__dict__.setdefault("_warned_full_rank", set())
        self._index = ParamIndex(self.param_groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        given = set(param_group) - GROUP_FIELDS
        super().add_param_group(param_group)
        try:
            validate_group(type(self), self.param_groups[-1], given)
        except Exception:
            self.param_groups.pop()
            raise
        self._index = ParamIndex(self.param_groups)

    def _entry(self, param: torch.Tensor, caller: str) -> ParamEntry:
        """Where ``param`` sits (KeyError naming ``caller`` if it is not a parameter here)."""
        entry = self._index.entry(param, self.param_groups)
        if entry is None:  # not indexed, or its group was popped since: rebuild, then look again
            self._index = ParamIndex(self.param_groups)
            entry = self._index.entry(param, self.param_groups)
            if entry is None:
                raise KeyError(f"{caller}: the tensor is not a parameter of this optimizer")
        return entry

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
        due = [
            (p, p.grad, self._entry(p, "step"))
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        self._check_refresh_gradients(due)
        batches: dict[int, tuple[dict[str, Any], Parts, Batch]] = {}
        for p, grad, entry in due:
            if self._rule_steps_with_group(p, grad, entry):  # a group's full-rank parameters, in one call
                batches.setdefault(id(entry.group), (entry.group, entry.parts, []))[2].append((p, grad, entry.index))
            else:
                self._step_one(p, grad, entry)
        for group, parts, batch in batches.values():
            self._step_batch_by_rule(group, parts, batch)
        return loss

    @torch.compiler.disable
    @torch.no_grad()
    def step_param(self, param: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Update one parameter (with ``grad``, default ``param.grad``): the step of layer-wise
        training, run from a gradient hook. Same result as that parameter's share of ``step``."""
        entry = self._entry(param, "step_param")
        g = param.grad if grad is None else grad
        if g is not None:
            self._check_refresh_gradients([(param, g, entry)])
            self._step_one(param, g, entry)

    def _check_refresh_gradients(self, updates: list[tuple[torch.Tensor, torch.Tensor, ParamEntry]]) -> None:
        """FloatingPointError naming the parameter, before anything is updated, when a gradient
        whose subspace refresh is due this step is not finite: a step that raises leaves every
        parameter and its state as they were. One host sync, on refresh steps only."""
        checks = []
        for p, grad, entry in updates:
            if not entry.projected:
                continue
            state = self.state.get(p, {})
            if entry.parts.schedule.due(state, next_step(state)):
                shard = row_shard(p, f"parameter {entry.index}")
                checks.append((entry, shard, all_finite(grad if shard is None else grad.to_local())))
        if not checks:
            return
        finite = bool(torch.stack([c[-1] for c in checks]).all())  # the one host read
        shard = next((c[1] for c in checks if c[1] is not None), None)
        if finite if shard is None else not shard.any(not finite):  # every rank agrees (FSDP2 shards)
            return
        entry = next((c[0] for c in checks if not bool(c[-1])), checks[0][0])  # the failure path only
        where = "" if not finite else " (on another rank)"
        raise FloatingPointError(
            f"{type(self).__name__}: the gradient of {param_label(entry.group, entry.position, entry.param)}{where} "
            "holds inf/NaN at a subspace refresh; nothing was updated (use torch.amp.GradScaler, which skips "
            "such steps, or clip gradients)"
        )

    @staticmethod
    def _rule_steps_with_group(p: torch.Tensor, grad: torch.Tensor, entry: ParamEntry) -> bool:
        """Whether the rule steps this full-rank parameter itself, in one call with the group's
        others that it accepts (:meth:`lowmem_optim.parts.Part.step_in_place`)."""
        return not entry.projected and entry.parts.rule.can_step_in_place(p, grad)

    def _step_batch_by_rule(self, group: dict[str, Any], parts: Parts, batch: Batch) -> None:
        """The rule's whole step of these parameters of ``group``, in one call (it advances the counters)."""
        states = [self._state(p, group, index) for p, _, index in batch]
        parts.rule.step_in_place([p for p, _, _ in batch], [g for _, g, _ in batch], states, group)

    def _step_one(self, p: torch.Tensor, grad: torch.Tensor, entry: ParamEntry) -> None:
        """One parameter's step: its rule on the full gradient, or in the subspace (with the error
        feedback A = G + E: the selection and the projection see what was left out before)."""
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if self._rule_steps_with_group(p, grad, entry):
            self._step_batch_by_rule(entry.group, entry.parts, [(p, grad, entry.index)])
            return
        s = self._advance(entry)
        if not s.projected:
            finish_full_rank(s, grad)
            return
        g = s.matrix(grad)
        feedback = entry.group["error_feedback"]
        if feedback is not None:
            accumulated = load_error(s.view, g) + g
            g = accumulated.to(g.dtype)
        refresh_if_due(s, g)
        low = s.parts.projector.project(g, s.view, s.shard)
        if feedback is not None:
            store_error(s.view, accumulated - s.parts.projector.back_project(low, s.view, s.shard), feedback)
        finish_projected(s, low, g)

    def _advance(self, entry: ParamEntry) -> ParamStep:
        """The parameter's step counter advanced, and its step opened."""
        state = self._state(entry.param, entry.group, entry.index)
        state["step"] += 1
        return open_step(state, entry)

    def _state(self, p: torch.Tensor, group: dict[str, Any], index: int) -> dict[str, Any]:
        """The parameter's state; on the first step, its counter (a float32 CPU tensor, as
        torch's) and the staggered schedule's slot."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            self._warn_if_full_rank(p, group, index)
            if group.get("stagger") and uses_projection(p, group):
                state["refresh_slot"] = self._entry(p, "step").slot
        return state

    def _warn_if_full_rank(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        if is_lowrank_group(group) and not uses_projection(p, group) and index not in self._warned_full_rank:
            self._warned_full_rank.add(index)
            logger.warning(
                "parameter %d (shape %s): rank %d >= min%s, so it is updated full-rank (a projection saves nothing)",
                index,
                tuple(p.shape),
                group["rank"],
                matrix_shape(p),
            )

    # ---- state ----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts every floating tensor of a floating parameter's state to the parameter's
        dtype; here integer codes/indices keep theirs, and so do the keys that the group's own
        parts declare fixed (:meth:`lowmem_optim.parts.Part.fixed_dtype_keys`: float32 scales
        and statistics, Adam's float32 moments of a float16 parameter). A saved group that
        lacks a key of its parts gets the declared default. Keys the parts keep on the host
        (:meth:`lowmem_optim.parts.Part.host_keys`: basis metadata, similarity queues) stay on the
        CPU, as torch keeps ``step`` there: reading them back from a GPU every update would stall it.

        A state dict of another optimizer or layout is refused (ValueError naming the group and
        key) before anything is loaded: the group count, and per group the keys that choose the
        algorithm and the state's layout must match: ``rule``, ``proj_method``, ``refresh``,
        ``rank`` and every key the group's projector, basis storage, schedule and update form declare. The
        rule's keys (lr, betas, eps, weight decay, ...) and ``scale`` follow the state dict,
        as in torch. So is a parameter's state of another shape (:mod:`lowmem_optim.engine.state_fit`)."""
        check_same_layout(self, state_dict)
        check_state_fits(
            f"{type(self).__name__}.load_state_dict",
            self.param_groups,
            state_dict,
            lambda p, group: group["rank"] if uses_projection(p, group) else None,
            param_label,
        )
        super().load_state_dict(state_dict)  # new group dicts, through __setstate__: the index is rebuilt
        restore_declared_placement(self, state_dict)

    def layer_stats(self) -> list[dict[str, Any]]:
        """Per low-rank parameter: name, shape, rank, side, refreshes, gap, last similarity and
        state bytes, for logging (one dict each, in parameter order)."""
        return layer_stats(self)

    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state (moments, projections, codes, scales)."""
        return sum(state_bytes(s) for s in self.state.values())
