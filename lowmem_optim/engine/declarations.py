"""What a param group may hold: the keys that choose its parts, the engine's own keys, and the
parts a group names (:class:`Parts`), whose declarations give every other key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowmem_optim.parts import (
    HParam,
    Part,
    Projector,
    RefreshSchedule,
    Rule,
    Storage,
    declared,
    integer,
    invalid,
    number,
    one_of,
    optional,
)
from lowmem_optim.projection import PROJECTORS
from lowmem_optim.projection.feedback import ERROR_FEEDBACK
from lowmem_optim.rules import RULES
from lowmem_optim.schedules import SCHEDULES
from lowmem_optim.update_forms import UPDATE_FORMS, UpdateForm

#: the group keys that choose a part, and the registry each chooses from
SELECTORS: dict[str, dict[str, type]] = {
    "rule": RULES,
    "proj_method": PROJECTORS,
    "refresh": SCHEDULES,
    "update_form": UPDATE_FORMS,
}

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
    HParam(
        "update_form",
        "projected",
        one_of(*UPDATE_FORMS),
        "the full-size update from the low-rank one: projected (P N), residual (P N plus the scaled rest of G, "
        "Fira), channel or tensor (G scaled per channel or per tensor, APOLLO)",
    ),
)
#: the engine's keys that only a low-rank group uses
_ENGINE_LOWRANK = ("rank", "scale", "proj_method", "refresh", "error_feedback", "update_form")
#: group keys that are not hyperparameters: torch's own, the keys torch's LR schedulers keep in a
#: group (a scheduler resumed with ``last_epoch`` needs them there at construction), and a group's
#: ``name`` (PyTorch Lightning's LearningRateMonitor labels groups with it); carried untouched
GROUP_FIELDS = frozenset(
    {"params", "param_names", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "name"}
)


@dataclass(frozen=True)
class Parts:
    """The parts a param group names (``storage``: the projector's, None if it stores no basis)."""

    rule: Rule
    projector: Projector
    schedule: RefreshSchedule
    form: UpdateForm

    @property
    def storage(self) -> Storage | None:
        return self.projector.storage

    def all(self) -> tuple[Part, ...]:
        return tuple(p for p in (self.rule, self.projector, self.storage, self.schedule, self.form) if p is not None)

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
        form=UPDATE_FORMS[group["update_form"]](),
    )


def lowrank_hparams() -> dict[str, HParam]:
    """The keys of a low-rank group's setup: the engine's rank, scale and part choices, and every
    key a projector, basis storage, schedule or update form declares (the first declaration of a name)."""
    parts = [cls() for registry in (PROJECTORS, SCHEDULES, UPDATE_FORMS) for cls in registry.values()]
    storages = [p.storage for p in parts if getattr(p, "storage", None) is not None]
    out = {hp.name: hp for hp in ENGINE_HPARAMS if hp.name in _ENGINE_LOWRANK}
    for hp in (hp for part in (*parts, *storages) for hp in part.hparams):
        out.setdefault(hp.name, hp)
    return out
