"""A param group checked against the declarations of the parts it names, and a named
optimizer's "Hyperparameters" docstring section generated from the same declarations."""

from __future__ import annotations

from typing import Any

import torch

from lowmem_optim.engine.declarations import ENGINE_HPARAMS, SELECTORS, group_parts
from lowmem_optim.parts import declared, invalid
from lowmem_optim.shapes import is_lowrank_group
from lowmem_optim.sharding import row_shard


def param_label(group: dict[str, Any], position: int, p: torch.Tensor) -> str:
    """How an error names a parameter: its name when the group has ``param_names``, its position and shape."""
    names = group.get("param_names")
    name = f"{names[position]!r} " if names else ""
    return f"parameter {name}(index {position} in its group, shape {tuple(p.shape)})"


def display_name(cls: type) -> str:
    """``GaLoreAdamW (galore_adamw)``: the class and, when it declares one, its registry name
    (a subclass of a named optimizer is not registered under its parent's name)."""
    name = vars(cls).get("registry_name")
    return f"{cls.__name__} ({name})" if name else cls.__name__


def check_choices(cls: type, group: dict[str, Any]) -> None:
    """ValueError unless each part key of ``group`` names a part ``cls.part_choices`` allows."""
    for key, choices in cls.part_choices.items():
        if group[key] not in choices:
            fixes = (
                f"{display_name(cls)} fixes {key}={choices[0]!r}"
                if len(choices) == 1
                else f"the parts {display_name(cls)} composes"
            )
            raise invalid(key, group[key], f"{', '.join(map(repr, choices))}: {fixes}")


def validate_group(cls: type, group: dict[str, Any], given: set[str]) -> None:
    """Each key against its declaration (filling the declared defaults), then the parts' checks
    across keys and parameters; keys the group gave (``given``) that none of its parts declares
    are refused."""
    check_choices(cls, group)
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
            raise ValueError(f"{param_label(group, i, p)} is complex; complex parameters are not supported")
        row_shard(p, param_label(group, i, p))  # refuses placements other than FSDP2's
    if not is_lowrank_group(group):
        return
    rank = group["rank"]
    for i, p in enumerate(group["params"]):
        if p.dim() < 2:
            raise ValueError(
                f"{param_label(group, i, p)} is {p.dim()}-D but sits in a group with rank={rank}: "
                "low-rank projection needs a matrix; put biases, norms and other 1-D parameters "
                "in a group without 'rank' (lowmem_optim.lowrank_param_groups does this)"
            )


def chosen_defaults(cls: type) -> dict[str, Any]:
    """What an optimizer class sets over the engine's defaults: its default parts (the first of
    each ``part_choices``) and its ``named_defaults``."""
    return {
        **{hp.name: hp.default for hp in ENGINE_HPARAMS},
        **{key: choices[0] for key, choices in cls.part_choices.items()},
        **cls.named_defaults,
    }


def declared_defaults(cls: type) -> dict[str, Any]:
    """Every key's default in an optimizer class: its default parts' declarations under
    :func:`chosen_defaults`."""
    chosen = chosen_defaults(cls)
    return {**{name: hp.default for name, hp in group_parts(chosen).hparams().items()}, **chosen}


def hparams_doc(cls: type) -> str:
    """The "Hyperparameters" section of a named optimizer's docstring, from the declarations:
    every key with this optimizer's default, then the keys of the parts a group may name instead."""
    defaults = chosen_defaults(cls)
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
