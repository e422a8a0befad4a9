"""Update forms: the full-size update U of a projected parameter, made from its low-rank step.

For a weight W (m x n) with gradient G, projected as R = P^T G (r x n, a left projection) or
R = G Q (m x r, a right one), the rule gives N = rule(R) (N already carries the step size
lr_t), and the engine applies W <- W (1 - lr_t wd) - scale * U with U one of:

* ``"projected"`` (GaLore): U = back_project(N) = P N (or N Q^T). No state.
* ``"residual"`` (Fira; Chen et al., 2024, arXiv 2410.01623): U = P N + S with
  S = phi ⊙ (G - P R), phi_j = ||N_j|| / ||R_j||: the part of G the subspace leaves out, each
  channel scaled by how much the rule scaled that channel of R ("norm-based scaling").
* ``"channel"`` (APOLLO; Zhu et al., MLSys 2025, arXiv 2412.05270): U = S with
  S = G ⊙ s, s_j = ||N_j|| / ||R_j||: the raw gradient, each channel scaled by the rule's
  factor for it in the subspace.
* ``"tensor"`` (APOLLO-Mini, same paper): U = S with S = G ||N||_F / ||R||_F.

A channel j is a vector that R keeps whole: a column (length r of R, m of G) for a left
projection, a row for a right one; a channel with ||R_j|| = 0 gets the factor 0. A projection
on both sides (R = P^T G Q) keeps no channel: only ``"projected"`` and ``"tensor"`` accept it.

Norm-growth limiter (both papers; ``norm_growth_limit`` gamma, None: off): the scaled term may
grow by at most gamma per step,

    if ||S_t|| > gamma ||S_{t-1}||:   S_t <- S_t gamma ||S_{t-1}|| / ||S_t||,

and the first step (no S_0) is not limited. Here N carries lr_t, so the limiter compares the
step-size-free term S_t / lr_t: a learning-rate warm-up (lr_t growing several percent per step)
is not clipped to gamma per step, and the limiter acts on the gradient statistics the papers
meant. ||S_t / lr_t|| after limiting is kept as ``update_norm`` (a 0-D float32 tensor on the
parameter's device, so no step reads it on the host), from the first step on; a refresh of the
subspace resets nothing. A history of 0 (all gradients so far zero) limits nothing, as the first
step; a step with lr_t = 0 leaves the history as it was.

On an FSDP2-sharded weight (this rank's rows of G, :mod:`lowmem_optim.sharding`) no channel
norm needs communication: a left projection's R = P^T G is summed over the ranks and N is
gathered whole, so every rank holds all columns; a right projection's rows are the weight's
rows. ||S|| (the limiter) and a right projection's ||N||_F, ||R||_F (``"tensor"``) are summed
over the ranks.

Forms are parts (:class:`lowmem_optim.parts.Part`), stateless; the engine calls
:meth:`UpdateForm.update` once per projected parameter and step, with the whole gradient G
(low-rank gradient accumulation, which never holds G, accepts only ``"projected"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowmem_optim.parts import HParam, Part, number, optional
from lowmem_optim.sharding import RowShard, global_norm, global_sum, norm_exponent

#: the state key of the limiter's history: ||S_{t-1} / lr_{t-1}||
LIMITER_KEY = "update_norm"


@dataclass(frozen=True)
class LowRankStep:
    """What the engine hands a form for one projected parameter's step.

    grad: G, this rank's rows of the m x n gradient (None when the step never holds it);
    low: R; update: N = rule(R), carrying ``lr``; sides: (projected on the left, on the right);
    shard: the rows of G this rank holds (None: all); dtype: the dtype U is made in."""

    grad: torch.Tensor | None
    low: torch.Tensor
    update: torch.Tensor
    lr: float | torch.Tensor
    sides: tuple[bool, bool]
    shard: RowShard | None
    dtype: torch.dtype

    @property
    def channel_dim(self) -> int:
        """The dimension of R and G along which a channel runs: 0 (a column) for a left projection."""
        return 0 if self.sides[0] else 1

    @property
    def low_shard(self) -> RowShard | None:
        """The rows of R and N this rank holds: a left projection's are whole, a right one's the weight's."""
        return None if self.sides[0] else self.shard


