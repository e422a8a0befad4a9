"""Float64 references of the equations each optimizer claims, written independently of the
package (plain loops over dense matrices, SVD in float64), and a side-by-side stepper for the
comparisons with peer implementations."""

from __future__ import annotations

import math

import torch


def svd_basis(g: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    basis = u[:, :rank] if side == "left" else vh[:rank].T  # both as (dim x r), orthonormal columns
    pivot = basis.abs().argmax(dim=0)  # sign convention: largest |entry| of each vector positive
    return basis * torch.sign(basis[pivot, torch.arange(rank)])


def adam_ref(state: dict, r: torch.Tensor, t: int, lr: float, betas=(0.9, 0.999), eps=1e-8) -> torch.Tensor:
    """torch.optim.AdamW's moments and bias-corrected step (eps after the correction)."""
    b1, b2 = betas
    state["m"] = b1 * state.get("m", torch.zeros_like(r)) + (1 - b1) * r
    state["v"] = b2 * state.get("v", torch.zeros_like(r)) + (1 - b2) * r * r
    m_hat = state["m"] / (1 - b1**t)
    v_hat = state["v"] / (1 - b2**t)
    return lr * m_hat / (v_hat.sqrt() + eps)


def adafactor_ref(
    state: dict, r: torch.Tensor, w: torch.Tensor, t: int, eps=(1e-30, 1e-3), clip=1.0, decay_rate=-0.8
) -> tuple[torch.Tensor, float]:
    """HF Adafactor with relative_step, scale_parameter, beta1=None (factored for 2-D)."""
    rms = lambda x: float(x.pow(2).mean().sqrt())  # noqa: E731
    lr = min(1e-2, 1 / math.sqrt(t)) * max(eps[1], rms(w))
    beta2t = 1 - t**decay_rate
    sq = r * r + eps[0]
    state["row"] = beta2t * state.get("row", torch.zeros(r.shape[0], dtype=r.dtype)) + (1 - beta2t) * sq.mean(1)
    state["col"] = beta2t * state.get("col", torch.zeros(r.shape[1], dtype=r.dtype)) + (1 - beta2t) * sq.mean(0)
    v_hat = torch.outer(state["row"] / state["row"].mean(), state["col"])
    u = r / v_hat.sqrt()
    u = u / max(1.0, rms(u) / clip)
    return lr * u, lr


def galore_ref(
    w0: torch.Tensor,
    grads: list[torch.Tensor],
    *,
    rank: int,
    gap: int,
    scale: float,
    side: str,
    lr: float,
    weight_decay: float,
    rule: str = "adam",
) -> torch.Tensor:
    """GaLore: refresh P at steps 1, gap+1, ...; R = projection; rule(R); W -= scale * back(N)."""
    w = w0.double().clone()
    state: dict = {}
    basis = None
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if (t - 1) % gap == 0:
            basis = svd_basis(g, rank, side)
        r = basis.T @ g if side == "left" else g @ basis
        if rule == "adam":
            n, lr_t = adam_ref(state, r, t, lr), lr
        else:
            n, lr_t = adafactor_ref(state, r, w, t)
        w = w * (1 - lr_t * weight_decay)
        w = w - scale * (basis @ n if side == "left" else n @ basis.T)
    return w


#: Muon's quintic Newton-Schulz coefficients (a, b, c) (Jordan et al., 2024)
MUON_ABC = (3.4445, -4.7750, 2.0315)


def ns_ref(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Float64 quintic Newton-Schulz of an already normalized X, on the wide orientation."""
    a, b, c = MUON_ABC
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def step_side_by_side(ours, ref, opt, ref_opt, steps, gen):
    """Give both parameter lists the same random gradients and step both optimizers."""
    for _ in range(steps):
        for a, c in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=gen)
            c.grad = a.grad.clone()
        opt.step()
        ref_opt.step()


def sinkhorn_ref(g: torch.Tensor, iterations: int) -> torch.Tensor:
    """SinkGD's SR-Sinkhorn in float64 (Scetbon et al., Algorithm SR-Sinkhorn): ``iterations``
    times, every row scaled to norm sqrt(n), then every column to norm sqrt(m); row by row and
    column by column."""
    x = g.double().clone()
    m, n = x.shape
    for _ in range(iterations):
        for i in range(m):
            x[i] = math.sqrt(n) * x[i] / x[i].norm()
        for j in range(n):
            x[:, j] = math.sqrt(m) * x[:, j] / x[:, j].norm()
    return x


def channel_normalized_ref(g: torch.Tensor) -> torch.Tensor:
    """SCALE's normalization in float64: each output channel (row of the (out, in) matrix)
    divided by its RMS, sqrt(mean of its squares)."""
    x = g.double().clone()
    for i in range(x.shape[0]):
        x[i] = x[i] / torch.sqrt(torch.mean(x[i] ** 2))
    return x


def update_form_ref(
    w0: torch.Tensor,
    grads: list[torch.Tensor],
    lrs: list[float],
    *,
    rank: int,
    gap: int,
    scale: float,
    side: str,
    weight_decay: float,
    form: str,
    gamma: float | None,
) -> tuple[torch.Tensor, int]:
    """GaLore's SVD subspace and Adam, with the full-size update U of Fira (``"residual"``), APOLLO
    (``"channel"``), APOLLO-Mini (``"tensor"``) or GaLore (``"projected"``), and the norm-growth
    limiter on the step-size-free scaled term S / lr. (final weights, steps the limiter clipped)."""
    w = w0.double().clone()
    state: dict = {}
    previous, clipped = None, 0
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        if (t - 1) % gap == 0:
            basis = svd_basis(g, rank, side)
        left = side == "left"
        r = basis.T @ g if left else g @ basis
        n = adam_ref(state, r, t, lr)
        pn = basis @ n if left else n @ basis.T
        if form == "projected":
            u = pn
        else:
            if form == "tensor":
                factor = n.norm() / r.norm()
            else:  # per channel: the columns of R for a left projection, its rows for a right one
                channels = r.shape[1] if left else r.shape[0]
                factor = torch.zeros(channels, dtype=torch.float64)
                for j in range(channels):
                    r_j, n_j = (r[:, j], n[:, j]) if left else (r[j], n[j])
                    factor[j] = n_j.norm() / r_j.norm() if r_j.norm() > 0 else 0.0
                factor = factor[None, :] if left else factor[:, None]
            rest = g - (basis @ r if left else r @ basis.T) if form == "residual" else g
            s = factor * rest
            if gamma is not None:
                free = float(s.norm()) / lr
                if previous and free > gamma * previous:
                    s = s * gamma * previous / free
                    free, clipped = gamma * previous, clipped + 1
                previous = free
            u = pn + s if form == "residual" else s
        w = w * (1 - lr * weight_decay) - scale * u
    return w, clipped
