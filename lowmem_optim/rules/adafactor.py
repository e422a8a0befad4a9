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
projection g is the low-rank gradient, while RMS(W) is taken over the full weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem_optim.rules.base import SubspaceChange, reindex_along


def _rms(t: torch.Tensor) -> float:
    return float(t.norm(2) / math.sqrt(t.numel()))


class AdafactorRule:
    fixed_dtype_keys: frozenset[str] = frozenset({"exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"})

    def validate(self, group: dict[str, Any]) -> None:
        lr, relative_step = group["lr"], group["relative_step"]
        if lr is not None and relative_step:
            raise ValueError(f"Invalid lr: {lr!r} with relative_step=True (allowed: lr=None, or relative_step=False)")
        if lr is None and not relative_step:
            raise ValueError("Invalid lr: None with relative_step=False (allowed: a number >= 0)")
        if lr is not None and not lr >= 0.0:
            raise ValueError(f"Invalid lr: {lr!r} (allowed: a number >= 0)")
        if group["warmup_init"] and not relative_step:
            raise ValueError("Invalid warmup_init: True requires relative_step=True")
        eps = group["eps"]
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2 and all(e >= 0 for e in eps)):
            raise ValueError(f"Invalid eps: {eps!r} (allowed: a pair (eps1, eps2) of numbers >= 0)")
        if not group["clip_threshold"] > 0:
            raise ValueError(f"Invalid clip_threshold: {group['clip_threshold']!r} (allowed: > 0)")
        if not group["decay_rate"] < 0:
            raise ValueError(f"Invalid decay_rate: {group['decay_rate']!r} (allowed: < 0, e.g. -0.8)")
        beta1 = group["beta1"]
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1: {beta1!r} (allowed: None or 0 <= beta1 < 1)")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"Invalid weight_decay: {group['weight_decay']!r} (allowed: >= 0)")

    def _lr(self, group: dict[str, Any], step: int, param: torch.Tensor) -> float:
        lr = group["lr"]
        if lr == 0:
            # a zeroed lr stops the step also under relative_step: torch.distributed.checkpoint
            # initializes empty state by a step with lr 0, which must not decay the weights
            return 0.0
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr *= max(group["eps"][1], _rms(param.float()))
        return lr

    def update(
        self, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any], param: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
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
        sq = g**2 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(g)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt().mul_(g)
        update.div_(max(1.0, _rms(update) / group["clip_threshold"]))
        update.mul_(lr)
        if group["beta1"] is not None:
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = state["exp_avg"].clone()
        return update, lr

    def carry(self, state: dict[str, Any], change: SubspaceChange, dim: int) -> None:
        if change.kept is None:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key] = reindex_along(state[key], change.kept, dim)
        # a factored statistic indexed by the projected dimension is reindexed; the other is kept
        stat = "exp_avg_sq_row" if dim == 0 else "exp_avg_sq_col"
        if stat in state:
            state[stat] = reindex_along(state[stat], change.kept, 0)
