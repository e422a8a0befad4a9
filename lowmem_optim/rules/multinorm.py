"""Stateless normalized updates for weight matrices: SinkGD and SCALE's channel normalization.

Both take the gradient G viewed as a matrix m x n (torch's (out, in) layout; conv and other N-D
weights as (out, -1)) and rescale its rows and/or columns to unit RMS, so every entry of the
update is O(1) whatever the gradient's scale, as Adam's is, with no second moment:

- SinkGD (Scetbon et al., "Gradient Multi-Normalization for Stateless and Scalable LLM
  Training", arXiv 2502.06742): ``sinkhorn_iterations`` = L rounds of SR-Sinkhorn,
      X <- sqrt(n) Q(X)^-1 X;   X <- sqrt(m) X R(X)^-1        (X_0 = G, U = X_L)
  with Q(X), R(X) the diagonals of the row and column l2 norms: each round gives every row
  the norm sqrt(n), then every column the norm sqrt(m) (unit RMS), and the rounds converge to
  a matrix whose rows and columns all have unit RMS (a fixed point of both normalizations).
  No state at all.
- SCALE (Glentis et al., "A Minimalist Optimizer Design for LLM Pretraining", arXiv
  2506.16659): each output channel of G (or of the momentum M = beta M + (1 - beta) G when
  ``momentum`` > 0) divided by its RMS,
      U_i = M_i / rms(M_i),   rms(M_i) = sqrt(mean_j M_ij^2)
  The paper writes W as d_in x d_out and normalizes its columns; a column there is an output
  channel, a row of torch's (out, in) weight here (its code divides by the RMS over the input
  dimension). With ``momentum=0`` (the paper's setting for every layer but the output head)
  the rule keeps no state.

The update is lr * s * U with the normalized rules' shape factor s (``adjust_lr_fn``, default
``"none"``: s = 1, since U already has unit RMS per entry; :func:`~lowmem_optim.rules.normalized.lr_adjustment`);
the engine applies decoupled decay W <- W (1 - lr wd) first. A zero row or column stays zero.

Scale: the first normalization divides G by row norms computed on G scaled by the power of two
that brings max|G| into [0.5, 1) (exact, so the result is the plain formula's), so no square
overflows even at entries near float32's largest; after it every entry is at most sqrt(n).

Sharded rows (FSDP2, :mod:`lowmem_optim.sharding`): a row's norm is this rank's; a column's sum
of squares is summed over the ranks (one all-reduce of n values per SinkGD round; none for SCALE).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from lowmem_optim.parts import HParam, integer
from lowmem_optim.rules.base import LR, WEIGHT_DECAY
from lowmem_optim.rules.normalized import ADJUST_LR_FN, MOMENTUM, NormalizedMomentumRule, lr_adjustment
from lowmem_optim.sharding import RowShard, global_numel

SINKHORN_ITERATIONS = HParam(
    "sinkhorn_iterations", 5, integer(1, 99), "SR-Sinkhorn rounds L (a row then a column normalization each)"
)


def _floor(x: torch.Tensor) -> float:
    """The smallest normal number of x's dtype: a zero norm divides nothing by zero."""
    return torch.finfo(x.dtype).tiny


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of the 2-D ``x`` divided by its RMS (norm sqrt(n)); zero rows stay zero. ``x`` is
    first scaled by a power of two (exact) so that no square of an entry overflows."""
    if x.numel() == 0:
        return x.clone()
    exponent = torch.frexp(torch.linalg.vector_norm(x, ord=math.inf)).exponent.clamp_(-126, 126)
    scaled = torch.mul(x, torch.ldexp(torch.ones((), dtype=x.dtype, device=x.device), -exponent))
    rms = torch.linalg.vector_norm(scaled, dim=1, keepdim=True).div_(math.sqrt(x.size(1)))
    return scaled.div_(rms.clamp_min_(_floor(x)))


def _divide_rows_by_rms_(x: torch.Tensor) -> torch.Tensor:
    """:func:`normalize_rows` in place, unscaled: for entries whose squares cannot overflow."""
    return x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).div_(math.sqrt(x.size(1))).clamp_min_(_floor(x)))


def row_normalization_workspace_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The peak of :func:`normalize_rows` of a ``shape`` tensor: the scaled copy (normalized in
    place, then the update), its row norms and the 0-D int32 exponent of the scaling."""
    return (math.prod(shape) + shape[0]) * dtype.itemsize + 4


