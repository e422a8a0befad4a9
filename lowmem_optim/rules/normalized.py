"""Normalized-momentum rules for weight matrices: AuON, Hybrid-AuON and Muon.

All three start from Nesterov momentum (beta = ``momentum``, 0.95), on the gradient viewed as a
matrix m x n (conv and other N-D weights as (out, -1)):

    M_t = beta M_{t-1} + (1 - beta) G;   D = (1 - beta) G + beta M_t   (nesterov=False: D = M_t)
    X   = D / (||D||_F + 1e-7)

and differ in the direction U they take from X:

- AuON (Maity, arXiv 2509.24320):  r = sqrt(mean(cosh(gamma X)^2));  U = X / (r + 1e-8).
  ``normalize=False`` is the authors' later code: U = D / (r + 1e-8) (r still from X).
- Hybrid-AuON (same paper): ``ns_steps`` Newton-Schulz iterations (paper: 1) turn X into Y, then
  r = sqrt(mean(cosh(gamma Y)^2));  U = Y / (r + 1e-8).
- Muon (Jordan et al., 2024): U = ``ns_steps`` (5) Newton-Schulz iterations of X.

The update is lr * s * U with s = sqrt(max(1, m/n)) (``adjust_lr_fn="original"``, Muon's
aspect factor, as in the AuON code), 0.2 sqrt(max(m, n)) (``"match_rms_adamw"``, Moonshot's) or
1 (``"none"``); the engine applies decoupled decay W <- W (1 - lr wd) first, as torch.optim.Muon.

Newton-Schulz (quintic, coefficients (a, b, c) = (3.4445, -4.7750, 2.0315)), on the wide
orientation (X transposed when m > n):  A = X X^T;  X <- a X + (b A + c A^2) X.  It runs in
``ns_dtype``: by default ("auto") bfloat16 on CUDA, as torch.optim.Muon and the authors' code
do, and float32 elsewhere, since a CPU without bf16 matrix units emulates bf16 matmuls (tens
of times slower than fp32). It maps
singular values from [0, 1] into about [0, 1.2]: after 5 steps those of X above ~1/400 (of
||X||_F = 1) sit in about [0.68, 1.2]; one step leaves no such band (see docs/optimizers.md).

Why AuON is cheap and what it amounts to: for any realistically sized matrix r = 1 + O(1/N)
(r - 1 ~ gamma^2 / (2N), N = m n, since X has unit Frobenius norm), so AuON behaves as
Frobenius-normalized Nesterov SGD; its cost is linear in N, against O(m n min(m, n)) for
Newton-Schulz.

State: the momentum M, of the shape of the tensor the rule sees (the full gradient, or the
projected r x n / m x r one inside a low-rank group), stored as ``momentum_dtype`` asks
(:mod:`lowmem_optim.rules.momentum_storage`): ``momentum_buffer`` in the gradient's dtype
("auto"), float32, or with stochastic rounding in bfloat16 (2 bytes per value), in 8-bit
blockwise codes (1 + 4/256 bytes) or in 4-bit NF4 codes (1/2 + 4/64 bytes). The rounded forms
advance M in float32 from the stored value and compute D from that float32 M; only what is
carried to the next step is rounded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

import lowmem_optim.rules.momentum_storage as momentum_storage
from lowmem_optim.parts import BOOLEAN, HParam, Part, SubspaceChange, integer, number, one_of, sequence
from lowmem_optim.rules.base import LR, WEIGHT_DECAY
from lowmem_optim.sharding import RowShard, StateLayout, global_norm, global_numel, scaled_norm

NORM_EPS = 1e-7  # in X = D / (||D||_F + eps): Muon's and the AuON paper's
COSH_EPS = 1e-8  # in U = X / (r + eps): the AuON paper's
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
ADJUST_LR_FNS = ("original", "match_rms_adamw", "none")

MOMENTUM = HParam("momentum", 0.95, number(0, 1, high_open=True), "momentum decay beta")
NESTEROV = HParam("nesterov", True, BOOLEAN, "Nesterov momentum D = (1 - beta) G + beta M")
ADJUST_LR_FN = HParam(
    "adjust_lr_fn", "original", one_of(*ADJUST_LR_FNS), "shape factor s: sqrt(max(1, m/n)), 0.2 sqrt(max(m, n)), or 1"
)
GAMMA = HParam("gamma", 1.0, number(0, low_open=True), "AuON's cosh scale r = sqrt(mean(cosh(gamma X)^2))")
MOMENTUM_DTYPE = HParam(
    "momentum_dtype",
    "auto",
    one_of(*momentum_storage.MOMENTUM_DTYPES),
    "how M is stored: auto (the gradient's dtype), float32, or stochastically rounded bfloat16, 8bit "
    "(blockwise dynamic-map codes) or 4bit (NF4 codes, blocks of 64)",
)
NS_STEPS = HParam("ns_steps", 5, integer(1, 99), "Newton-Schulz iterations")
NS_COEFFICIENTS = HParam(
    "ns_coefficients",
    MUON_COEFFICIENTS,
    sequence(number(), 3, "three finite numbers (a, b, c)"),
    "quintic Newton-Schulz coefficients (a, b, c)",
)
NS_DTYPE = HParam(
    "ns_dtype", "auto", one_of("auto", *NS_DTYPES), "dtype of Newton-Schulz; auto: bfloat16 on CUDA, float32 elsewhere"
)


def nesterov_direction(g: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Advance ``buf`` (M = b M + (1-b) G) in place; return D ((1-b) G + b M, or M)."""
    buf.lerp_(g, 1 - momentum)
    return g.lerp(buf, momentum) if nesterov else buf.clone()


