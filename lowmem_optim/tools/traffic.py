"""Bytes a rank sends through the optimizers' collectives under FSDP2, predicted from the param
groups' shapes and keys alone (what :mod:`lowmem_optim.sharding`'s collectives carry), under
ring algorithms: an all-reduce of B bytes sends 2 (w-1)/w B, an all-gather (w-1)/w B of its
result. :func:`lowmem_optim.sharding.count_traffic` counts the same bytes in a run.

Every parameter is taken as FSDP2 shards it (``Shard(0)`` over ``world`` ranks), its gradient
in the parameter's dtype, and stepped by ``optimizer.step()`` (layer-wise ``step_param`` checks
each refreshing gradient's finiteness on its own: one 4-byte all-reduce per parameter instead
of one per step). Three kinds of step send different bytes (:class:`PredictedTraffic`):
a plain step, a step at which every projected parameter chooses its first subspace, and one at
which it chooses a later one (a later refresh compares the new subspace with the old and, for
the DCT with ``dct_keep_moments``, moves the rule's state to the new indices). With
``stagger`` (or the adaptive schedule once gaps differ), parameters refresh at different steps:
:func:`step_bytes` predicts such a step from which parameters refresh in it. Not predicted:
the randomized SVD's fallback to gathering G when a Gram matrix has no Cholesky factor (a
gradient of rank below k), which the values decide.

One function per source of traffic, each reading what the code it names sends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from lowmem_optim.engine import splits_projected_rows
from lowmem_optim.projection.base import projected_shape, projection_sides
from lowmem_optim.registry import package_optimizers
from lowmem_optim.rules import RULES
from lowmem_optim.rules.adam import moment_dtype
from lowmem_optim.shapes import matrix_shape, uses_projection

#: bytes of the scalars the collectives carry: a float32 flag or norm, a float64 sum of squares
FLOAT32, FLOAT64 = 4, 8


class PredictedTraffic(NamedTuple):
    """Bytes one rank sends in one optimizer step."""

    step: float  # no subspace refresh
    refresh: float  # every projected parameter chooses its first subspace
    later_refresh: float  # every projected parameter chooses a later subspace


def ring_bytes(op: str, nbytes: float, world: int) -> float:
    """Bytes one rank sends in an ``"all_reduce"`` or ``"all_gather"`` of ``nbytes``."""
    return (2 if op == "all_reduce" else 1) * (world - 1) / world * nbytes


@dataclass(frozen=True)
class _Projected:
    """A projected weight as its step sees it: G (m x n), R = project(G), the rule's rows."""

    shape: tuple[int, int]
    low: tuple[int, int]
    left: bool
    split: bool  # R = P^T G's rows split over the ranks, the rule's update gathered
    dtype: torch.dtype  # of G and R

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def rule_rows_sharded(self) -> bool:
        """Whether the rule sees a block of rows (the weight's for G Q, R's where split)."""
        return self.split or not self.left


def _projected(group: dict[str, Any], p: torch.Tensor, world: int) -> _Projected:
    shape = matrix_shape(p)
    left, _ = projection_sides(shape, group["proj_type"])
    split = left and splits_projected_rows(RULES[group["rule"]](), group, shape, p.dtype, world)
    return _Projected(shape, projected_shape(shape, group), left, split, p.dtype)


def parameter_bytes(optimizer: torch.optim.Optimizer, world: int) -> dict[torch.Tensor, PredictedTraffic]:
    """Per parameter, the bytes its own share of each kind of step sends (the refresh steps'
    shared finiteness check not included: :func:`step_bytes` adds it once)."""
    per_param = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not uses_projection(p, group):
                rule = _rule_bytes(group, tuple(p.shape), True, p.dtype, world)
                per_param[p] = PredictedTraffic(rule, rule, rule)
                continue
            w = _projected(group, p, world)
            step = _projected_step_bytes(group, w, world)
            first = step + _refresh_bytes(group, w, world, later=False)
            per_param[p] = PredictedTraffic(step, first, step + _refresh_bytes(group, w, world, later=True))
    return per_param


