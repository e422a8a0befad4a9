"""Adafactor's rule (Shazeer & Stern, ICML 2018), as HF transformers' ``Adafactor`` computes it.

For a 2-D g (n x k) the second moment is factored into a row and a column statistic:

    beta2_t = 1 - t^decay_rate,        U = g^2 + eps1
    R_t = beta2_t R_{t-1} + (1 - beta2_t) mean_cols(U)     (n)
    C_t = beta2_t C_{t-1} + (1 - beta2_t) mean_rows(U)     (k)
    V_hat = (R_t / mean(R_t)) C_t^T,    u = g / sqrt(V_hat),    u <- u / max(1, RMS(u) / d)
    lr_t = max(eps2, RMS(W)) * min(1e-2, 1/sqrt(t))   (relative_step and scale_parameter)
    update = lr_t * u, averaged with beta1 when given (M_t = b1 M + (1 - b1) lr_t u)

This is the variant GaLore's ``GaLoreAdafactor`` wraps (HF's, not ``torch.optim.Adafactor``):
``lr=None`` with ``relative_step=True`` by default. Statistics are kept in float32. Under a
projection g is the low-rank gradient, while RMS(W) is taken over the full weight (for an
INT8 weight, :mod:`lowmem_optim.quant.int8_linear`, over its dequantized values).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from lowmem_optim.parts import BOOLEAN, HParam, Part, SubspaceChange, invalid, number, optional, sequence
from lowmem_optim.rules.base import LR, WEIGHT_DECAY, reindex_along
from lowmem_optim.sharding import RowShard, StateLayout, global_mean, global_norm, global_numel, param_rms

FLOAT32_MAX = torch.finfo(torch.float32).max


def weight_rms(param: torch.Tensor) -> torch.Tensor:
    """RMS(W), a 0-D float64 tensor on W's device (read on the host, it would stall a GPU every
    step). A weight that stores its values itself (one with ``apply_update``, the engine's
    protocol: an INT8 weight, :mod:`lowmem_optim.quant.int8_linear`) holds none in its tensor and
    gives its own ``rms()``; an FSDP2-sharded one's sum of squares is summed over the ranks."""
    return param.rms() if hasattr(param, "apply_update") else param_rms(param)


