"""GaLore's projector (Zhao et al., ICML 2024): the top-r singular vectors of the gradient.

    G = U S V^T (float32),   P = U[:, :r] (left),   Q^T = V^T[:r] (right)

computed at each refresh and stored in the parameter's dtype. SVD of an ill-conditioned or
degenerate gradient can fail to converge (galore-torch then produces NaN): this projector
retries in float64, then falls back to a symmetric eigendecomposition of G G^T (or G^T G),
and never stores a non-finite basis. A non-finite gradient at a refresh is an error, since
no subspace can be chosen from it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lowmem_optim.projection.base import PROJ_TYPES, MatrixProjector, leading_similarity, projection_sides
from lowmem_optim.rules.base import SubspaceChange

logger = logging.getLogger(__name__)


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u, vh


def _eigh_fallback(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular vectors from eigendecompositions of the Gram matrices (descending order)."""
    a = a.double()
    jitter = 1e-12 * float(a.abs().max().clamp_min(1.0))
    eye_m = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    eye_n = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    _, u = torch.linalg.eigh(a @ a.T + jitter * eye_m)
    _, v = torch.linalg.eigh(a.T @ a + jitter * eye_n)
    return u.flip(1), v.flip(1).T


def singular_vectors(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V^T) of ``grad`` in float32, robust to convergence failures."""
    a = grad.float()
    attempts = (("float32 SVD", lambda: _svd(a)), ("float64 SVD", lambda: _svd(a.double())), ("eigh", lambda: _eigh_fallback(a)))
    for name, attempt in attempts:
        try:
            u, vh = attempt()
        except (torch.linalg.LinAlgError, RuntimeError) as err:
            logger.warning("GaLore projector: %s failed (%s); trying the next method", name, err)
            continue
        if torch.isfinite(u).all() and torch.isfinite(vh).all():
            return u.float(), vh.float()
        logger.warning("GaLore projector: %s returned non-finite vectors; trying the next method", name)
    raise FloatingPointError("GaLore projector: every SVD method failed on a finite gradient")


class SVDProjector(MatrixProjector):
    """Exact SVD subspace, GaLore's ``proj_type`` sides (std, reverse_std, left, right, full)."""

    def validate(self, group: dict[str, Any]) -> None:
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"Invalid proj_type: {group['proj_type']!r} (allowed: {', '.join(PROJ_TYPES)})")

    def refresh(self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], seed: int) -> SubspaceChange:
        if not torch.isfinite(grad).all():
            raise FloatingPointError(
                "GaLore projector: the gradient holds inf/NaN at a subspace refresh; no subspace can be "
                "chosen from it (use torch.amp.GradScaler, which skips such steps, or clip gradients)"
            )
        left, right = projection_sides(tuple(grad.shape), group["proj_type"])
        rank = group["rank"]
        u, vh = singular_vectors(grad)
        similarity = None
        if left:
            new = u[:, :rank].to(grad.dtype)
            similarity = leading_similarity(state.get("proj_left"), new, vector_dim=1)
            state["proj_left"] = new
        if right:
            new = vh[:rank].contiguous().to(grad.dtype)
            right_similarity = leading_similarity(state.get("proj_right"), new, vector_dim=0)
            similarity = right_similarity if similarity is None else similarity
            state["proj_right"] = new
        return SubspaceChange(similarity=similarity)
