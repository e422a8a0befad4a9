"""What an optimizer reports for logging: per low-rank parameter its subspace's state, and the
bytes of its state."""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem_optim.engine.declarations import group_parts
from lowmem_optim.projection.base import projection_sides
from lowmem_optim.shapes import is_lowrank_group, matrix_shape, uses_projection
from lowmem_optim.sharding import local_bytes

_SIDES = {(True, False): "left", (False, True): "right", (True, True): "both"}


def layer_stats(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Per low-rank parameter: name, shape, rank, side, refreshes, gap, last similarity and
    state bytes (one dict each, in parameter order)."""
    stats = []
    index = 0
    for group in optimizer.param_groups:
        names = group.get("param_names")
        parts = group_parts(group) if is_lowrank_group(group) else None
        for i, p in enumerate(group["params"]):
            if parts is not None:
                state = optimizer.state.get(p, {})
                projected = uses_projection(p, group)
                left, right = projection_sides(matrix_shape(p), group["proj_type"]) if projected else (False, False)
                stats.append(
                    {
                        "index": index,
                        "name": names[i] if names else f"param{index}",
                        "shape": tuple(p.shape),
                        "rank": group["rank"] if projected else None,
                        "side": _SIDES.get((left, right), "full-rank"),
                        "refreshes": state.get("refreshes", 0),
                        "gap": parts.schedule.gap(state, group) if projected else None,
                        "last_similarity": _measured(state.get("last_similarity")),
                        "state_bytes": state_bytes(state),
                    }
                )
            index += 1
    return stats


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of the state's tensors on this process (a sharded entry: its local shard)."""
    return sum(local_bytes(v) for v in state.values())


def _measured(similarity: float | None) -> float | None:
    """None until a similarity was measured (schedules store NaN before, to keep the key)."""
    return None if similarity is None or math.isnan(similarity) else similarity
