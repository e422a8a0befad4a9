"""The engine: one optimizer loop that composes a projector, an inner rule and a refresh schedule.

For a parameter W in a group with ``rank`` (a low-rank group), with gradient G viewed as a
matrix (m x n; N-D weights as (shape[0], -1)), at step t:

    1. schedule:  refresh due at t?  then  projector.refresh(G) -> new subspace in state,
                  schedule.record(...), rule.carry(...) (how moments enter the new subspace)
    2. projector: R = project(G)                  (r x n, m x r or r x r)
    3. rule:      N, lr_t = update(R)             (Adam, Adafactor, 8-bit Adam, ...)
    4. engine:    W <- W (1 - lr_t wd);  W <- W - scale * back_project(N)
                  (N in the weight's dtype first for bfloat16 weights: :func:`back_projection_dtype`)

With ``error_feedback`` (:mod:`lowmem_optim.projection.feedback`), steps 1 and 2 see
A = G + E instead of G, and E <- A - back_project(R) is kept for the next step.

Groups without ``rank`` skip 1, 2 and the back-projection: the rule on the full gradient (for
the Adam rule, exactly ``torch.optim.AdamW``). Which parts a group uses is named by its
``rule``, ``proj_method`` and ``refresh`` keys, looked up in the registries of
:mod:`lowmem_optim.rules`, :mod:`lowmem_optim.projection` and :mod:`lowmem_optim.schedules`.
Every other key is declared by the part that reads it (:mod:`lowmem_optim.parts`), and the
engine validates a group and fills its defaults from those declarations; the named
optimizers in :mod:`lowmem_optim.optimizers` only choose parts and defaults.

State is data: every per-parameter entry is a tensor or a plain number, so ``state_dict`` needs
no custom code beyond keeping integer codes and fixed-precision keys out of torch's
cast-to-param-dtype on load.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar

import torch

from lowmem_optim.parts import HParam, Part, declared, integer, invalid, number, one_of, optional
from lowmem_optim.projection import PROJECTORS
from lowmem_optim.projection.base import projected_shape, projection_sides
from lowmem_optim.projection.feedback import ERROR_FEEDBACK, FEEDBACK_KEYS, SHARDED_LAYOUT, load_error, store_error
from lowmem_optim.rules import RULES
from lowmem_optim.schedules import SCHEDULES
from lowmem_optim.sharding import Placed, local_bytes, local_view, row_shard, store

logger = logging.getLogger(__name__)

#: the group keys that choose a part, and the registry each chooses from
SELECTORS: dict[str, dict[str, type]] = {"rule": RULES, "proj_method": PROJECTORS, "refresh": SCHEDULES}

#: the engine's own group keys (each part declares the keys it reads)
ENGINE_HPARAMS: tuple[HParam, ...] = (
    HParam("rule", "adam", one_of(*RULES), "the inner update rule"),
    HParam("rank", None, optional(integer(1)), "subspace rank r; a group without it is updated full-rank"),
    HParam("scale", 0.25, number(0, low_open=True), "factor of the back-projected update"),
    HParam("proj_method", "svd", one_of(*PROJECTORS), "how the subspace is chosen"),
    HParam("refresh", "fixed", one_of(*SCHEDULES), "when the subspace is chosen again"),
    HParam("seed", 0, integer(0), "seed of every random draw (randomized SVD, stochastic rounding)"),
    HParam(
        "error_feedback",
        None,
        one_of(*ERROR_FEEDBACK),
        "carry the discarded part G - back_project(R) to the next gradient, its buffer in float32, 8 bits, "
        "4 bits (min-max) or NormalFloat 4 bits",
    ),
)
#: the engine's keys that only a low-rank group uses
_ENGINE_LOWRANK = ("rank", "scale", "proj_method", "refresh", "error_feedback")
#: group keys that are not hyperparameters: torch's own, the keys torch's LR schedulers keep in a
#: group (a scheduler resumed with ``last_epoch`` needs them there at construction), and a group's
#: ``name`` (PyTorch Lightning's LearningRateMonitor labels groups with it); carried untouched
_GROUP_FIELDS = frozenset(
    {"params", "param_names", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "name"}
)


@dataclass(frozen=True)
class Parts:
    """The parts a param group names (``storage``: the projector's, None if it stores no basis)."""

    rule: Any
    projector: Any
    schedule: Any

    @property
    def storage(self) -> Any:
        return self.projector.storage

    def all(self) -> tuple[Part, ...]:
        return tuple(p for p in (self.rule, self.projector, self.storage, self.schedule) if p is not None)

    def hparams(self) -> dict[str, HParam]:
        """Every key the group may carry: the rule's, the engine's and the other parts' declarations."""
        return {**declared([self.rule]), **{hp.name: hp for hp in ENGINE_HPARAMS}, **declared(self.all()[1:])}


def group_parts(group: dict[str, Any]) -> Parts:
    """The parts a param group names (ValueError listing the registered names otherwise)."""
    for key, registry in SELECTORS.items():
        if group[key] not in registry:
            raise invalid(key, group[key], ", ".join(sorted(registry)))
    return Parts(
        rule=RULES[group["rule"]](),
        projector=PROJECTORS[group["proj_method"]](),
        schedule=SCHEDULES[group["refresh"]](),
    )


def lowrank_hparams() -> dict[str, HParam]:
    """The keys of a low-rank group's setup: the engine's rank, scale and part choices, and every
    key a projector, basis storage or schedule declares (the first declaration of a name)."""
    parts = [cls() for registry in (PROJECTORS, SCHEDULES) for cls in registry.values()]
    storages = [p.storage for p in parts if getattr(p, "storage", None) is not None]
    out = {hp.name: hp for hp in ENGINE_HPARAMS if hp.name in _ENGINE_LOWRANK}
    for hp in (hp for part in (*parts, *storages) for hp in part.hparams):
        out.setdefault(hp.name, hp)
    return out


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


def back_projection_dtype(param: torch.Tensor, update: torch.Tensor) -> torch.dtype:
    """The dtype of P N: the weight's for bfloat16 weights (and INT8 weights that compute in
    bfloat16), so the m x n product runs on bf16 tensor cores and no float32 m x n update exists
    (the INT8 re-quantization still adds it in float32, in registers); the rule's otherwise
    (float32 weights; float16, whose range would clip large updates)."""
    return torch.bfloat16 if param.dtype == torch.bfloat16 else update.dtype


def splits_projected_rows(
    rule: Any, group: dict[str, Any], shape: tuple[int, int], dtype: torch.dtype, world: int
) -> bool:
    """Whether, for a weight of matrix ``shape`` projected on the left and sharded over
    ``world`` ranks, each rank steps a block of the rows of R = P^T G (which every rank holds
    whole) and the update is gathered, rather than every rank stepping all of R: where that
    saves at least as many bytes of the rule's state per rank as the gather sends per step.
    Adam's two float32 moments (8 bytes per value of R, against 4 gathered) are split; 8-bit
    Adam's codes and Adafactor's factored statistics are not (docs/distributed.md)."""
    rows, cols = projected_shape(shape, group)
    saved = rule.state_bytes((rows, cols), dtype, group) - rule.state_bytes((-(-rows // world), cols), dtype, group)
    return saved >= 4 * rows * cols * (world - 1) / world


def _refresh_seed(seed: int, index: int, step: int) -> int:
    """A seed per (group seed, parameter, step): the same on every rank, resume and hook order."""
    return ((seed * 1_000_003 + index) * 1_000_033 + step) % (2**63 - 1)


@dataclass
class _ParamStep:
    """One parameter's step in progress (:meth:`ComposedOptimizer._open`)."""

    param: torch.Tensor
    group: dict[str, Any]
    parts: Parts
    index: int
    step: int
    shard: Any  # RowShard | None
    target: torch.Tensor  # what the update is applied to: the parameter, or its local rows
    view: dict[str, Any]  # the state as the parts see it on this rank
    placed: tuple[Placed, ...]  # which state entries have which rows (lowmem_optim.sharding)
    rule_shard: Any  # the rows the rule sees: the weight's (G Q), a block of R's (P^T G), or None
    projected: bool
    left: bool  # projected from the left (P^T G)

    def matrix(self, grad: torch.Tensor) -> torch.Tensor:
        """This rank's gradient as the projected matrix (m x n)."""
        local = grad if self.shard is None else grad.to_local()
        return local.reshape(-1, matrix_shape(self.param)[1])


class ComposedOptimizer(torch.optim.Optimizer):
    """The optimizer loop over a rule, a projector and a refresh schedule per param group (see
    the module docstring): the base of every optimizer of the package, low-rank or not.

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
        chosen = {
            **{hp.name: hp.default for hp in ENGINE_HPARAMS},
            **{key: choices[0] for key, choices in self.part_choices.items()},
            **self.named_defaults,
            **defaults,
        }
        self._check_choices(chosen)
        allowed = group_parts(chosen).hparams()
        unknown = sorted(set(defaults) - allowed.keys())
        if unknown:
            raise invalid(
                f"hyperparameter{'s' if len(unknown) > 1 else ''} of {type(self).__name__}",
                ", ".join(unknown),
                ", ".join(allowed),
            )
        super().__init__(params, {**{n: hp.default for n, hp in allowed.items()}, **chosen})

    # ---- param groups -------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        given = set(param_group) - _GROUP_FIELDS
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group, given)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_choices(self, group: dict[str, Any]) -> None:
        for key, choices in self.part_choices.items():
            if group[key] not in choices:
                fixes = (
                    f"{_display_name(type(self))} fixes {key}={choices[0]!r}"
                    if len(choices) == 1
                    else f"the parts {_display_name(type(self))} composes"
                )
                raise invalid(key, group[key], f"{', '.join(map(repr, choices))}: {fixes}")

    def _validate_group(self, group: dict[str, Any], given: set[str]) -> None:
        """Each key against its declaration, then the parts' checks across keys and parameters;
        keys the group gave that none of its parts declares are refused."""
        self._check_choices(group)
        parts = group_parts(group)
        allowed = parts.hparams()
        unknown = sorted(given - allowed.keys())
        if unknown:
            names = ", ".join(f"{key}={group[key]!r}" for key in SELECTORS)
            raise invalid(
                f"param group key{'s' if len(unknown) > 1 else ''} for {names}", ", ".join(unknown), ", ".join(allowed)
            )
        for name, hp in allowed.items():
            group.setdefault(name, hp.default)
            hp.validate(group[name])
        for part in parts.all():
            part.validate(group)
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(f"{_param_label(group, i, p)} is complex; complex parameters are not supported")
            row_shard(p, _param_label(group, i, p))  # refuses placements other than FSDP2's
        if not is_lowrank_group(group):
            return
        rank = group["rank"]
        for i, p in enumerate(group["params"]):
            if p.dim() < 2:
                raise ValueError(
                    f"{_param_label(group, i, p)} is {p.dim()}-D but sits in a group with rank={rank}: "
                    "low-rank projection needs a matrix; put biases, norms and other 1-D parameters "
                    "in a group without 'rank' (lowmem_optim.lowrank_param_groups does this)"
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
        due = []
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    due.append((p, p.grad, group, index))
                index += 1
        self._check_refresh_gradients(due)
        together: dict[int, tuple[dict[str, Any], Parts, list[tuple[torch.Tensor, torch.Tensor, int]]]] = {}
        for p, grad, group, index in due:
            parts = group_parts(group)
            if self._steps_in_place(p, grad, group, parts):  # a group's full-rank parameters, in one call
                together.setdefault(id(group), (group, parts, []))[2].append((p, grad, index))
            else:
                self._update(p, grad, group, parts, index)
        for group, parts, entries in together.values():
            self._step_in_place(group, parts, entries)
        return loss

    def _check_refresh_gradients(self, updates: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], int]]) -> None:
        """FloatingPointError naming the parameter, before anything is updated, when a gradient
        whose subspace refresh is due this step is not finite: a step that raises leaves every
        parameter and its state as they were. One host sync, on refresh steps only."""
        checks = []
        schedules: dict[int, Any] = {}
        for p, grad, group, index in updates:
            if not uses_projection(p, group):
                continue
            state = self.state.get(p, {})
            step = int(state["step"]) + 1 if "step" in state else 1
            if id(group) not in schedules:
                schedules[id(group)] = group_parts(group).schedule
            if schedules[id(group)].due(state, step):
                shard = row_shard(p, f"parameter {index}")
                checks.append(
                    (p, group, index, shard, torch.isfinite(grad if shard is None else grad.to_local()).all())
                )
        if not checks:
            return
        finite = bool(torch.stack([c[-1] for c in checks]).all())  # the one host read
        shard = next((c[3] for c in checks if c[3] is not None), None)
        if finite if shard is None else not shard.any(not finite):  # every rank agrees (FSDP2 shards)
            return
        p, group, _, _, _ = next((c for c in checks if not bool(c[-1])), checks[0])  # the failure path only
        i = next(i for i, q in enumerate(group["params"]) if q is p)
        where = "" if not finite else " (on another rank)"
        raise FloatingPointError(
            f"{type(self).__name__}: the gradient of {_param_label(group, i, p)}{where} holds inf/NaN at a subspace "
            "refresh; nothing was updated (use torch.amp.GradScaler, which skips such steps, or clip gradients)"
        )

    @torch.compiler.disable
    @torch.no_grad()
    def step_param(self, param: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Update one parameter (with ``grad``, default ``param.grad``): the step of layer-wise
        training, run from a gradient hook. Same result as that parameter's share of ``step``."""
        p, group, index = self._locate(param, "step_param")
        g = param.grad if grad is None else grad
        if g is not None:
            self._check_refresh_gradients([(p, g, group, index)])
            self._update(p, g, group, group_parts(group), index)

    # ---- one projected parameter's step in three parts -------------------------------------
    # ``step`` runs them back to back; low-rank gradient accumulation (lowmem_optim.layerwise)
    # runs begin_step on a step's first micro-batch, project on each, and finish_step on the
    # sum of the projections after the last, so no full gradient outlives its micro-batch.
    def projects(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is updated in a subspace (its group has a rank below min(m, n))."""
        _, group, _ = self._locate(param, "projects")
        return uses_projection(param, group)

    @torch.compiler.disable
    @torch.no_grad()
    def begin_step(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Start ``param``'s next step: advance its counter and, when a refresh is due, choose
        the subspace from ``grad`` (this gradient alone). Then :meth:`project` gradients onto
        that subspace and end with :meth:`finish_step`. ValueError for a parameter that is not
        projected, or whose group uses ``error_feedback`` (the feedback needs the whole
        gradient of the step, which this split never holds)."""
        p, group, index = self._locate(param, "begin_step")
        self._check_split(p, group, index, "begin_step")
        self._check_refresh_gradients([(p, grad, group, index)])
        parts = group_parts(group)
        self._advance(p, group, index)
        s = self._open(p, group, parts, index)
        self._refresh_if_due(s, s.matrix(grad))
        store(self.state[p], s.view, *s.placed)

    @torch.compiler.disable
    @torch.no_grad()
    def project(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """R = project(G) on ``param``'s current subspace (r x n, m x r or r x r, in ``grad``'s
        dtype); linear in G, so projecting micro-batch gradients and summing equals projecting
        their sum. Call after :meth:`begin_step` of the step."""
        p, group, index = self._locate(param, "project")
        self._check_split(p, group, index, "project")
        s = self._open(p, group, group_parts(group), index)
        return s.parts.projector.project(s.matrix(grad), s.view, s.shard)

    @torch.compiler.disable
    @torch.no_grad()
    def finish_step(self, param: torch.Tensor, low: torch.Tensor) -> None:
        """End the step :meth:`begin_step` started from the projected gradient ``low``: the
        rule's update, back-projection, decay and the scaled update applied to ``param``."""
        p, group, index = self._locate(param, "finish_step")
        self._check_split(p, group, index, "finish_step")
        self._finish(self._open(p, group, group_parts(group), index), low)

    def refresh_due(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s next :meth:`begin_step` chooses a new subspace."""
        p, group, _ = self._locate(param, "refresh_due")
        state = self.state.get(p, {})
        step = int(state["step"]) + 1 if "step" in state else 1
        return uses_projection(p, group) and group_parts(group).schedule.due(state, step)

    def draw_seed(self, param: torch.Tensor, stream: int) -> int:
        """A seed per (group ``seed``, parameter, current step, ``stream``) for random draws
        outside the step (stochastic rounding of an accumulation buffer): the same in every
        hook order, on every rank and after a resume."""
        p, group, index = self._locate(param, "draw_seed")
        step = int(self.state[p]["step"]) if "step" in self.state.get(p, {}) else 0
        return _refresh_seed(group["seed"], index, step) ^ (stream * 0x9E37_79B9_7F4A_7C15 % 2**63)

    def _locate(self, param: torch.Tensor, caller: str) -> tuple[torch.Tensor, dict[str, Any], int]:
        """The parameter, its group and its index over all groups."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p is param:
                    return p, group, index
                index += 1
        raise KeyError(f"{caller}: the tensor is not a parameter of this optimizer")

    def _check_split(self, p: torch.Tensor, group: dict[str, Any], index: int, caller: str) -> None:
        i = next(i for i, q in enumerate(group["params"]) if q is p)
        if not uses_projection(p, group):
            raise ValueError(
                f"{caller}: {_param_label(group, i, p)} is not projected (its group has rank={group.get('rank')!r}); "
                "step it with step_param"
            )
        if group["error_feedback"] is not None:
            raise ValueError(
                f"{caller}: {_param_label(group, i, p)} sits in a group with error_feedback="
                f"{group['error_feedback']!r}, which needs the step's whole gradient; a step split into "
                "projected micro-batches never holds it (allowed: error_feedback=None)"
            )

    @staticmethod
    def _steps_in_place(p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], parts: Parts) -> bool:
        """Whether the rule steps this full-rank parameter by itself (:meth:`Part.step_in_place`)."""
        return not uses_projection(p, group) and parts.rule.can_step_in_place(p, grad)

    def _step_in_place(
        self, group: dict[str, Any], parts: Parts, entries: list[tuple[torch.Tensor, torch.Tensor, int]]
    ) -> None:
        """The rule's whole step of these parameters of ``group``, in one call (it advances the counters)."""
        states = [self._state(p, group, index) for p, _, index in entries]
        parts.rule.step_in_place([p for p, _, _ in entries], [g for _, g, _ in entries], states, group)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], parts: Parts, index: int) -> None:
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if self._steps_in_place(p, grad, group, parts):
            self._step_in_place(group, parts, [(p, grad, index)])
            return
        self._advance(p, group, index)
        s = self._open(p, group, parts, index)
        if not s.projected:
            local_grad = grad if s.shard is None else grad.to_local()
            update, lr_t = parts.rule.update(local_grad, s.view, group, p, s.shard)
            store(self.state[p], s.view, *s.placed)
            self._apply_update(s.target, update, 1.0, group, lr_t, index, s.step)
            return
        g = s.matrix(grad)
        feedback = group["error_feedback"]
        if feedback is not None:  # A = G + E: the selection and the projection see what was left out before
            accumulated = load_error(s.view, g) + g
            g = accumulated.to(g.dtype)
        self._refresh_if_due(s, g)
        low = parts.projector.project(g, s.view, s.shard)
        if feedback is not None:
            store_error(s.view, accumulated - parts.projector.back_project(low, s.view, s.shard), feedback)
        self._finish(s, low)

    def _advance(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        """The step counter, advanced."""
        self._state(p, group, index)["step"] += 1

    def _state(self, p: torch.Tensor, group: dict[str, Any], index: int) -> dict[str, Any]:
        """The parameter's state; on the first step, its counter (a float32 CPU tensor, as
        torch's) and the staggered schedule's slot."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            self._warn_if_full_rank(p, group, index)
            if group.get("stagger") and uses_projection(p, group):
                state["refresh_slot"] = self._matrix_slot(p)
        return state

    def _open(self, p: torch.Tensor, group: dict[str, Any], parts: Parts, index: int) -> _ParamStep:
        """The step in progress of ``p``: an FSDP2-sharded parameter is stepped on this rank's
        rows (lowmem_optim.sharding), its state seen through their view."""
        state = self.state[p]
        shard = row_shard(p, f"parameter {index}")
        target = p if shard is None else p.to_local()
        projected = uses_projection(p, group)
        left = projected and projection_sides(matrix_shape(p), group["proj_type"])[0]
        # G Q keeps the rows of G; P^T G is summed over the ranks, and each rank steps a block of
        # its rows, the update gathered whole, or all of it. The feedback buffer E and P have the rows of G.
        rule_shard = shard
        if left and shard is not None:
            split = splits_projected_rows(parts.rule, group, matrix_shape(p), p.dtype, shard.world)
            rule_shard = shard.split(group["rank"]) if split else None
        placed = ((rule_shard, parts.rule.sharded_layout(2 if projected else p.dim())),)
        if projected:
            placed += ((shard, parts.projector.sharded_layout(2) | SHARDED_LAYOUT),)
        view = local_view(state, *placed)
        return _ParamStep(
            p, group, parts, index, int(state["step"]), shard, target, view, placed, rule_shard, projected, left
        )

    def _refresh_if_due(self, s: _ParamStep, g: torch.Tensor) -> None:
        """Choose the subspace from ``g`` when the schedule says so; the rule's moments follow."""
        if not s.parts.schedule.due(s.view, s.step):
            return
        change = s.parts.projector.refresh(g, s.view, s.group, _refresh_seed(s.group["seed"], s.index, s.step), s.shard)
        s.parts.schedule.record(s.view, s.step, s.group, change.similarity)
        if not (g.any() if s.shard is None else s.shard.any(bool(g.any()))):
            # an all-zero gradient holds no subspace (torch.distributed.checkpoint initializes
            # empty state with one): the state now has its layout, the next gradient chooses
            s.parts.schedule.defer(s.view, s.step)
        s.parts.rule.carry(s.view, change, 0 if s.left else 1, s.rule_shard)

    def _finish(self, s: _ParamStep, low: torch.Tensor) -> None:
        """N = rule(R); W <- W (1 - lr_t wd) - scale * back_project(N)."""
        if s.rule_shard is s.shard or s.rule_shard is None:
            update, lr_t = s.parts.rule.update(low, s.view, s.group, s.param, s.rule_shard)
        else:  # this rank's block of the rows of R = P^T G, the update gathered whole
            rows = s.rule_shard
            update, lr_t = s.parts.rule.update(low[rows.start : rows.stop], s.view, s.group, s.param, rows)
            update = rows.gather_rows(update)
        full = s.parts.projector.back_project(update.to(back_projection_dtype(s.param, update)), s.view, s.shard)
        store(self.state[s.param], s.view, *s.placed)
        self._apply_update(s.target, full.view(s.target.shape), s.group["scale"], s.group, lr_t, s.index, s.step)

    @staticmethod
    def _apply_update(
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
        apply_update = getattr(p, "apply_update", None)
        if apply_update is not None:
            apply_update(
                update,
                alpha=alpha,
                decay=1 - lr_t * group["weight_decay"],
                seed=_refresh_seed(group.get("seed", 0), index, step),
            )
            return
        if group["weight_decay"] != 0:
            p.mul_(1 - lr_t * group["weight_decay"])
        p.sub_(update, alpha=alpha)

    def _matrix_slot(self, param: torch.Tensor) -> int:
        """How many projected parameters precede ``param`` in the optimizer (the staggered
        schedule's slot: the same on every rank and resume, as it depends on the order alone)."""
        slot = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p is param:
                    return slot
                slot += uses_projection(p, group)
        raise KeyError("the tensor is not a parameter of this optimizer")

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
        ``rank`` and every key the group's projector, basis storage and schedule declare. The
        rule's keys (lr, betas, eps, weight decay, ...) and ``scale`` follow the state dict,
        as in torch."""
        self._check_same_layout(state_dict)
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for group in self.param_groups:
            parts = group_parts(group)
            for name, hp in parts.hparams().items():
                group.setdefault(name, hp.default)
            for p, saved_id in zip(group["params"], saved_ids):
                fixed = frozenset().union(FEEDBACK_KEYS, *(part.fixed_dtype_keys(p.dtype) for part in parts.all()))
                host = frozenset().union(*(part.host_keys() for part in parts.all()))
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    if torch.is_tensor(value) and key in host:
                        self.state[p][key] = value.to(device="cpu")
                    elif torch.is_tensor(value) and key != "step" and (not value.is_floating_point() or key in fixed):
                        self.state[p][key] = value.to(device=p.device)

    def _check_same_layout(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict.get("param_groups", [])
        where = f"{type(self).__name__}.load_state_dict"
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{where}: the state dict has {len(saved_groups)} param groups, this optimizer "
                f"{len(self.param_groups)} (allowed: a state dict of this optimizer's param groups)"
            )
        for i, (ours, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not any(key in saved for key in SELECTORS):
                raise ValueError(
                    f"{where}: param group {i} of the state dict names no {', '.join(SELECTORS)}: it was "
                    "not saved by a lowmem_optim optimizer (allowed: a state dict of this optimizer)"
                )
            parts = group_parts(ours)
            declarations = parts.hparams()
            for key in (*SELECTORS, "rank", *declared(parts.all()[1:])):  # projector, storage, schedule
                theirs = saved.get(key, declarations[key].default)
                if _comparable(theirs) != _comparable(ours[key]):
                    raise ValueError(
                        f"{where}: param group {i} has {key}={theirs!r} in the state dict but "
                        f"{key}={ours[key]!r} here: its state belongs to another algorithm or layout "
                        "(allowed to differ, following the state dict as in torch: the rule's keys "
                        "such as lr, betas, weight_decay, and scale)"
                    )

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
                    stats.append(
                        {
                            "index": index,
                            "name": names[i] if names else f"param{index}",
                            "shape": tuple(p.shape),
                            "rank": group["rank"] if projected else None,
                            "side": {(True, False): "left", (False, True): "right", (True, True): "both"}.get(
                                (left, right), "full-rank"
                            ),
                            "refreshes": state.get("refreshes", 0),
                            "gap": parts.schedule.gap(state, group) if projected else None,
                            "last_similarity": _measured(state.get("last_similarity")),
                            "state_bytes": _state_bytes(state),
                        }
                    )
                index += 1
        return stats

    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state (moments, projections, codes, scales)."""
        return sum(_state_bytes(s) for s in self.state.values())


def _display_name(cls: type[ComposedOptimizer]) -> str:
    """``GaLoreAdamW (galore_adamw)``: the class and, when it declares one, its registry name
    (a subclass of a named optimizer is not registered under its parent's name)."""
    name = vars(cls).get("registry_name")
    return f"{cls.__name__} ({name})" if name else cls.__name__


def hparams_doc(cls: type[ComposedOptimizer]) -> str:
    """The "Hyperparameters" section of a named optimizer's docstring, from the declarations:
    every key with this optimizer's default, then the keys of the parts a group may name instead."""
    signature = {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    defaults = {
        **{hp.name: hp.default for hp in ENGINE_HPARAMS},
        **{key: choices[0] for key, choices in cls.part_choices.items()},
        **cls.named_defaults,
        **signature,
    }
    shown = group_parts(defaults).hparams()
    fixed = {key for key, choices in cls.part_choices.items() if len(choices) == 1}
    lines = ["Hyperparameters (keyword arguments, and keys of a param group; a group's own keys win):", ""]
    lines += [
        f"- ``{name}`` = {defaults.get(name, hp.default)!r}{' (fixed)' if name in fixed else ''}: {hp.doc}"
        for name, hp in shown.items()
    ]
    for key, registry in SELECTORS.items():
        for choice in cls.part_choices.get(key, tuple(registry)):
            part = registry[choice]()
            extra = [
                hp
                for hp in declared([part, *filter(None, [getattr(part, "storage", None)])]).values()
                if hp.name not in shown
            ]
            if extra:
                lines += ["", f"With ``{key}={choice!r}`` also:", ""]
                lines += [f"- ``{hp.name}`` = {hp.default!r}: {hp.doc}" for hp in extra]
    return "\n".join(lines)


def _comparable(value: Any) -> Any:
    """A group value as saved and as given compare equal (a saved tuple may come back a list)."""
    return tuple(value) if isinstance(value, list) else value


def _measured(similarity: float | None) -> float | None:
    """None until a similarity was measured (schedules store NaN before, to keep the key)."""
    return None if similarity is None or math.isnan(similarity) else similarity


def _state_bytes(state: dict[str, Any]) -> int:
    """Bytes of the state's tensors on this process (a sharded entry: its local shard)."""
    return sum(local_bytes(v) for v in state.values())
