"""Which rows of the rule's input each rank steps when a weight is FSDP2-sharded by rows
(:mod:`lowmem_optim.sharding`; docs/distributed.md)."""

from __future__ import annotations

from typing import Any

import torch

from lowmem_optim.parts import Rule
from lowmem_optim.projection.base import projected_shape
from lowmem_optim.sharding import RowShard


def splits_projected_rows(
    rule: Rule, group: dict[str, Any], shape: tuple[int, int], dtype: torch.dtype, world: int
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


def rule_rows(
    shard: RowShard | None, rule: Rule, group: dict[str, Any], shape: tuple[int, int], dtype: torch.dtype, left: bool
) -> RowShard | None:
    """The rows the rule sees on this rank: the weight's (G Q keeps the rows of G); for a left
    projection P^T G, summed over the ranks, a block of its rows (the update gathered whole) or
    all of it (None), as :func:`splits_projected_rows` decides."""
    if not left or shard is None:
        return shard
    return shard.split(group["rank"]) if splits_projected_rows(rule, group, shape, dtype, shard.world) else None
