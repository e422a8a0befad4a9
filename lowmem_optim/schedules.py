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

from typing import Any

import torch

from lowmem_optim.parts import BOOLEAN, HParam, Part, integer, invalid, number, optional


class FixedRefresh(Part):
    """Refresh every ``update_proj_gap`` steps (the group's value, read at each refresh).

    ``stagger``: every matrix still refreshes at step 1 (none can step without a subspace), but
    the j-th projected matrix of the optimizer (``refresh_slot`` in its state, set by the engine)
    refreshes next at step 1 + (j mod gap), or 1 + gap when that is 0, then every gap: with a
    fixed gap no later step refreshes more than ceil(matrices / gap) of them, so the cost of a
    refresh (an exact SVD of a 7B matrix: ~1 s on an H200) is spread over the gap instead of
    stalling one step. The slot depends on the parameter order alone: every rank and every
    resumed run refreshes the same matrices at the same steps.
    """

    hparams = (
        HParam("update_proj_gap", 200, integer(1), "steps between subspace refreshes"),
        HParam("stagger", False, BOOLEAN, "after step 1, each matrix refreshes at its own offset within its gap"),
    )

    def due(self, state: dict[str, Any], step: int) -> bool:
        return step >= state.get("next_refresh", 1)

    def defer(self, state: dict[str, Any], step: int) -> None:
        state["next_refresh"] = step + 1

    def gap(self, state: dict[str, Any], group: dict[str, Any]) -> int:
        return group["update_proj_gap"]

    def record(self, state: dict[str, Any], step: int, group: dict[str, Any], similarity: float | None) -> None:
        state["refreshes"] = state.get("refreshes", 0) + 1
        gap = self.gap(state, group)
        offset = state["refresh_slot"] % gap if group["stagger"] and state["refreshes"] == 1 else 0
        state["next_refresh"] = step + (offset or gap)
        state["last_similarity"] = float("nan") if similarity is None else similarity


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

    hparams = (
        *FixedRefresh.hparams,
        HParam("queue_size", 5, integer(1), "similarity records averaged before the gap grows"),
        HParam("cos_threshold", 0.4, number(0, 1), "mean similarity from which the gap grows"),
        HParam("gamma_proj", 2, number(1), "factor by which the gap grows"),
        HParam("max_gap", None, optional(integer(1)), "largest gap (None: 10x update_proj_gap)"),
    )

    def validate(self, group: dict[str, Any]) -> None:
        max_gap = group["max_gap"]
        if max_gap is not None and max_gap < group["update_proj_gap"]:
            raise invalid("max_gap", max_gap, f"None, or an int >= update_proj_gap = {group['update_proj_gap']}")

    def fixed_dtype_keys(self, param_dtype: torch.dtype) -> frozenset[str]:
        return frozenset({"sim_queue"})  # float64 records

    def host_keys(self) -> frozenset[str]:
        return frozenset({"sim_queue"})  # averaged on the host at each refresh

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return 8 * group["queue_size"]  # the float64 queue (number entries are not tensors)

    def gap(self, state: dict[str, Any], group: dict[str, Any]) -> int:
        return state.get("gap", group["update_proj_gap"])

    def record(self, state: dict[str, Any], step: int, group: dict[str, Any], similarity: float | None) -> None:
        gap = self.gap(state, group)
        size = group["queue_size"]
        records = (
            state["sim_queue"][: state["sim_count"]] if "sim_queue" in state else torch.zeros(0, dtype=torch.float64)
        )
        if similarity is not None:
            records = torch.cat([records, records.new_tensor([similarity])])[-size:]
        if records.numel() == size and float(records.mean()) >= group["cos_threshold"]:
            max_gap = 10 * group["update_proj_gap"] if group["max_gap"] is None else group["max_gap"]
            gap = min(int(gap * group["gamma_proj"]), max_gap)
            records = records[:0]
        queue = torch.zeros(size, dtype=torch.float64)
        queue[: records.numel()] = records
        state["gap"], state["sim_queue"], state["sim_count"] = gap, queue, records.numel()
        super().record(state, step, group, similarity)


SCHEDULES: dict[str, type] = {"fixed": FixedRefresh, "adaptive": AdaptiveRefresh}