class AdafactorRule(Part):
    hparams = (
        dataclasses.replace(
            LR,
            default=None,
            check=optional(LR.check),
            doc="fixed learning rate; None: the relative step min(1e-2, 1/sqrt(t))",
        ),
        HParam(
            "eps",
            (1e-30, 1e-3),
            sequence(number(0), 2, "a pair (eps1, eps2) of numbers >= 0"),
            "(eps1 added to g^2, eps2 the floor of RMS(W) in the relative step)",
        ),
        HParam("clip_threshold", 1.0, number(0, low_open=True), "clip the update's RMS to this value"),
        HParam("decay_rate", -0.8, number(high=0, high_open=True), "beta2_t = 1 - t^decay_rate"),
        HParam("beta1", None, optional(number(0, 1, high_open=True)), "first-moment decay (None: no first moment)"),
        dataclasses.replace(WEIGHT_DECAY, default=0.0),
        HParam("scale_parameter", True, BOOLEAN, "scale the step size by max(eps2, RMS(W))"),
        HParam("relative_step", True, BOOLEAN, "step size min(1e-2, 1/sqrt(t)) instead of lr"),
        HParam("warmup_init", False, BOOLEAN, "relative step 1e-6 t instead of 1e-2 (needs relative_step)"),
    )

    def validate(self, group: dict[str, Any]) -> None:
        lr, relative_step = group["lr"], group["relative_step"]
        if lr is not None and relative_step:
            raise invalid("lr", lr, "None with relative_step=True, or relative_step=False")
        if lr is None and not relative_step:
            raise invalid("lr", lr, "a number >= 0 with relative_step=False")
        if group["warmup_init"] and not relative_step:
            raise invalid("warmup_init", True, "False with relative_step=False")

    def fixed_dtype_keys(self, param_dtype: torch.dtype) -> frozenset[str]:
        return frozenset({"exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"})  # float32 always

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        numel = math.prod(shape)
        stats = numel if len(shape) < 2 else math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
        return 4 * stats + (4 * numel if group["beta1"] is not None else 0)

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return 3 * 4 * math.prod(shape)  # fp32 g, its square, the factored update

    def update_dtype(self, dtype: torch.dtype, group: dict[str, Any]) -> torch.dtype:
        return torch.float32  # statistics and update in float32

    def update_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        # the float32 update, and with scale_parameter the step size: a 0-D float64 tensor
        return 4 * math.prod(shape) + (8 if group["scale_parameter"] else 0)

    def weight_workspace_bytes(
        self, shape: tuple[int, ...], low_shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]
    ) -> int:
        """RMS(W) of a weight in a lower precision than float32 reads a float32 copy of it (beside
        g's float32 copy and the norm, a 0-D float32); a float32 weight is read as it is."""
        if not group["scale_parameter"] or dtype == torch.float32:
            return 0
        return 4 * math.prod(shape) + 4 * math.prod(low_shape) + 4

    def _lr(self, group: dict[str, Any], step: int, param: torch.Tensor) -> float | torch.Tensor:
        """The step size: a number, or with ``scale_parameter`` a 0-D float64 tensor on the device."""
        lr = group["lr"]
        if lr == 0:
            # a zeroed lr stops the step also under relative_step: torch.distributed.checkpoint
            # initializes empty state by a step with lr 0, which must not decay the weights
            return 0.0
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr = weight_rms(param).clamp_(min=group["eps"][1]).mul_(lr)
        return lr

    def sharded_layout(self, dim: int) -> StateLayout:
        """The statistics indexed by g's rows: all but a matrix's column statistic."""
        rows = {"exp_avg", "exp_avg_sq", "exp_avg_sq_row"} | ({"exp_avg_sq_col"} if dim > 2 else set())
        return StateLayout(rows=frozenset(rows))

    def update(
        self,
        g: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        param: torch.Tensor,
        shard: RowShard | None = None,
        seed: int = 0,
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        g = g.float()
        factored = g.dim() >= 2
        if "exp_avg_sq_row" not in state and "exp_avg_sq" not in state:
            if factored:
                state["exp_avg_sq_row"] = g.new_zeros(g.shape[:-1])
                state["exp_avg_sq_col"] = g.new_zeros(g.shape[:-2] + g.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(g)
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(g)
        step = int(state["step"])
        lr = self._lr(group, step, param)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        # a square past float32's range saturates at its largest value instead of becoming inf (whose
        # ratios would be NaN): the update stays finite, and clipping its RMS below bounds it
        sq = torch.square(g).add_(group["eps"][0]).clamp_(max=FLOAT32_MAX)
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            # with g's rows sharded, a mean over the rows of a matrix is a sum over the ranks. The
            # means accumulate in float64: a float32 sum of squares of gradients near 1e19 overflows
            # where their mean does not
            wide = torch.float64
            row.mul_(beta2t).add_(sq.mean(dim=-1, dtype=wide).to(row.dtype), alpha=1.0 - beta2t).clamp_(max=FLOAT32_MAX)
            col.mul_(beta2t).add_(global_mean(sq, -2, shard, dtype=wide).to(col.dtype), alpha=1.0 - beta2t)
            col.clamp_(max=FLOAT32_MAX)
            r_factor = (
                (row / global_mean(row, -1, shard, keepdim=True, dtype=wide).to(row.dtype)).rsqrt_().unsqueeze(-1)
            )
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(g)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1.0 - beta2t).clamp_(max=FLOAT32_MAX)
            update = state["exp_avg_sq"].rsqrt().mul_(g)
        # max(1, RMS(u) / d) stays on the device, in float64 as a host float would be
        rms = global_norm(update, shard).double().div_(math.sqrt(global_numel(update, shard)))
        update.div_(rms.div_(group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["beta1"] is not None:
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = state["exp_avg"].clone()
        return update, lr

    def carry(self, state: dict[str, Any], change: SubspaceChange, dim: int, shard: RowShard | None = None) -> None:
        if change.kept is None:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key] = reindex_along(state[key], change.kept, dim, shard)
        # a factored statistic indexed by the projected dimension is reindexed; the other is kept
        # (the row statistic has the rows of a sharded g, the column statistic is whole)
        stat = "exp_avg_sq_row" if dim == 0 else "exp_avg_sq_col"
        if stat in state:
            state[stat] = reindex_along(state[stat], change.kept, 0, shard if dim == 0 else None)
