"""GaLore's projector (Zhao et al., ICML 2024): the top-r singular vectors of the gradient.

    G = U S V^T (float32),   P = U[:, :r] (left),   Q^T = V^T[:r] (right)

computed at each refresh and stored in the parameter's dtype. Each singular vector's sign is
fixed so that its largest-magnitude entry is positive: LAPACK's sign is arbitrary and differs
between devices and libraries, and since moments are carried across refreshes unrotated, a
flipped vector would flip the sign of that coordinate's momentum. SVD of an ill-conditioned or
degenerate gradient can fail to converge (galore-torch then produces NaN): this projector
retries in float64, then falls back to a symmetric eigendecomposition of G G^T (or G^T G),
and never stores a non-finite basis. A non-finite gradient at a refresh is an error, since
no subspace can be chosen from it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lowmem_optim.projection.base import MatrixProjector
from lowmem_optim.sharding import RowShard

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


def fix_signs(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """Flip each vector (a column for dim=0, a row for dim=1) so its largest |entry| is positive."""
    pivot = vectors.abs().argmax(dim=dim, keepdim=True)
    signs = torch.sign(vectors.gather(dim, pivot))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def singular_vectors(grad: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V^T) of ``grad`` in float32, robust to convergence failures; with ``count``, only the
    leading ``count`` singular vectors (their signs fixed and their finiteness checked alone:
    at 4096 x 11008 the whole V^T's checks and sign fixes would take 2 x 172 MiB)."""
    # each attempt makes its own copy of G, freed once it returns: no float32 G beside U and V^T
    attempts = (
        ("float32 SVD", lambda: _svd(grad.float())),
        ("float64 SVD", lambda: _svd(grad.double())),
        ("eigh", lambda: _eigh_fallback(grad)),
    )
    for name, attempt in attempts:
        try:
            u, vh = attempt()
        except (torch.linalg.LinAlgError, RuntimeError) as err:
            logger.warning("GaLore projector: %s failed (%s); trying the next method", name, err)
            continue
        if count is not None:
            u, vh = u[:, :count], vh[:count]
        if torch.isfinite(u).all() and torch.isfinite(vh).all():
            return fix_signs(u.float(), dim=0), fix_signs(vh.float(), dim=1)
        logger.warning("GaLore projector: %s returned non-finite vectors; trying the next method", name)
    raise FloatingPointError("GaLore projector: every SVD method failed on a finite gradient")


class SVDProjector(MatrixProjector):
    """Exact SVD subspace, GaLore's ``proj_type`` sides (std, reverse_std, left, right, full)."""

    def factors(
        self, grad: torch.Tensor, group: dict[str, Any], seed: int, shard: RowShard | None = None, left: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # sharded, the exact SVD takes the whole matrix: gathered, at refresh steps only
        return singular_vectors(grad if shard is None else shard.gather_rows(grad), group["rank"])
