"""AdamW's rule (Loshchilov & Hutter, 2019), with torch.optim.AdamW's exact equations.

    M_t = b1 M_{t-1} + (1 - b1) g          V_t = b2 V_{t-1} + (1 - b2) g^2
    update = lr / (1 - b1^t) * M_t / (sqrt(V_t) / sqrt(1 - b2^t) + eps)

eps is added after the bias correction, as torch does (galore-torch adds it before), and the
floating-point operations come in torch's order, so on the full gradient this rule reproduces
torch.optim.AdamW bit for bit. Applied to the projected gradient it is GaLore's inner rule.

Moments live in the tensor's dtype (torch's convention), except for float16, where they are
kept in float32: in float16, (1 - b2) g^2 underflows to zero for |g| below ~1e-2 while M does
not, and eps = 1e-8 itself rounds to zero, so M / (sqrt(V) + eps) blows up.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.adamw import adamw

from lowmem_optim.parts import HParam, Part, SubspaceChange, number, sequence
from lowmem_optim.rules.base import LR, WEIGHT_DECAY, reindex_along
from lowmem_optim.sharding import RowShard, StateLayout, is_dtensor

BETAS = HParam(
    "betas",
    (0.9, 0.999),
    sequence(number(0, 1, high_open=True), 2, "a pair of numbers in [0, 1)"),
    "decay rates (beta1, beta2) of the first and second moment",
)
EPS = HParam("eps", 1e-8, number(0), "added to sqrt(V) after the bias correction")
#: the largest gradient entry Adam's projected update takes as it is: its square, 2^126, fits float32
GRADIENT_LIMIT = 2.0**63


def adam_update(
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """Advance the moments in place and return the step-size-scaled update (torch's op order).

    Entries of g beyond 2^63 enter as +-2^63: their square would overflow float32 (and bfloat16),
    leaving V infinite and the update of that entry zero for good. Adam's update of an entry
    depends on that entry's scale only through eps, so it stays what it should be (about +-lr on
    a first step); below 2^63 nothing changes, bit for bit."""
    g = g.clamp(-GRADIENT_LIMIT, GRADIENT_LIMIT)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    return (exp_avg * step_size).div_(denom)


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adam's moments follow the tensor's dtype, but float16 keeps them in float32 (module docstring)."""
    return torch.float32 if dtype == torch.float16 else dtype


class AdamRule(Part):
    """Adam moments in the tensor's own dtype (as torch.optim.AdamW keeps them)."""

    hparams = (LR, BETAS, EPS, WEIGHT_DECAY)

    def fixed_dtype_keys(self, param_dtype: torch.dtype) -> frozenset[str]:
        # like torch.optim.AdamW the moments take the parameter's dtype on load, but not float16's
        return frozenset({"exp_avg", "exp_avg_sq"}) if param_dtype == torch.float16 else frozenset()

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return 2 * math.prod(shape) * moment_dtype(dtype).itemsize

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return 2 * math.prod(shape) * dtype.itemsize  # the denominator and the update

    def update_dtype(self, dtype: torch.dtype, group: dict[str, Any]) -> torch.dtype:
        return moment_dtype(dtype)  # g is cast to the moments' dtype

    def can_step_in_place(self, param: torch.Tensor, grad: torch.Tensor) -> bool:
        """A plain dense tensor (not FSDP2-sharded, not one that applies its own updates, as an
        INT8 weight) whose gradient and moments have its dtype (not float16: float32 moments)."""
        return (
            not hasattr(param, "apply_update")
            and not is_dtensor(param)
            and not grad.is_sparse
            and grad.dtype == param.dtype == moment_dtype(param.dtype)
        )

    def step_in_place(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        group: dict[str, Any],
    ) -> None:
        """torch's functional AdamW over the parameters together (``torch.optim.adamw.adamw``,
        ``foreach=True``: a handful of multi-tensor kernels per dtype on CUDA, one op per tensor on
        CPU): bit for bit ``torch.optim.AdamW(foreach=True)``, and the same for one parameter or
        many. The state is this rule's: ``step`` a float32 CPU tensor, moments of the parameter's
        shape and dtype.

        Gradient entries beyond 2^63 are clamped to +-2^63 in the gradients themselves (torch's
        kernels read them; a clamped copy would double the step's workspace), as
        :func:`adam_update` takes them: their squares would make V infinite and drop those
        entries' updates for good. Below 2^63 nothing changes, bit for bit."""
        torch._foreach_clamp_min_(grads, -GRADIENT_LIMIT)
        torch._foreach_clamp_max_(grads, GRADIENT_LIMIT)
        for p, state in zip(params, states):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def step_in_place_workspace_bytes(
        self, params: list[tuple[tuple[int, ...], torch.dtype]], group: dict[str, Any]
    ) -> int:
        # the denominators, alive together (torch._foreach_sqrt of every exp_avg_sq)
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in params)

    def sharded_layout(self, dim: int) -> StateLayout:
        """Elementwise: the moments have the rows of g."""
        return StateLayout(rows=frozenset({"exp_avg", "exp_avg_sq"}))

    def update(
        self,
        g: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        param: torch.Tensor,
        shard: RowShard | None = None,
        seed: int = 0,
    ) -> tuple[torch.Tensor, float]:
        if "exp_avg" not in state:
            dtype = moment_dtype(g.dtype)
            state["exp_avg"] = torch.zeros_like(g, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(g, dtype=dtype, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        update = adam_update(
            g.to(state["exp_avg"].dtype),
            state["exp_avg"],
            state["exp_avg_sq"],
            int(state["step"]),
            group["lr"],
            beta1,
            beta2,
            group["eps"],
        )
        return update, group["lr"]

    def carry(self, state: dict[str, Any], change: SubspaceChange, dim: int, shard: RowShard | None = None) -> None:
        if change.kept is None or "exp_avg" not in state:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = reindex_along(state[key], change.kept, dim, shard)
