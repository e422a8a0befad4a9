"""The projector: chooses, stores and applies a rank-r subspace for one weight matrix.

A projector knows nothing of moments or learning rates. For a gradient G (m x n) it projects
on the left (P, m x r: R = P^T G, r x n), on the right (Q, n x r: R = G Q, m x r) or on both
(R = P^T G Q, r x r), and maps a low-rank update N back with P N, N Q^T or P N Q^T. What
defines the subspace lives in the parameter's optimizer state as tensors; projectors
themselves are stateless and built from a param group's hyperparameters.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lowmem_optim.rules.base import SubspaceChange

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def projection_sides(shape: tuple[int, int], proj_type: str) -> tuple[bool, bool]:
    """(project_left, project_right) for a matrix of ``shape`` under GaLore's ``proj_type``.

    "std" reduces the larger dimension's partner: m >= n projects on the right (moments m x r),
    otherwise on the left (moments r x n); "reverse_std" swaps that rule.
    """
    m, n = shape
    if proj_type == "std":
        return (m < n, m >= n)
    if proj_type == "reverse_std":
        return (m >= n, m < n)
    if proj_type == "left":
        return (True, False)
    if proj_type == "right":
        return (False, True)
    if proj_type == "full":
        return (True, True)
    raise ValueError(f"Invalid proj_type: {proj_type!r} (allowed: {', '.join(PROJ_TYPES)})")


class Projector(Protocol):
    #: state keys owned by the projector whose dtype is fixed (never cast to the param dtype)
    fixed_dtype_keys: frozenset[str]

    def validate(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming a bad hyperparameter of ``group``."""

    def refresh(self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], seed: int) -> SubspaceChange:
        """Choose a new subspace from the 2-D ``grad`` and store it in ``state``.

        ``seed`` seeds any random draw (derived from the group's seed, the parameter and the
        step, so every rank and every resume draws the same numbers)."""

    def project(self, grad: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """R: the low-rank gradient."""

    def back_project(self, low: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """The full-size (m x n) image of a low-rank tensor."""


class MatrixProjector:
    """Shared apply logic for projectors that store dense orthonormal bases.

    State: ``proj_left`` (m x r) and/or ``proj_right`` (r x n, rows spanning the right subspace,
    as galore-torch stores Vh[:r]).
    """

    fixed_dtype_keys: frozenset[str] = frozenset()

    def project(self, grad: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        out = grad
        if "proj_left" in state:
            out = state["proj_left"].to(grad.dtype).t() @ out
        if "proj_right" in state:
            out = out @ state["proj_right"].to(grad.dtype).t()
        return out

    def back_project(self, low: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        out = low
        if "proj_left" in state:
            out = state["proj_left"].to(low.dtype) @ out
        if "proj_right" in state:
            out = out @ state["proj_right"].to(low.dtype)
        return out


def leading_similarity(old: torch.Tensor | None, new: torch.Tensor, vector_dim: int) -> float | None:
    """|cos| between the leading basis vectors of two projections (sign of a singular vector
    is arbitrary, hence the absolute value)."""
    if old is None:
        return None
    a = old.select(vector_dim, 0).float()
    b = new.select(vector_dim, 0).float()
    return float((a @ b).abs() / (a.norm() * b.norm()).clamp_min(1e-30))