def frobenius_normalize(d: torch.Tensor) -> torch.Tensor:
    return d / (scaled_norm(d) + NORM_EPS)


def newton_schulz(d: torch.Tensor, steps: int, coefficients: tuple[float, float, float]) -> torch.Tensor:
    """X = D / (||D||_F + 1e-7), then ``steps`` quintic Newton-Schulz iterations, in d's dtype.

    Iterates on the wide orientation so the Gram matrix is min(m, n) square; the operations
    come in torch.optim.Muon's order, so in bfloat16 the result is torch's bit for bit."""
    a, b, c = coefficients
    tall = d.size(0) > d.size(1)
    x = frobenius_normalize(d.T if tall else d)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x.T if tall else x


def cosh_rms(x: torch.Tensor, gamma: float | torch.Tensor, shard: RowShard | None = None) -> torch.Tensor:
    """r = sqrt(mean(cosh(gamma x)^2)): AuON's scale, >= 1, equal to 1 only at x = 0.

    Computed as ||cosh(gamma x)||_F / sqrt(N): one temporary, two passes over it (with
    ``shard``, x is this rank's rows and the sum of squares is summed over the ranks)."""
    return global_norm(torch.mul(x, gamma).cosh_(), shard) / math.sqrt(global_numel(x, shard))


def lr_adjustment(m: int, n: int, adjust_lr_fn: str) -> float:
    """The shape factor s of the update lr * s * U."""
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, m / n))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    return 1.0


def _with_defaults(lr: float, weight_decay: float) -> tuple[HParam, ...]:
    """The shared keys with a rule's own lr and weight decay defaults."""
    return (
        dataclasses.replace(LR, default=lr),
        dataclasses.replace(WEIGHT_DECAY, default=weight_decay),
        MOMENTUM,
        NESTEROV,
        ADJUST_LR_FN,
        MOMENTUM_DTYPE,
    )


