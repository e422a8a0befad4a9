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

On FSDP2-sharded rows G_i (:mod:`lowmem_optim.sharding`) every product keeps the rows local
and the sums over rows are all-reduced: Y_i = G_i Omega; orth(Y) by Cholesky-QR, twice for
orthogonality to rounding (Y^T Y = sum_i Y_i^T Y_i, a k x k all-reduce, factored in float64:
Q_i = Y_i R^-1); G^T Q = sum_i G_i^T Q_i (n x k all-reduce, then orthonormalized whole, as in
one process); B = Q^T G = sum_i Q_i^T G_i (k x n all-reduce). The leading singular vectors U
(needed for a left projection only) are gathered (m x k) and their signs fixed over whole
columns. Cholesky-QR differs from Householder QR in the signs of Q's columns and in rounding,
and both cancel in U = Q U_B once the signs are fixed. A Gram matrix without a Cholesky factor
(G of rank below k, e.g. all zero) falls back to gathering G.
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem_optim.parts import HParam, integer
from lowmem_optim.projection.base import MatrixProjector
from lowmem_optim.projection.svd import fix_signs, singular_vectors
from lowmem_optim.sharding import RowShard


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


def _cholesky_qr(y: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """This rank's rows of orth(Y) for Y sharded by rows: Q_i = Y_i R^-1, Y^T Y = R^T R.
    Raises torch.linalg.LinAlgError (on every rank alike) when Y^T Y has no Cholesky factor."""
    for _ in range(2):  # the second pass restores orthogonality lost to the squared condition number
        gram = shard.all_reduce_(y.double().T @ y.double())
        upper = torch.linalg.cholesky(gram).T
        y = torch.linalg.solve_triangular(upper, y.double(), upper=True, left=False).float()
    return y


def sharded_randomized_singular_vectors(
    a: torch.Tensor,
    shard: RowShard,
    rank: int,
    oversample: int,
    power_iters: int,
    generator: torch.Generator,
    left: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """:func:`randomized_singular_vectors` of the matrix whose rows ``a`` holds on this rank (see
    the module docstring); U whole (None unless ``left``), V^T whole."""
    a = a.float()
    m, n = shard.rows, a.shape[1]
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, device=a.device, dtype=a.dtype)
    q = _cholesky_qr(a @ omega, shard)
    for _ in range(power_iters):
        q = torch.linalg.qr(shard.all_reduce_(a.T @ q)).Q
        q = _cholesky_qr(a @ q, shard)
    u_b, vh = singular_vectors(shard.all_reduce_(q.T @ a))
    return (fix_signs(shard.gather_rows(q @ u_b), dim=0) if left else None), vh


class RandomizedSVDProjector(MatrixProjector):
    """Randomized-SVD subspace (module docstring)."""

    hparams = (
        *MatrixProjector.hparams,
        HParam("oversample", 10, integer(0), "extra random directions k - r of the randomized SVD"),
        HParam("power_iters", 2, integer(0), "power iterations q of the randomized SVD"),
    )

    def factors(
        self, grad: torch.Tensor, group: dict[str, Any], seed: int, shard: RowShard | None = None, left: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        args = (group["rank"], group["oversample"], group["power_iters"])
        if shard is not None:
            try:
                return sharded_randomized_singular_vectors(grad, shard, *args, _generator(grad, seed), left)
            except torch.linalg.LinAlgError:  # decided alike on every rank: the Gram matrices are equal
                grad = shard.gather_rows(grad)
        return randomized_singular_vectors(grad, *args, _generator(grad, seed))


def _generator(like: torch.Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=like.device).manual_seed(seed)