class UpdateForm(Part):
    """``"projected"``: U = back_project(N), the low-rank update mapped back (GaLore)."""

    #: whether U holds G itself (the refusals: error feedback, low-rank accumulation)
    needs_gradient = False
    #: whether U holds back_project(N) (the memory model: the back-projection's temporaries exist)
    adds_projected = True

    def update(
        self,
        step: LowRankStep,
        back_project: Callable[[torch.Tensor], torch.Tensor],
        state: dict[str, Any],
        group: dict[str, Any],
    ) -> torch.Tensor:
        """U (this rank's rows, m x n, in ``step.dtype``); ``back_project`` maps a low-rank
        tensor to this rank's rows of the full size."""
        return back_project(step.update.to(step.dtype))


class ScaledGradientForm(UpdateForm):
    """Base of the forms that add a scaled full-size term S, with the norm-growth limiter."""

    needs_gradient = True
    hparams = (
        HParam(
            "norm_growth_limit",
            1.01,
            optional(number(1, low_open=True)),
            "largest growth per step of the scaled gradient term's norm, without the step size (None: no limit)",
        ),
    )
    #: whether R must keep a channel whole (a projection on both sides keeps none)
    per_channel = True
    #: U is S alone (APOLLO); Fira's P N + S sets it
    adds_projected = False

    def validate(self, group: dict[str, Any]) -> None:
        form = group["update_form"]
        if group.get("error_feedback") is not None:
            raise ValueError(
                f"Invalid error_feedback={group['error_feedback']!r} with update_form={form!r}: both give back "
                f"the part of the gradient a projection discards (allowed: error_feedback=None with "
                f"update_form={form!r}, or update_form='projected')"
            )
        if self.per_channel and group.get("proj_type") == "full":
            raise ValueError(
                f"Invalid proj_type='full' with update_form={form!r}: a projection on both sides keeps no row or "
                "column of the gradient whole to scale (allowed: proj_type std, reverse_std, left or right, or "
                "update_form 'projected' or 'tensor')"
            )

    def fixed_dtype_keys(self, param_dtype: torch.dtype) -> frozenset[str]:
        return frozenset({LIMITER_KEY})

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return 0 if group["norm_growth_limit"] is None else 4

    def scaled_term(self, step: LowRankStep, back_project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """S before the limiter, in ``step.dtype`` (a new tensor: G is never written)."""
        raise NotImplementedError

    def update(
        self,
        step: LowRankStep,
        back_project: Callable[[torch.Tensor], torch.Tensor],
        state: dict[str, Any],
        group: dict[str, Any],
    ) -> torch.Tensor:
        if step.grad is None:
            raise ValueError(
                f"update_form={group['update_form']!r} needs the step's whole gradient, which this step never "
                "holds (allowed: update_form='projected')"
            )
        term = self.scaled_term(step, back_project)
        if group["norm_growth_limit"] is not None:
            limit_growth(term, step.lr, state, group["norm_growth_limit"], step.shard)
        return term.add_(back_project(step.update.to(step.dtype))) if self.adds_projected else term


class ResidualForm(ScaledGradientForm):
    """``"residual"`` (Fira): U = P N + phi ⊙ (G - P R), phi_j = ||N_j|| / ||R_j||, limited."""

    adds_projected = True

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return math.prod(shape) * dtype.itemsize  # the residual G - P R, alive beside P N

    def scaled_term(self, step: LowRankStep, back_project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        residual = back_project(step.low).to(step.dtype).neg_().add_(step.grad)
        return residual.mul_(_per_channel(channel_ratio(step.update, step.low, step.channel_dim), step))


class ChannelForm(ScaledGradientForm):
    """``"channel"`` (APOLLO): U = G ⊙ s, s_j = ||N_j|| / ||R_j||, limited."""

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        # S takes the place of P N; beside it the float32 factors (at most max(m, n) channels: a
        # std projection's) and their copy in a weight's lower precision
        return max(shape) * (4 + (0 if dtype == torch.float32 else dtype.itemsize))

    def scaled_term(self, step: LowRankStep, back_project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ratio = channel_ratio(step.update, step.low, step.channel_dim)
        return step.grad.to(step.dtype) * _per_channel(ratio, step)


class TensorForm(ScaledGradientForm):
    """``"tensor"`` (APOLLO-Mini): U = G ||N||_F / ||R||_F, limited."""

    per_channel = False

    def scaled_term(self, step: LowRankStep, back_project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        low_norm = global_norm(step.low.float(), step.low_shard)
        ratio = global_norm(step.update.float(), step.low_shard) / low_norm
        ratio = torch.where(low_norm > 0, ratio, 0.0)
        return step.grad.to(step.dtype) * ratio.to(step.dtype)


def channel_ratio(update: torch.Tensor, low: torch.Tensor, dim: int) -> torch.Tensor:
    """||N_j|| / ||R_j|| per channel (the norms taken along ``dim``), in float32; 0 where
    ||R_j|| = 0. Finite for any finite entries: each tensor is scaled by a power of two before
    its squares are summed (as :func:`lowmem_optim.sharding.scaled_norm`), the ratio taken in float64."""
    update_norms, update_exp = _scaled_norms(update, dim)
    low_norms, low_exp = _scaled_norms(low, dim)
    one = torch.ones((), dtype=torch.float64, device=update_norms.device)
    ratio = update_norms.double() / low_norms.double() * torch.ldexp(one, update_exp - low_exp)
    ratio = torch.where(low_norms > 0, ratio, 0.0)
    return ratio.clamp_(max=torch.finfo(torch.float32).max).float()


def _scaled_norms(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(||t_j 2^-e|| along ``dim`` in float32, e): e brings max|t| into [0.5, 1)."""
    t = t.float()
    exponent = norm_exponent(t)
    return torch.linalg.vector_norm(torch.ldexp(t, -exponent), dim=dim), exponent


def _per_channel(ratio: torch.Tensor, step: LowRankStep) -> torch.Tensor:
    """The factors broadcast over G's rows or columns, in ``step.dtype``."""
    factors = ratio.to(step.dtype)
    return factors.unsqueeze(0) if step.channel_dim == 0 else factors.unsqueeze(1)


def limit_growth(
    term: torch.Tensor, lr: float | torch.Tensor, state: dict[str, Any], gamma: float, shard: RowShard | None
) -> None:
    """The norm-growth limiter on ``term`` = S_t (this rank's rows), in place, on its
    step-size-free norm ||S_t|| / lr; ``state[LIMITER_KEY]`` keeps that norm after limiting."""
    local = torch.linalg.vector_norm(term, dtype=torch.float32)  # S is lr-sized: no float32 square overflows
    norm = local if shard is None else global_sum(local.square(), shard).sqrt()
    previous = state.get(LIMITER_KEY)
    if previous is None:
        previous = state[LIMITER_KEY] = torch.zeros((), dtype=torch.float32, device=term.device)
    if torch.is_tensor(lr):
        free = torch.where(lr > 0, norm / lr, previous)
    elif lr > 0:
        free = norm / lr
    else:
        return  # no step: the history stays
    bound = gamma * previous
    limited = (previous > 0) & (free > bound)
    term.mul_(torch.where(limited, bound / free.clamp_min(torch.finfo(torch.float32).tiny), 1.0).to(term.dtype))
    previous.copy_(torch.where(limited, bound, free))


#: the group key ``update_form``'s choices
UPDATE_FORMS: dict[str, type] = {
    "projected": UpdateForm,
    "residual": ResidualForm,
    "channel": ChannelForm,
    "tensor": TensorForm,
}