class NormalizedMomentumRule(Part):
    """Momentum, matrix view and step size shared by AuON, Hybrid-AuON and Muon; a subclass
    gives ``scaled_direction``: lr s U for the 2-D momentum D."""

    def validate(self, group: dict[str, Any]) -> None:
        for i, p in enumerate(group["params"]):
            if p.dim() < 2:
                raise ValueError(
                    f"parameter {i} of a group with rule={group['rule']!r} is {p.dim()}-D (shape {tuple(p.shape)}): "
                    "this rule updates weight matrices only; put biases, norms and other 1-D parameters in a "
                    "group with rule='adam' (lowmem_optim.normalized_param_groups does this)"
                )

    def fixed_dtype_keys(self, param_dtype: torch.dtype) -> frozenset[str]:
        return momentum_storage.FIXED_DTYPE_KEYS

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return momentum_storage.momentum_bytes(shape, dtype, group["momentum_dtype"])

    def update_dtype(self, dtype: torch.dtype, group: dict[str, Any]) -> torch.dtype:
        # the direction's: M's working dtype (momentum_storage.load); the rules that keep no
        # momentum_dtype (SinkGD, SCALE) work in g's
        kind = group.get("momentum_dtype", "auto")
        if kind == "auto":
            return dtype
        return torch.float32 if kind == "float32" else torch.promote_types(dtype, torch.float32)

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        numel = math.prod(shape)
        direction = 3 * 4 * numel  # the direction D, its normalized or orthogonalized image, the update
        if not momentum_storage.rounds(group["momentum_dtype"]):
            return direction
        # while M is rounded: the float M, the gradient in float32, D and the rounding's temporaries
        return max(direction, 4 * numel + momentum_storage.rounding_workspace_bytes(shape, group["momentum_dtype"]))

    def scaled_direction(
        self, d: torch.Tensor, group: dict[str, Any], step_size: float, shard: RowShard | None = None
    ) -> torch.Tensor:
        """step_size * U for the 2-D momentum ``d`` (this rank's rows with ``shard``), which the
        rule owns and may overwrite."""
        raise NotImplementedError

    def sharded_layout(self, dim: int) -> StateLayout:
        """The momentum has the rows of g (its 8-bit absmax: blocks of this rank's rows)."""
        return momentum_storage.SHARDED_LAYOUT

    def update(
        self,
        g: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        param: torch.Tensor,
        shard: RowShard | None = None,
        seed: int = 0,
    ) -> tuple[torch.Tensor, float]:
        kind = group["momentum_dtype"]
        m = momentum_storage.load(state, kind, g)
        if g.numel() == 0:  # a zero-size weight has no direction to normalize, nor anything to move
            if momentum_storage.rounds(kind):
                momentum_storage.store(state, m, kind, seed, shard)
            return torch.zeros_like(g), group["lr"]
        d = nesterov_direction(g.to(m.dtype), m, group["momentum"], group["nesterov"])
        if momentum_storage.rounds(kind):
            momentum_storage.store(state, m, kind, seed, shard)
        del m  # a rounded form's float M: stored, no longer needed
        # The shape factor belongs to the weight, also when the rule sees a projected gradient.
        m = param.shape[0]
        step_size = group["lr"] * lr_adjustment(m, param.numel() // m, group["adjust_lr_fn"])
        return self.scaled_direction(d.reshape(g.shape[0], -1), group, step_size, shard).reshape(g.shape), group["lr"]

    def carry(self, state: dict[str, Any], change: SubspaceChange, dim: int, shard: RowShard | None = None) -> None:
        if change.kept is not None:
            momentum_storage.carry(state, change.kept, dim, shard)


def newton_schulz_dtype(name: str, device: torch.device) -> torch.dtype:
    """``ns_dtype``'s dtype; "auto": bfloat16 where the hardware multiplies it natively (CUDA),
    float32 elsewhere (a CPU emulates bf16 matmuls, tens of times slower than fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return NS_DTYPES[name]


def _newton_schulz_of(d: torch.Tensor, group: dict[str, Any], shard: RowShard | None) -> torch.Tensor:
    """Newton-Schulz in ``ns_dtype``, returned in d's dtype; with ``shard``, of the whole momentum
    (its rows gathered, as distributed Muon implementations do: every rank holds the result)."""
    whole = d if shard is None else shard.gather_rows(d)
    ns_dtype = newton_schulz_dtype(group["ns_dtype"], d.device)
    return newton_schulz(whole.to(ns_dtype), group["ns_steps"], tuple(group["ns_coefficients"])).to(d.dtype)


def _rows(y: torch.Tensor, shard: RowShard | None) -> torch.Tensor:
    return y if shard is None else y[shard.start : shard.stop]


class AuONRule(NormalizedMomentumRule):
    """U = X / (r + 1e-8), r = sqrt(mean(cosh(gamma X)^2)); ``normalize=False``: U = D / (r + 1e-8)."""

    hparams = (
        *_with_defaults(lr=0.24, weight_decay=0.0),
        GAMMA,
        HParam("normalize", True, BOOLEAN, "U from X = D / ||D||_F (False: from D, the authors' later code)"),
    )

    def scaled_direction(
        self, d: torch.Tensor, group: dict[str, Any], step_size: float, shard: RowShard | None = None
    ) -> torch.Tensor:
        # All scalars fold into one multiply of d, so the step makes a single temporary (the
        # cosh): this is what keeps AuON at about AdamW's cost. Sharded: two all-reduced scalars.
        norm = global_norm(d, shard) + NORM_EPS
        r = cosh_rms(d, group["gamma"] / norm, shard) + COSH_EPS
        return d.mul_(step_size / (r * norm if group["normalize"] else r))


class HybridAuONRule(NormalizedMomentumRule):
    """Y = ``ns_steps`` Newton-Schulz iterations of X;  U = Y / (r + 1e-8), r from cosh(gamma Y)."""

    hparams = (
        *_with_defaults(lr=0.24, weight_decay=0.0),
        GAMMA,
        dataclasses.replace(NS_STEPS, default=1),
        NS_COEFFICIENTS,
        NS_DTYPE,
    )

    def scaled_direction(
        self, d: torch.Tensor, group: dict[str, Any], step_size: float, shard: RowShard | None = None
    ) -> torch.Tensor:
        y = _newton_schulz_of(d, group, shard)  # r in d's dtype: bfloat16 would round r = 1 + O(1/N) to 1
        return _rows(y, shard).mul_(step_size / (cosh_rms(y, group["gamma"]) + COSH_EPS))


class MuonRule(NormalizedMomentumRule):
    """U = ``ns_steps`` Newton-Schulz iterations of X (torch.optim.Muon's update)."""

    hparams = (*_with_defaults(lr=1e-3, weight_decay=0.1), NS_STEPS, NS_COEFFICIENTS, NS_DTYPE)

    def scaled_direction(
        self, d: torch.Tensor, group: dict[str, Any], step_size: float, shard: RowShard | None = None
    ) -> torch.Tensor:
        return _rows(_newton_schulz_of(d, group, shard), shard).mul_(step_size)
