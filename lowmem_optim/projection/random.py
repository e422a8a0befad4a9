"""Random projector: a Gaussian subspace regenerated from a seed, never stored (APOLLO, Zhu et
al., MLSys 2025, arXiv 2412.05270; Flora, Hao et al., ICML 2024, before it).

For a gradient G (m x n) a refresh draws nothing: it keeps the seed the engine derives from
(the group's ``seed``, the parameter, the step), and every use regenerates from it

    P (m x r) and/or Q (n x r),   entries i.i.d. N(0, 1/r)   (APOLLO's P_t ~ N(0_seed, 1/r)),

so that E[P P^T] = I_m: R = P^T G preserves squared norms in expectation (Johnson-Lindenstrauss),
which is what APOLLO's ratios ||Adam(R)_j|| / ||R_j|| rest on. Sides follow GaLore's
``proj_type`` (:func:`~lowmem_optim.projection.base.projection_sides`: "std" projects the
smaller dimension); "full" draws P, then Q, from one generator. R = P^T G, G Q or P^T G Q, and
a low-rank N maps back as P N, N Q^T or P N Q^T (P P^T is not a projection: this is Flora's
back-projection, used only by the "projected" update form; APOLLO's update is G itself, scaled).

State (numbers, no tensor, no bytes): ``proj_seed`` (the refresh's seed), ``proj_rank``,
``proj_rows``, ``proj_cols`` (the whole matrix's m and n) and ``proj_sides`` (1 left, 2 right,
3 both). The matrix lives only while ``project`` or ``back_project`` runs (the memory model
counts it as workspace): drawn in float32 by a ``torch.Generator`` on the gradient's device,
so no host sync beyond handing it the seed, then cast to the gradient's dtype. Ranks and
resumes draw the same numbers on the same kind of device; CPU and CUDA generators differ, so
a run resumed on another kind of device continues with another, equally random, subspace.

A refresh keeps the rule's moments as they are (``SubspaceChange()``: APOLLO carries its Adam
moments across a new P unrotated, as GaLore does) and reports no similarity: two independent
draws have none to measure, so an adaptive schedule never grows the gap. On an FSDP2-sharded
weight (:mod:`lowmem_optim.sharding`) each rank regenerates P whole (m x r) and keeps its rows,
R = sum over ranks of P_i^T G_i (all-reduced); Q is the same whole matrix on every rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem_optim.parts import Part, SubspaceChange
from lowmem_optim.projection.base import PROJ_TYPE, projection_sides
from lowmem_optim.sharding import RowShard

#: ``proj_sides`` codes
LEFT, RIGHT = 1, 2


def _draw(
    gen: torch.Generator | None, sizes: tuple[int, ...], rank: int, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """One ``size x rank`` N(0, 1/rank) matrix per size, in order, from ``gen`` (float32 draws)."""
    std = 1.0 / math.sqrt(rank)
    return [
        torch.randn(size, rank, generator=gen, device=device, dtype=torch.float32).mul_(std).to(dtype) for size in sizes
    ]


class RandomProjector(Part):
    """Gaussian N(0, 1/r) projection regenerated from a seed; see the module docstring."""

    hparams = (PROJ_TYPE,)
    #: the projector stores a seed, not a matrix to quantize
    storage = None

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        """The regenerated P and/or Q in ``dtype``, alive while they multiply, and on both sides
        P N (m x r) before it meets Q^T. Each float32 draw lives only until its cast, before R
        exists: below the back-projection's bytes, which hold the m x n update."""
        left, right = projection_sides(shape, group["proj_type"])
        numel = group["rank"] * ((shape[0] if left else 0) + (shape[1] if right else 0))
        both_sides = shape[0] * group["rank"] if left and right else 0
        return (numel + both_sides) * dtype.itemsize

    def refresh(
        self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], seed: int, shard: RowShard | None = None
    ) -> SubspaceChange:
        rows = grad.shape[0] if shard is None else shard.rows
        left, right = projection_sides((rows, grad.shape[1]), group["proj_type"])
        state["proj_seed"], state["proj_rank"] = int(seed), group["rank"]
        state["proj_rows"], state["proj_cols"] = rows, grad.shape[1]
        state["proj_sides"] = (LEFT if left else 0) | (RIGHT if right else 0)
        return SubspaceChange()

    def matrices(
        self, state: dict[str, Any], like: torch.Tensor, shard: RowShard | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(P, Q) regenerated in ``like``'s dtype and device (None for a side not projected); with
        ``shard``, P's rows are this rank's."""
        sides = state["proj_sides"]
        sizes = [state[key] for key, side in (("proj_rows", LEFT), ("proj_cols", RIGHT)) if sides & side]
        # the meta device runs shapes only (the memory trace, the sync counter): no numbers to seed
        meta = like.device.type == "meta"
        gen = None if meta else torch.Generator(device=like.device).manual_seed(int(state["proj_seed"]))
        drawn = iter(_draw(gen, tuple(sizes), state["proj_rank"], like.device, like.dtype))
        left = next(drawn) if sides & LEFT else None
        right = next(drawn) if sides & RIGHT else None
        if left is not None and shard is not None:
            left = left[shard.start : shard.stop]
        return left, right

    def project(self, grad: torch.Tensor, state: dict[str, Any], shard: RowShard | None = None) -> torch.Tensor:
        left, right = self.matrices(state, grad, shard)
        out = grad if left is None else left.T @ grad
        if right is not None:
            out = out @ right
        if left is not None and shard is not None:
            shard.all_reduce_(out)  # P^T G = sum over ranks of P_i^T G_i
        return out

    def back_project(self, low: torch.Tensor, state: dict[str, Any], shard: RowShard | None = None) -> torch.Tensor:
        left, right = self.matrices(state, low, shard)
        out = low if left is None else left @ low
        return out if right is None else out @ right.T
