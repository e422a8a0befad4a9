"""Where each parameter sits in an optimizer, found in O(1): the lookups of the per-parameter
calls of layer-wise training (several per parameter per micro-batch) never scan the groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowmem_optim.engine.declarations import Parts, group_parts
from lowmem_optim.shapes import uses_projection


@dataclass(frozen=True)
class ParamEntry:
    """A parameter's place: its group (the ``group_number``-th) and the group's parts, its
    position in the group, its index over all groups, and its slot among the projected
    parameters (the staggered schedule's, None if not projected): all fixed by the order alone,
    so the same on every rank and resume."""

    param: torch.Tensor
    group: dict[str, Any]
    group_number: int
    parts: Parts
    position: int
    index: int
    slot: int | None

    @property
    def projected(self) -> bool:
        """Whether the parameter is updated in a subspace (:func:`lowmem_optim.shapes.uses_projection`)."""
        return self.slot is not None


class ParamIndex:
    """Parameter -> :class:`ParamEntry`, and param group -> its parts (resolved once per group).

    Built from the param groups whenever they change (``add_param_group``, ``load_state_dict``);
    a lookup that finds no entry, or one whose group the optimizer no longer holds (a group
    popped after a refused ``add_param_group``), returns None and the caller rebuilds it."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self._entries: dict[int, ParamEntry] = {}
        self._parts: dict[int, Parts] = {}
        index = slot = 0
        for number, group in enumerate(param_groups):
            parts = self._parts[id(group)] = group_parts(group)
            for position, p in enumerate(group["params"]):
                projected = uses_projection(p, group)
                self._entries[id(p)] = ParamEntry(p, group, number, parts, position, index, slot if projected else None)
                index += 1
                slot += projected

    def entry(self, param: torch.Tensor, param_groups: list[dict[str, Any]]) -> ParamEntry | None:
        """``param``'s entry, if it is current in ``param_groups`` (the optimizer's groups now)."""
        entry = self._entries.get(id(param))
        if entry is None or entry.param is not param:
            return None
        current = entry.group_number < len(param_groups) and param_groups[entry.group_number] is entry.group
        return entry if current else None

    def parts(self, group: dict[str, Any]) -> Parts | None:
        """The parts ``group`` names, if the index was built with it."""
        return self._parts.get(id(group))
