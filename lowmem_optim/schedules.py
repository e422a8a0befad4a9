"""Refresh schedules: when a parameter's subspace is recomputed, per parameter.

Convention (GaLore's): the first refresh happens at step 1, then whenever
``step >= next_refresh``, after which ``next_refresh = step + gap``; with a fixed gap T the
refreshes fall on steps 1, T+1, 2T+1, ... State (``next_refresh``, ``refreshes``,
``last_similarity``) is plain numbers in the parameter's optimizer state.
"""

from __future__ import annotations

from typing import Any, Protocol


class RefreshSchedule(Protocol):
    def validate(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming a bad hyperparameter of ``group``."""

    def due(self, state: dict[str, Any], step: int) -> bool:
        """Whether the subspace is refreshed at ``step``."""

    def record(self, state: dict[str, Any], step: int, group: dict[str, Any], similarity: float | None) -> None:
        """Book a refresh done at ``step`` and plan the next one."""

    def gap(self, state: dict[str, Any], group: dict[str, Any]) -> int:
        """The parameter's current refresh gap."""


def _check_positive_int(group: dict[str, Any], key: str) -> None:
    value = group[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {key}: {value!r} (allowed: an int >= 1)")


class FixedRefresh:
    """Refresh every ``update_proj_gap`` steps (the group's value, read at each refresh)."""

    def validate(self, group: dict[str, Any]) -> None:
        _check_positive_int(group, "update_proj_gap")

    def due(self, state: dict[str, Any], step: int) -> bool:
        return step >= state.get("next_refresh", 1)

    def gap(self, state: dict[str, Any], group: dict[str, Any]) -> int:
        return group["update_proj_gap"]

    def record(self, state: dict[str, Any], step: int, group: dict[str, Any], similarity: float | None) -> None:
        state["refreshes"] = state.get("refreshes", 0) + 1
        state["next_refresh"] = step + self.gap(state, group)
        if similarity is not None:
            state["last_similarity"] = similarity


SCHEDULES: dict[str, type] = {"fixed": FixedRefresh}
