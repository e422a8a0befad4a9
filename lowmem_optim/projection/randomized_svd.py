"""Randomized SVD projector (Halko, Martinsson & Tropp, SIAM Review 2011), as GaLore 2 uses it.

For G (m x n), target rank r, k = min(r + oversample, m, n) and a Gaussian Omega (n x k):

    Q = orth(G Omega);   q times:  Q = orth(G (orth(G^T Q)))      (power iterations)
    B = Q^T G (k x n) = U_B S V^T,   U = Q U_B

U[:, :r] and V^T[:r] approximate the top-r singular vectors; the power iterations sharpen
them when the spectrum decays slowly (the error factor falls like (s_{k+1}/s_r)^(2q+1)).
Cost O(m n k (2q + 2)) instead of the exact SVD's O(m n min(m, n)). Omega is drawn from a
generator seeded by the engine's per-(seed, parameter, step) seed, never the global RNG, so
ranks, resumes and layer-wise stepping draw the same numbers. Storage and sides are the
exact SVD projector's (:class:`~lowmem_optim.projection.base.MatrixProjector`).
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem_optim.parts import HParam, integer
from lowmem_optim.projection.base import MatrixProjector
from lowmem_optim.projection.svd import fix_signs, singular_vectors


def randomized_singular_vectors(
    a: torch.Tensor, rank: int, oversample: int, power_iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V^T) in float32 with k = min(rank + oversample, m, n) approximate singular vectors."""
    a = a.float()
    m, n = a.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    u_b, vh = singular_vectors(q.T @ a)
    return fix_signs(q @ u_b, dim=0), vh


class RandomizedSVDProjector(MatrixProjector):
    """Randomized-SVD subspace (module docstring)."""

    hparams = (*MatrixProjector.hparams,
               HParam("oversample", 10, integer(0), "extra random directions k - r of the randomized SVD"),
               HParam("power_iters", 2, integer(0), "power iterations q of the randomized SVD"))

    def factors(self, grad: torch.Tensor, group: dict[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator(device=grad.device).manual_seed(seed)
        return randomized_singular_vectors(grad, group["rank"], group["oversample"], group["power_iters"], generator)
