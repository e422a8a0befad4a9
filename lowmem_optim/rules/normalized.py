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
``ns_dtype`` (bfloat16 by default, as torch.optim.Muon and the authors' code do). It maps
singular values from [0, 1] into about [0, 1.2]: after 5 steps those of X above ~1/400 (of
||X||_F = 1) sit in about [0.68, 1.2]; one step leaves no such band (see the README).

Why AuON is cheap and what it amounts to: for any realistically sized matrix r = 1 + O(1/N)
(r - 1 ~ gamma^2 / (2N), N = m n, since X has unit Frobenius norm), so AuON behaves as
Frobenius-normalized Nesterov SGD; its cost is linear in N, against O(m n min(m, n)) for
Newton-Schulz.

State: ``momentum_buffer`` (the shape of the tensor the rule sees: the full gradient, or the
projected r x n / m x r one inside a low-rank group), in the gradient's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem_optim.rules.base import SubspaceChange, check_nonnegative, reindex_along

NORM_EPS = 1e-7  # in X = D / (||D||_F + eps): Muon's and the AuON paper's
COSH_EPS = 1e-8  # in U = X / (r + eps): the AuON paper's
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
ADJUST_LR_FNS = ("original", "match_rms_adamw", "none")


def nesterov_direction(g: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Advance ``buf`` (M = b M + (1-b) G) in place; return D ((1-b) G + b M, or M)."""
    buf.lerp_(g, 1 - momentum)
    return g.lerp(buf, momentum) if nesterov else buf.clone()


def frobenius_normalize(d: torch.Tensor) -> torch.Tensor:
    return d / (d.norm() + NORM_EPS)


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


def cosh_rms(x: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """r = sqrt(mean(cosh(gamma x)^2)): AuON's scale, >= 1, equal to 1 only at x = 0.

    Computed as ||cosh(gamma x)||_F / sqrt(N): one temporary, two passes over it."""
    return torch.mul(x, gamma).cosh_().norm() / math.sqrt(x.numel())


def lr_adjustment(m: int, n: int, adjust_lr_fn: str) -> float:
    """The shape factor s of the update lr * s * U."""
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, m / n))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    return 1.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class NormalizedMomentumRule:
    """Momentum, matrix view and step size shared by AuON, Hybrid-AuON and Muon; a subclass
    gives ``scaled_direction``: lr s U for the 2-D momentum D."""

    fixed_dtype_keys: frozenset[str] = frozenset()

    def validate(self, group: dict[str, Any]) -> None:
        check_nonnegative(group, "lr", "weight_decay")
        momentum = group["momentum"]
        if not (_is_number(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"Invalid momentum: {momentum!r} (allowed: 0 <= momentum < 1)")
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"Invalid nesterov: {group['nesterov']!r} (allowed: True or False)")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"Invalid adjust_lr_fn: {group['adjust_lr_fn']!r} (allowed: {', '.join(ADJUST_LR_FNS)})")
        for i, p in enumerate(group["params"]):
            if p.dim() < 2:
                raise ValueError(
                    f"parameter {i} of a group with rule={group['rule']!r} is {p.dim()}-D (shape {tuple(p.shape)}): "
                    "this rule updates weight matrices only; put biases, norms and other 1-D parameters in a "
                    "group with rule='adam' (lowmem_optim.normalized_param_groups does this)"
                )

    def scaled_direction(self, d: torch.Tensor, group: dict[str, Any], step_size: float) -> torch.Tensor:
        """step_size * U for the 2-D momentum ``d``, which the rule owns and may overwrite."""
        raise NotImplementedError

    def update(
        self, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any], param: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
        d = nesterov_direction(g, state["momentum_buffer"], group["momentum"], group["nesterov"])
        # The shape factor belongs to the weight, also when the rule sees a projected gradient.
        m = param.shape[0]
        step_size = group["lr"] * lr_adjustment(m, param.numel() // m, group["adjust_lr_fn"])
        return self.scaled_direction(d.reshape(g.shape[0], -1), group, step_size).reshape(g.shape), group["lr"]

    def carry(self, state: dict[str, Any], change: SubspaceChange, dim: int) -> None:
        if change.kept is not None and "momentum_buffer" in state:
            state["momentum_buffer"] = reindex_along(state["momentum_buffer"], change.kept, dim)


def _validate_gamma(group: dict[str, Any]) -> None:
    gamma = group["gamma"]
    if not (_is_number(gamma) and gamma > 0):
        raise ValueError(f"Invalid gamma: {gamma!r} (allowed: a finite number > 0)")


def _validate_newton_schulz(group: dict[str, Any]) -> None:
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
        raise ValueError(f"Invalid ns_steps: {steps!r} (allowed: an int from 1 to 99)")
    coefficients = group["ns_coefficients"]
    if not (isinstance(coefficients, (tuple, list)) and len(coefficients) == 3 and all(map(_is_number, coefficients))):
        raise ValueError(f"Invalid ns_coefficients: {coefficients!r} (allowed: three finite numbers (a, b, c))")
    if group["ns_dtype"] not in NS_DTYPES:
        raise ValueError(f"Invalid ns_dtype: {group['ns_dtype']!r} (allowed: {', '.join(NS_DTYPES)})")


def _newton_schulz_of(d: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """Newton-Schulz in ``ns_dtype``, returned in d's dtype."""
    y = newton_schulz(d.to(NS_DTYPES[group["ns_dtype"]]), group["ns_steps"], tuple(group["ns_coefficients"]))
    return y.to(d.dtype)


class AuONRule(NormalizedMomentumRule):
    """U = X / (r + 1e-8), r = sqrt(mean(cosh(gamma X)^2)); ``normalize=False``: U = D / (r + 1e-8)."""

    def validate(self, group: dict[str, Any]) -> None:
        super().validate(group)
        _validate_gamma(group)
        if not isinstance(group["normalize"], bool):
            raise ValueError(f"Invalid normalize: {group['normalize']!r} (allowed: True or False)")

    def scaled_direction(self, d: torch.Tensor, group: dict[str, Any], step_size: float) -> torch.Tensor:
        # All scalars fold into one multiply of d, so the step makes a single temporary (the
        # cosh): this is what keeps AuON at about AdamW's cost.
        norm = d.norm() + NORM_EPS
        r = cosh_rms(d, group["gamma"] / norm) + COSH_EPS
        return d.mul_(step_size / (r * norm if group["normalize"] else r))


class HybridAuONRule(NormalizedMomentumRule):
    """Y = ``ns_steps`` Newton-Schulz iterations of X;  U = Y / (r + 1e-8), r from cosh(gamma Y)."""

    def validate(self, group: dict[str, Any]) -> None:
        super().validate(group)
        _validate_gamma(group)
        _validate_newton_schulz(group)

    def scaled_direction(self, d: torch.Tensor, group: dict[str, Any], step_size: float) -> torch.Tensor:
        y = _newton_schulz_of(d, group)  # r in d's dtype: bfloat16 would round r = 1 + O(1/N) to 1
        return y.mul_(step_size / (cosh_rms(y, group["gamma"]) + COSH_EPS))


class MuonRule(NormalizedMomentumRule):
    """U = ``ns_steps`` Newton-Schulz iterations of X (torch.optim.Muon's update)."""

    def validate(self, group: dict[str, Any]) -> None:
        super().validate(group)
        _validate_newton_schulz(group)

    def scaled_direction(self, d: torch.Tensor, group: dict[str, Any], step_size: float) -> torch.Tensor:
        return _newton_schulz_of(d, group).mul_(step_size)