def normalize_columns_(x: torch.Tensor, shard: RowShard | None = None) -> torch.Tensor:
    """Each column of the 2-D ``x`` divided by its RMS over all rows (with ``shard``, ``x`` is
    this rank's rows, possibly none, and the squares are summed over the ranks), in place. The
    entries must be at most ~1e18 in float32 (true after :func:`normalize_rows`: at most sqrt(n))."""
    squares = torch.linalg.vector_norm(x, dim=0, keepdim=True).square_()
    if shard is not None:
        shard.all_reduce_(squares)
    rows = x.size(0) if shard is None else shard.rows
    return x.div_(squares.div_(max(rows, 1)).sqrt_().clamp_min_(_floor(x)))


def sinkhorn_normalize(g: torch.Tensor, iterations: int, shard: RowShard | None = None) -> torch.Tensor:
    """SR-Sinkhorn: ``iterations`` rounds of row then column normalization to unit RMS of the
    2-D ``g`` (a new tensor; ``g`` is left as it was). After the first round every entry is at
    most sqrt(m), so the later rounds work in place on the one copy, unscaled."""
    x = normalize_columns_(normalize_rows(g), shard)
    for _ in range(iterations - 1):
        x = normalize_columns_(_divide_rows_by_rms_(x), shard)
    return x


class SinkhornRule(NormalizedMomentumRule):
    """SinkGD: U = L rounds of SR-Sinkhorn on G; stateless. The matrix view, the refusal of 1-D
    parameters and the shape factor are the normalized-momentum rules'."""

    hparams = (
        dataclasses.replace(LR, default=1e-3),
        dataclasses.replace(WEIGHT_DECAY, default=0.0),
        dataclasses.replace(ADJUST_LR_FN, default="none"),
        SINKHORN_ITERATIONS,
    )

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return 0

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        # the one iterate X (normalized in place, then the update), then its row or column norms
        rows = row_normalization_workspace_bytes(shape, dtype) - math.prod(shape) * dtype.itemsize
        return math.prod(shape) * dtype.itemsize + max(rows, math.prod(shape[1:]) * dtype.itemsize)

    def update(
        self,
        g: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        param: torch.Tensor,
        shard: RowShard | None = None,
        seed: int = 0,
    ) -> tuple[torch.Tensor, float]:
        if global_numel(g, shard) == 0:  # a zero-size weight has nothing to normalize, nor anything to move
            return torch.zeros_like(g), group["lr"]
        x = sinkhorn_normalize(g.reshape(g.shape[0], -1), group["sinkhorn_iterations"], shard)
        return x.mul_(_step_size(group, param)).reshape(g.shape), group["lr"]


class ChannelNormalizedRule(NormalizedMomentumRule):
    """SCALE's update: each output channel (row) of G, or of its momentum, divided by its RMS.
    ``momentum=0`` keeps no state; otherwise ``momentum_buffer`` (the shape of g)."""

    hparams = (
        dataclasses.replace(LR, default=1e-3),
        dataclasses.replace(WEIGHT_DECAY, default=0.0),
        dataclasses.replace(MOMENTUM, default=0.0),
        dataclasses.replace(ADJUST_LR_FN, default="none"),
    )

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return math.prod(shape) * dtype.itemsize if group["momentum"] > 0 else 0

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return row_normalization_workspace_bytes(shape, dtype)

    def update(
        self,
        g: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        param: torch.Tensor,
        shard: RowShard | None = None,
        seed: int = 0,
    ) -> tuple[torch.Tensor, float]:
        beta = group["momentum"]
        if beta > 0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            g = state["momentum_buffer"].lerp_(g, 1 - beta)
        if g.numel() == 0:
            return torch.zeros_like(g), group["lr"]
        return normalize_rows(g.reshape(g.shape[0], -1)).mul_(_step_size(group, param)).reshape(g.shape), group["lr"]


def _step_size(group: dict[str, Any], param: torch.Tensor) -> float:
    """lr * s; the shape factor belongs to the weight, also when the rule sees a projected gradient."""
    m = param.shape[0]
    return group["lr"] * lr_adjustment(m, param.numel() // m, group["adjust_lr_fn"])
