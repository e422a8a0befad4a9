"""Refresh schedules: when a parameter's subspace is recomputed, per parameter.

Convention (GaLore's): the first refresh happens at step 1, then whenever
``step >= next_refresh``, after which ``next_refresh = step + gap``; with a fixed gap T the
refreshes fall on steps 1, T+1, 2T+1, ... State (``next_refresh``, ``refreshes``,
``last_similarity``) is plain numbers in the parameter's optimizer state; the adaptive
schedule adds its current ``gap`` (a number), ``sim_queue`` (a float64 tensor) and
``sim_count``. Every key exists, with its final shape, from the first refresh on
(``last_similarity`` is NaN until a second refresh measures one): torch.distributed.checkpoint
loads a checkpoint into the state of a freshly initialized optimizer and keeps only the keys
and shapes found there.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class RefreshSchedule(Protocol):
    #: state keys whose floating dtype is fixed (never cast to the param dtype on load)
    fixed_dtype_keys: frozenset[str]

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

    fixed_dtype_keys: frozenset[str] = frozenset()

    def validate(self, group: dict[str, Any]) -> None:
        _check_positive_int(group, "update_proj_gap")

    def due(self, state: dict[str, Any], step: int) -> bool:
        return step >= state.get("next_refresh", 1)

    def gap(self, state: dict[str, Any], group: dict[str, Any]) -> int:
        return group["update_proj_gap"]

    def record(self, state: dict[str, Any], step: int, group: dict[str, Any], similarity: float | None) -> None:
        state["refreshes"] = state.get("refreshes", 0) + 1
        state["next_refresh"] = step + self.gap(state, group)
        state["last_similarity"] = float("nan") if similarity is None else similarity


#: defaults of the adaptive schedule's group keys (Q-GaLore's values; max_gap None = 10x the initial gap)
ADAPTIVE_DEFAULTS: dict[str, Any] = {"queue_size": 5, "cos_threshold": 0.4, "gamma_proj": 2, "max_gap": None}


def _adaptive_hparams(group: dict[str, Any]) -> dict[str, Any]:
    return {**ADAPTIVE_DEFAULTS, **{k: group[k] for k in ADAPTIVE_DEFAULTS if k in group}}


class AdaptiveRefresh(FixedRefresh):
    """Q-GaLore's layer-adaptive (lazy) refresh (Zhang et al. 2024, arXiv 2407.08296), per parameter.

    After each refresh the projector's similarity s (|cos| of the leading vectors of the old
    and new projection; for DCT the index overlap |old & new| / r) joins a queue of the last
    ``queue_size`` records. When the queue is full and mean(queue) >= ``cos_threshold``:

        gap <- min(gap * gamma_proj, max_gap),   queue cleared,

    so each growth needs ``queue_size`` fresh records. The gap starts at ``update_proj_gap``;
    ``max_gap`` defaults to 10x that. Unlike the reference, |cos| is used (a singular vector's
    sign is arbitrary), the gap is capped and the queue is cleared. State: ``gap`` (number),
    ``sim_queue`` (float64 tensor of length ``queue_size`` whose first ``sim_count`` entries are
    the records, oldest first; fixed length so that distributed checkpoints can load it), plus
    the fixed schedule's.
    """

    fixed_dtype_keys: frozenset[str] = frozenset({"sim_queue"})

    def validate(self, group: dict[str, Any]) -> None:
        super().validate(group)
        hp = _adaptive_hparams(group)
        if isinstance(hp["queue_size"], bool) or not isinstance(hp["queue_size"], int) or hp["queue_size"] < 1:
            raise ValueError(f"Invalid queue_size: {hp['queue_size']!r} (allowed: an int >= 1)")
        if isinstance(hp["cos_threshold"], bool) or not isinstance(hp["cos_threshold"], (int, float)) \
                or not 0.0 <= hp["cos_threshold"] <= 1.0:
            raise ValueError(f"Invalid cos_threshold: {hp['cos_threshold']!r} (allowed: a number in [0, 1])")
        if isinstance(hp["gamma_proj"], bool) or not isinstance(hp["gamma_proj"], (int, float)) or not hp["gamma_proj"] >= 1:
            raise ValueError(f"Invalid gamma_proj: {hp['gamma_proj']!r} (allowed: a number >= 1)")
        max_gap = hp["max_gap"]
        if max_gap is not None and (isinstance(max_gap, bool) or not isinstance(max_gap, int)
                                    or max_gap < group["update_proj_gap"]):
            raise ValueError(f"Invalid max_gap: {max_gap!r} (allowed: None, or an int >= update_proj_gap "
                             f"= {group['update_proj_gap']})")

    def gap(self, state: dict[str, Any], group: dict[str, Any]) -> int:
        return state.get("gap", group["update_proj_gap"])

    def record(self, state: dict[str, Any], step: int, group: dict[str, Any], similarity: float | None) -> None:
        hp = _adaptive_hparams(group)
        gap = self.gap(state, group)
        size = hp["queue_size"]
        records = state["sim_queue"][: state["sim_count"]] if "sim_queue" in state else torch.zeros(0, dtype=torch.float64)
        if similarity is not None:
            records = torch.cat([records, records.new_tensor([similarity])])[-size:]
        if records.numel() == size and float(records.mean()) >= hp["cos_threshold"]:
            max_gap = 10 * group["update_proj_gap"] if hp["max_gap"] is None else hp["max_gap"]
            gap = min(int(gap * hp["gamma_proj"]), max_gap)
            records = records[:0]
        queue = torch.zeros(size, dtype=torch.float64)
        queue[: records.numel()] = records
        state["gap"], state["sim_queue"], state["sim_count"] = gap, queue, records.numel()
        super().record(state, step, group, similarity)


SCHEDULES: dict[str, type] = {"fixed": FixedRefresh, "adaptive": AdaptiveRefresh}
