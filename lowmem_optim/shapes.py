"""The matrix a weight is projected as, and whether a param group projects it.

A leaf of the package (it imports no other module of it), read by the engine, the param-group
builders and the memory model alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """The matrix a weight is projected as: (out, everything else), like conv weights in Muon."""
    return (param.shape[0], math.prod(param.shape[1:]))


def is_lowrank_group(group: dict[str, Any]) -> bool:
    return group.get("rank") is not None


def uses_projection(param: torch.Tensor, group: dict[str, Any]) -> bool:
    """A low-rank group's parameter is projected unless the rank saves nothing."""
    return is_lowrank_group(group) and group["rank"] < min(matrix_shape(param))
