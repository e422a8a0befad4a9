"""The projector: chooses, stores and applies a rank-r subspace for one weight matrix.

A projector knows nothing of moments or learning rates. For a gradient G (m x n) it projects
on the left (P, m x r: R = P^T G, r x n), on the right (Q, n x r: R = G Q, m x r) or on both
(R = P^T G Q, r x r), and maps a low-rank update N back with P N, N Q^T or P N Q^T. What
defines the subspace lives in the parameter's optimizer state as tensors; projectors
themselves are stateless and built from a param group's hyperparameters.
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem_optim.finite import all_finite
from lowmem_optim.parts import HParam, Part, SubspaceChange, one_of
from lowmem_optim.projection.storage import BasisStorage, load_basis, store_basis
from lowmem_optim.sharding import RowShard, StateLayout

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJ_TYPE = HParam(
    "proj_type",
    "std",
    one_of(*PROJ_TYPES),
    "projected side: std (the smaller dimension's), reverse_std, left, right, full (both)",
)


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


def projected_shape(shape: tuple[int, int], group: dict[str, Any]) -> tuple[int, int]:
    """The shape of R = project(G) for a matrix of ``shape``: r x n, m x r or r x r."""
    left, right = projection_sides(shape, group["proj_type"])
    r = group["rank"]
    return (r if left else shape[0], r if right else shape[1])


class MatrixProjector(Part):
    """Shared logic of projectors that store dense orthonormal bases (SVD, randomized SVD).

    A subclass supplies :meth:`factors`, (U, V^T) of the gradient whose leading ``rank``
    columns / rows span the chosen subspace. State: ``proj_left`` (P = U[:, :r], m x r) and/or
    ``proj_right`` (V^T[:r], r x n, as galore-torch stores it), kept as the group's
    ``proj_bits`` asks (:mod:`lowmem_optim.projection.storage`: gradient dtype, or INT8/INT4).
    On an FSDP2-sharded weight each rank keeps its rows of P (R = P^T G needs P_i only); an INT8
    or INT4 P is kept whole (its quantization groups run across the rows; it is 1/8 or 1/4 of
    a float32 P), and Q, which R = G Q needs whole on every rank, too.
    """

    hparams = (PROJ_TYPE,)
    storage = BasisStorage(("proj_left", "proj_right"))

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        left, right = projection_sides(shape, group["proj_type"])
        m, n = shape
        r = group["rank"]
        return sum(
            self.storage.basis_bytes(numel, dtype, group) for used, numel in ((left, m * r), (right, r * n)) if used
        )

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        """An INT8/INT4 basis is dequantized to ``dtype`` on each use (alive while it multiplies;
        a basis stored in ``dtype`` is used as it is), and a projection on both sides makes P N
        (m x r) before it meets Q."""
        left, right = projection_sides(shape, group["proj_type"])
        m, n = shape
        both_sides = m * group["rank"] * dtype.itemsize if left and right else 0
        if group["proj_bits"] in (None, 16):
            return both_sides
        return group["rank"] * ((m if left else 0) + (n if right else 0)) * dtype.itemsize + both_sides

    def sharded_layout(self, dim: int) -> StateLayout:
        """A float P has the rows of the weight (a quantized one is whole: ``_rows`` tells them apart)."""
        return StateLayout(rows=frozenset({"proj_left"}))

    def factors(
        self, grad: torch.Tensor, group: dict[str, Any], seed: int, shard: RowShard | None = None, left: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(U, V^T) in float32 with at least ``group['rank']`` leading singular vectors; U may be
        None when ``left`` is False. With ``shard``, ``grad`` is this rank's rows and both
        factors are whole, the same on every rank."""
        raise NotImplementedError

    def refresh(
        self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], seed: int, shard: RowShard | None = None
    ) -> SubspaceChange:
        finite = bool(all_finite(grad))
        if not (finite if shard is None else not shard.any(not finite)):
            raise FloatingPointError(
                f"{type(self).__name__}: the gradient holds inf/NaN at a subspace refresh; no subspace can be "
                "chosen from it (use torch.amp.GradScaler, which skips such steps, or clip gradients)"
            )
        left, right = projection_sides(
            (grad.shape[0] if shard is None else shard.rows, grad.shape[1]), group["proj_type"]
        )
        rank = group["rank"]
        u, vh = self.factors(grad, group, seed, shard, left)
        similarity = None
        for key, used, vectors, vector_dim in (("proj_left", left, u, 1), ("proj_right", right, vh, 0)):
            if not used:
                continue
            new = vectors.narrow(vector_dim, 0, rank).contiguous().to(grad.dtype)
            rows = shard if key == "proj_left" and group["proj_bits"] in (None, 16) else None
            if rows is not None:
                new = new[rows.start : rows.stop]  # this rank's rows of P
            moved = leading_similarity(load_basis(state, key, torch.float32), new, vector_dim, rows)
            similarity = moved if similarity is None else similarity
            store_basis(state, key, new, group)
        return SubspaceChange(similarity=similarity)

    def project(self, grad: torch.Tensor, state: dict[str, Any], shard: RowShard | None = None) -> torch.Tensor:
        out = grad
        left, right = load_basis(state, "proj_left", grad.dtype), load_basis(state, "proj_right", grad.dtype)
        if left is not None:
            out = _rows(left, shard).t() @ out
        if right is not None:
            out = out @ right.t()
        if left is not None and shard is not None:
            shard.all_reduce_(out)  # P^T G = sum over ranks of P_i^T G_i
        return out

    def back_project(self, low: torch.Tensor, state: dict[str, Any], shard: RowShard | None = None) -> torch.Tensor:
        out = low
        left, right = load_basis(state, "proj_left", low.dtype), load_basis(state, "proj_right", low.dtype)
        if left is not None:
            out = _rows(left, shard) @ out
        if right is not None:
            out = out @ right
        return out


def _rows(basis: torch.Tensor, shard: RowShard | None) -> torch.Tensor:
    """This rank's rows of a left basis: kept as they are, or sliced from a whole (quantized) P."""
    return basis if shard is None or basis.shape[0] != shard.rows else basis[shard.start : shard.stop]


def leading_similarity(
    old: torch.Tensor | None, new: torch.Tensor, vector_dim: int, shard: RowShard | None = None
) -> float | None:
    """|cos| between the leading basis vectors of two projections (sign of a singular vector
    is arbitrary, hence the absolute value); with ``shard``, of bases sharded by rows."""
    if old is None:
        return None
    a = old.select(vector_dim, 0).float()
    b = new.select(vector_dim, 0).float()
    dots = torch.stack([a @ b, a @ a, b @ b])
    if shard is not None:
        shard.all_reduce_(dots)
    return float(dots[0].abs() / (dots[1] * dots[2]).sqrt().clamp_min(1e-30))