def step_bytes(optimizer: torch.optim.Optimizer, world: int, refreshing: dict[torch.Tensor, str]) -> float:
    """The bytes one rank sends in a step where the parameters in ``refreshing`` choose a subspace
    (``"refresh"`` for their first, ``"later_refresh"`` for a later one) and the others do not:
    the steps of ``stagger`` or of the adaptive schedule, where parameters refresh apart."""
    return _step_sum(parameter_bytes(optimizer, world), refreshing, world)


def predicted_bytes(optimizer: torch.optim.Optimizer, world: int) -> PredictedTraffic:
    """The bytes one rank sends per plain step, first-refresh step and later-refresh step (every
    projected parameter refreshing together, as without ``stagger``)."""
    per_param = parameter_bytes(optimizer, world)
    projected = [p for group in optimizer.param_groups for p in group["params"] if uses_projection(p, group)]
    every = lambda kind: _step_sum(per_param, dict.fromkeys(projected, kind), world)  # noqa: E731
    return PredictedTraffic(_step_sum(per_param, {}, world), every("refresh"), every("later_refresh"))


def _step_sum(
    per_param: dict[torch.Tensor, PredictedTraffic], refreshing: dict[torch.Tensor, str], world: int
) -> float:
    if unknown := [kind for kind in refreshing.values() if kind not in ("refresh", "later_refresh")]:
        raise ValueError(f"Invalid refreshing: {unknown[0]!r} (allowed: 'refresh', 'later_refresh')")
    sent = sum(getattr(traffic, refreshing.get(p, "step")) for p, traffic in per_param.items())
    return sent + (_refresh_check_bytes(world) if refreshing else 0.0)


def _projected_step_bytes(group: dict[str, Any], w: _Projected, world: int) -> float:
    """A projected weight's step without a refresh: R = P^T G summed over the ranks (a left
    projection), the rule, the gather of a split R's update, the update form."""
    sent = _projection_bytes(w, world)
    sent += _rule_bytes(group, w.low, w.rule_rows_sharded, w.dtype, world)
    if w.split:  # finish_projected: each rank's rows of N gathered
        sent += ring_bytes("all_gather", math.prod(w.low) * _update_itemsize(group, w.dtype), world)
    return sent + _form_bytes(group, w, world)


def _projection_bytes(w: _Projected, world: int) -> float:
    """R = P^T G (or Q_I^T G) is the sum over the ranks of P_i^T G_i; G Q keeps G's rows."""
    return ring_bytes("all_reduce", math.prod(w.low) * w.itemsize, world) if w.left else 0.0


def _rule_bytes(
    group: dict[str, Any], shape: tuple[int, ...], rows_sharded: bool, dtype: torch.dtype, world: int
) -> float:
    """The rule's reductions over a tensor of ``shape`` and ``dtype`` (the global shape of what it
    sees: the weight, or R), its rows sharded over the ranks or whole on every rank."""
    rule = group["rule"]
    if rule == "adafactor":
        return _adafactor_bytes(group, shape, rows_sharded, world)
    if not rows_sharded:
        return 0.0
    columns = math.prod(shape[1:])
    if rule == "auon":  # ||D||_F and ||cosh(gamma X)||_F, float64 sums of squares
        return 2 * ring_bytes("all_reduce", FLOAT64, world)
    if rule in ("muon", "hybrid_auon"):  # the momentum D gathered whole for Newton-Schulz
        return ring_bytes("all_gather", shape[0] * columns * _momentum_itemsize(group, dtype), world)
    if rule == "sinkhorn":  # the column sums of squares, once per round
        return group["sinkhorn_iterations"] * ring_bytes("all_reduce", columns * dtype.itemsize, world)
    return 0.0  # adam, adam8bit, channel_normalized: elementwise or per row


def _adafactor_bytes(group: dict[str, Any], shape: tuple[int, ...], rows_sharded: bool, world: int) -> float:
    """RMS(W) of the sharded weight (with ``scale_parameter``); where the rows are sharded, a
    2-D tensor's column statistic (float64 means over the rows) and the mean of its row
    statistic, and RMS(update). Means of N-D tensors run over dimensions each rank holds whole."""
    sent = ring_bytes("all_reduce", FLOAT64, world) if group["scale_parameter"] and group["lr"] != 0 else 0.0
    if not rows_sharded:
        return sent
    if len(shape) == 2:
        sent += ring_bytes("all_reduce", FLOAT64 * (shape[1] + 1), world)
    return sent + ring_bytes("all_reduce", FLOAT64, world)


def _form_bytes(group: dict[str, Any], w: _Projected, world: int) -> float:
    """The update form's norms: the limiter's ||S|| over the weight's rows, and for ``"tensor"``
    ||N||_F and ||R||_F where R has the weight's rows (a right projection)."""
    form = group["update_form"]
    if form == "projected":
        return 0.0
    sent = 0.0 if group["norm_growth_limit"] is None else ring_bytes("all_reduce", FLOAT32, world)
    if form == "tensor" and not w.left:
        sent += 2 * ring_bytes("all_reduce", FLOAT64, world)
    return sent


def _update_itemsize(group: dict[str, Any], dtype: torch.dtype) -> int:
    """The bytes of a value of the rule's update N of a tensor of ``dtype``."""
    rule = group["rule"]
    if rule == "adam":  # in its moments' dtype
        return moment_dtype(dtype).itemsize
    if rule in ("adam8bit", "adafactor"):
        return FLOAT32
    if rule in ("auon", "hybrid_auon", "muon"):
        return _momentum_itemsize(group, dtype)
    return dtype.itemsize  # sinkhorn, channel_normalized: the gradient's


def _momentum_itemsize(group: dict[str, Any], dtype: torch.dtype) -> int:
    """The bytes of a value of the normalized rules' momentum D (momentum_storage.load): the
    gradient's dtype (``"auto"``), float32, or for the rounded forms float32 or wider."""
    kind = group["momentum_dtype"]
    if kind == "auto":
        return dtype.itemsize
    return FLOAT32 if kind == "float32" else max(dtype.itemsize, FLOAT32)


# ---- refresh steps --------------------------------------------------------------------------------
def _refresh_check_bytes(world: int) -> float:
    """Whether some rank's gradient is not finite, once per step at which a refresh is due
    (``ComposedOptimizer._check_refresh_gradients``)."""
    return ring_bytes("all_reduce", FLOAT32, world)


def _refresh_bytes(group: dict[str, Any], w: _Projected, world: int, later: bool) -> float:
    """What a refresh adds to the weight's step: the projector's choice, whether the gradient is
    all zero on some rank (``refresh_if_due``), and moving the rule's state (``carry``)."""
    method = group["proj_method"]
    if method == "svd":
        sent = _svd_bytes(w, world)
    elif method == "randomized_svd":
        sent = _randomized_svd_bytes(group, w, world)
    elif method == "dct":
        sent = _dct_bytes(w, world)
    else:  # "random": the seed is kept, nothing chosen from G
        sent = 0.0
    if later:
        sent += _similarity_bytes(group, w, world) + _carry_bytes(group, w, world)
    return sent + ring_bytes("all_reduce", FLOAT32, world)


def _svd_bytes(w: _Projected, world: int) -> float:
    """Whether G is finite on every rank (MatrixProjector.refresh), and G gathered for its SVD."""
    return ring_bytes("all_reduce", FLOAT32, world) + ring_bytes("all_gather", math.prod(w.shape) * w.itemsize, world)


def _randomized_svd_bytes(group: dict[str, Any], w: _Projected, world: int) -> float:
    """The finiteness check, then (sharded_randomized_singular_vectors, k = min(r + oversample, m, n)):
    two k x k float64 Gram matrices per Cholesky-QR, one QR before and one per power iteration;
    G^T Q (n x k) per power iteration and B = Q^T G (k x n), float32; U (m x k) gathered for a
    left projection."""
    (m, n), iterations = w.shape, group["power_iters"]
    k = min(group["rank"] + group["oversample"], m, n)
    sent = ring_bytes("all_reduce", FLOAT32, world)
    sent += 2 * (1 + iterations) * ring_bytes("all_reduce", FLOAT64 * k * k, world)
    sent += (iterations + 1) * ring_bytes("all_reduce", FLOAT32 * n * k, world)
    return sent + (ring_bytes("all_gather", FLOAT32 * m * k, world) if w.left else 0.0)


def _dct_bytes(w: _Projected, world: int) -> float:
    """Along the rows (left) G is gathered for its spectrum, which gives R whole: the step's
    all-reduce of R is saved; along the columns each column's float32 score is summed."""
    m, n = w.shape
    if w.left:
        return ring_bytes("all_gather", m * n * w.itemsize, world) - _projection_bytes(w, world)
    return ring_bytes("all_reduce", FLOAT32 * n, world)


def _similarity_bytes(group: dict[str, Any], w: _Projected, world: int) -> float:
    """A later SVD refresh compares the leading vectors of the old and new P, whose rows a float
    P keeps per rank: three float32 dot products summed (leading_similarity). A quantized P is
    whole on every rank; Q always is."""
    matrix = group["proj_method"] in ("svd", "randomized_svd")
    sharded_p = matrix and w.left and group["proj_bits"] in (None, 16)
    return ring_bytes("all_reduce", 3 * FLOAT32, world) if sharded_p else 0.0


def _carry_bytes(group: dict[str, Any], w: _Projected, world: int) -> float:
    """A later DCT refresh with ``dct_keep_moments`` moves the rule's state to the new indices;
    along R's rows split over the ranks a row may move to another rank, so each state tensor
    indexed by them is gathered (rules.base.reindex_along)."""
    if not (group["proj_method"] == "dct" and group["dct_keep_moments"] and w.split):
        return 0.0
    rows, columns = w.low
    rule = group["rule"]
    if rule == "adam":  # exp_avg, exp_avg_sq
        gathered = 2 * rows * columns * moment_dtype(w.dtype).itemsize
    elif rule == "adam8bit":  # both moments, dequantized to float32
        gathered = 2 * rows * columns * FLOAT32
    elif rule == "adafactor":  # exp_avg (with beta1) and the row statistic
        gathered = FLOAT32 * rows * (columns if group["beta1"] is not None else 0) + FLOAT32 * rows
    elif rule in ("auon", "hybrid_auon", "muon", "channel_normalized"):
        gathered = _carried_momentum_bytes(group, rows, columns, w.itemsize)
    else:  # sinkhorn: no state
        gathered = 0
    return ring_bytes("all_gather", gathered, world)


def _carried_momentum_bytes(group: dict[str, Any], rows: int, columns: int, itemsize: int) -> int:
    """The momentum as momentum_storage.carry moves it: the stored buffer, or a quantized one
    dequantized to float32 (the 4-bit form with its rows padded to an even length)."""
    if group["rule"] == "channel_normalized":
        return rows * columns * itemsize if group["momentum"] > 0 else 0
    kind = group["momentum_dtype"]
    per_value = {"auto": itemsize, "float32": FLOAT32, "bfloat16": 2}.get(kind, FLOAT32)
    return rows * (columns + columns % 2 if kind == "4bit" else columns) * per_value


# ---- the choices the counts inform ----------------------------------------------------------------
def sharding_optimizers() -> list[str]:
    """The registry names whose optimizers step FSDP2-sharded parameters (:mod:`lowmem_optim.sharding`):
    every optimizer of this package (torch's AdamW sends nothing of its own; bitsandbytes' refuses shards)."""
    return package_optimizers()


def left_split(optimizer: torch.optim.Optimizer, world: int) -> dict[str, Any]:
    """What splitting R = P^T G by rows for the rule costs and saves against every rank keeping
    its moments whole: the moments' bytes per rank either way, the bytes the gather of the update
    adds per step, and whether the optimizer splits (:func:`splits_projected_rows`)."""
    out: dict[str, Any] = {"split_state": 0.0, "replicated_state": 0.0, "gather_bytes": 0.0, "split": False}
    for group in optimizer.param_groups:
        rule = RULES[group["rule"]]()
        for p in group["params"]:
            if not uses_projection(p, group):
                continue
            w = _projected(group, p, world)
            if not w.left:
                continue
            out["replicated_state"] += rule.state_bytes(w.low, p.dtype, group)
            out["split_state"] += rule.state_bytes((-(-w.low[0] // world), w.low[1]), p.dtype, group)
            out["gather_bytes"] += ring_bytes("all_gather", math.prod(w.low) * _update_itemsize(group, p.dtype), world)
            out["split"] = splits_projected_rows(rule, group, w.shape, p.dtype, world)
    return out


def gather_every_gradient_bytes(model: torch.nn.Module, world: int) -> float:
    """The naive way: every fp32 gradient gathered whole on every rank each step."""
    return ring_bytes("all_gather", 4 * sum(p.numel() for p in model.parameters()), world)
