"""AuON, Hybrid-AuON and Muon rules against float64 references of their formulas, torch.optim.Muon,
and the documented numerical facts (Newton-Schulz singular-value ranges, AuON's r ~ 1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import lowmem_optim
from lowmem_optim.rules.normalized import MUON_COEFFICIENTS, cosh_rms, newton_schulz, newton_schulz_dtype
from tests.helpers.reference import ns_ref

A, B, C = MUON_COEFFICIENTS


def normalized_momentum_ref(
    w0,
    grads,
    *,
    kind,
    lr,
    weight_decay=0.0,
    momentum=0.95,
    nesterov=True,
    gamma=1.0,
    normalize=True,
    ns_steps=5,
    adjust="original",
):
    """The paper formulas in float64: Nesterov momentum, X = D/(||D||+1e-7), the kind's direction,
    W <- W (1 - lr wd) - lr s U."""
    w = w0.double().clone()
    m, n = w.shape[0], w[0].numel()
    s = {"original": math.sqrt(max(1.0, m / n)), "none": 1.0, "match_rms_adamw": 0.2 * math.sqrt(max(m, n))}[adjust]
    buf = torch.zeros(m, n, dtype=torch.float64)
    for g in grads:
        g = g.double().reshape(m, n)
        buf = momentum * buf + (1 - momentum) * g
        d = (1 - momentum) * g + momentum * buf if nesterov else buf
        x = d / (d.norm() + 1e-7)
        if kind == "auon":
            r = torch.sqrt(torch.mean(torch.cosh(gamma * x) ** 2))
            u = (x if normalize else d) / (r + 1e-8)
        elif kind == "hybrid":
            y = ns_ref(x, ns_steps)
            u = y / (torch.sqrt(torch.mean(torch.cosh(gamma * y) ** 2)) + 1e-8)
        else:
            u = ns_ref(x, ns_steps)
        w = w * (1 - lr * weight_decay) - lr * s * u.reshape(w.shape)
    return w


def run(opt_cls, w0, grads, **kwargs):
    w = w0.clone().requires_grad_()
    opt = opt_cls([w], **kwargs)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach(), opt


def gaussians(*shape, count=4, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(*shape, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (8, 3, 3, 3)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_auon_matches_float64_reference_of_paper_formula(shape, nesterov):
    w0, *grads = gaussians(*shape, count=5)
    got, _ = run(lowmem_optim.AuON, w0, grads, lr=0.3, weight_decay=0.1, nesterov=nesterov, gamma=1.0)
    want = normalized_momentum_ref(w0, grads, kind="auon", lr=0.3, weight_decay=0.1, nesterov=nesterov)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adjust", ["original", "none", "match_rms_adamw"])
def test_auon_later_code_variant_and_lr_adjustments_match_reference(adjust):
    w0, *grads = gaussians(32, 8, count=4, scale=0.01)
    kw = dict(lr=0.05, gamma=1.5, normalize=False, adjust_lr_fn=adjust)
    got, _ = run(lowmem_optim.AuON, w0, grads, **kw)
    want = normalized_momentum_ref(w0, grads, kind="auon", lr=0.05, gamma=1.5, normalize=False, adjust=adjust)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
@pytest.mark.parametrize("ns_steps", [1, 3])
def test_hybrid_auon_float32_matches_float64_reference(shape, ns_steps):
    w0, *grads = gaussians(*shape, count=4)
    kw = dict(lr=0.1, weight_decay=0.05, ns_steps=ns_steps, gamma=1.5)
    got, _ = run(lowmem_optim.HybridAuON, w0, grads, ns_dtype="float32", **kw)
    want = normalized_momentum_ref(w0, grads, kind="hybrid", **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_hybrid_auon_bfloat16_stays_within_bfloat16_error_of_reference():
    w0, *grads = gaussians(32, 48, count=3)
    got, _ = run(lowmem_optim.HybridAuON, w0, grads, lr=0.1, ns_dtype="bfloat16")
    want = normalized_momentum_ref(w0, grads, kind="hybrid", lr=0.1, ns_steps=1)
    moved = (want - w0.double()).norm()
    assert (got.double() - want).norm() / moved < 2e-2  # bfloat16 has 8 bits of mantissa


@pytest.mark.parametrize("shape", [(24, 16), (16, 40), (6, 2, 2, 2)])
def test_muon_float32_matches_float64_reference(shape):
    w0, *grads = gaussians(*shape, count=4)
    got, _ = run(lowmem_optim.Muon, w0, grads, lr=0.02, weight_decay=0.1, ns_dtype="float32")
    want = normalized_momentum_ref(w0, grads, kind="muon", lr=0.02, weight_decay=0.1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_newton_schulz_is_torch_muons_bit_for_bit(shape):
    (g,) = gaussians(*shape, count=1)
    for steps in (1, 5):
        ours = newton_schulz(g.bfloat16(), steps, MUON_COEFFICIENTS)
        assert torch.equal(ours, _zeropower_via_newtonschulz(g, MUON_COEFFICIENTS, steps, 1e-7))


@pytest.mark.parametrize(
    "adjust, coefficients",
    [(None, MUON_COEFFICIENTS), ("match_rms_adamw", MUON_COEFFICIENTS), (None, (2.0, -1.5, 0.5))],
    ids=["original", "match_rms_adamw", "other-coefficients"],
)
def test_muon_matches_torch_optim_muon(adjust, coefficients):
    w0, *grads = gaussians(48, 32, count=6)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, ns_coefficients=coefficients)
    ours, _ = run(lowmem_optim.Muon, w0, grads, adjust_lr_fn=adjust or "original", ns_dtype="bfloat16", **kw)
    theirs, _ = run(torch.optim.Muon, w0, grads, adjust_lr_fn=adjust, **kw)
    # torch adds lr*U in one fused op, the engine subtracts a precomputed lr*U: at most an ulp apart
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours - w0).abs().max() > 1e-3


@pytest.mark.parametrize("factor", [1e-2, 1e3])
def test_auon_update_is_invariant_to_gradient_scale(factor):
    w0, *grads = gaussians(20, 12, count=4)
    base, _ = run(lowmem_optim.AuON, w0, grads, lr=0.2)
    scaled, _ = run(lowmem_optim.AuON, w0, [factor * g for g in grads], lr=0.2)
    # exact up to the 1e-7 in ||D||_F + 1e-7 (here ||D||_F >= 1e-2: relative 1e-5)
    torch.testing.assert_close(scaled - w0, base - w0, rtol=1e-4, atol=1e-7)


def test_auon_normalize_false_step_scales_with_gradient():
    w0, *grads = gaussians(20, 12, count=2)
    small, _ = run(lowmem_optim.AuON, w0, grads, lr=0.2, normalize=False)
    large, _ = run(lowmem_optim.AuON, w0, [10 * g for g in grads], lr=0.2, normalize=False)
    torch.testing.assert_close(large - w0, 10 * (small - w0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 1.5])
def test_cosh_rms_of_unit_frobenius_matrix_is_one_plus_gamma_squared_over_2n(gamma):
    (x,) = gaussians(64, 96, count=1)
    x = (x / x.norm()).double()
    n = x.numel()
    assert cosh_rms(x, gamma).item() - 1 == pytest.approx(gamma**2 / (2 * n), rel=1e-2)


def _singular_values(y: torch.Tensor) -> torch.Tensor:
    y = y.double()
    wide = y if y.shape[0] <= y.shape[1] else y.T
    return torch.linalg.eigvalsh(wide @ wide.T).clamp(min=0).sqrt()


def test_five_newton_schulz_steps_put_singular_values_above_1_over_400_in_068_to_12():
    (g,) = gaussians(256, 256, count=1)
    u, s, vh = torch.linalg.svd(g / g.norm())
    y = newton_schulz(g.bfloat16(), 5, MUON_COEFFICIENTS).float()
    out = (u.T @ y @ vh.T).diagonal()  # the output along each input singular pair
    kept = s >= 1 / 400
    assert kept.sum() > 200
    assert 0.66 <= out[kept].min() and out[kept].max() <= 1.21
    sv = _singular_values(y)
    assert sv.max() <= 1.21 and sv.min() < 0.1  # documented for 256 x 256: [0.07, 1.20]


def test_newton_schulz_ranges_on_256_by_1024_for_one_and_five_steps():
    (g,) = gaussians(256, 1024, count=1)
    five = _singular_values(newton_schulz(g.bfloat16(), 5, MUON_COEFFICIENTS))
    one = _singular_values(newton_schulz(g.bfloat16(), 1, MUON_COEFFICIENTS))
    assert 0.66 <= five.min() and five.max() <= 1.16  # documented: [0.68, 1.14]
    assert 0.09 <= one.min() and one.max() <= 0.34  # documented: [0.11, 0.32], no band near 1


def test_one_newton_schulz_step_maps_unit_singular_value_to_a_plus_b_plus_c():
    x = torch.zeros(5, 7)
    x[2, 3] = 3.0  # rank one: after normalization its singular value is 1
    y = newton_schulz(x, 1, MUON_COEFFICIENTS)
    assert y[2, 3].item() == pytest.approx(A + B + C, abs=1e-5)  # 0.701


@pytest.mark.parametrize("cls", [lowmem_optim.AuON, lowmem_optim.HybridAuON, lowmem_optim.Muon])
def test_zero_gradient_with_zero_lr_leaves_weights_and_state_finite(cls):
    w0 = torch.randn(8, 6)
    got, opt = run(cls, w0, [torch.zeros(8, 6)] * 2, lr=0.0)
    assert torch.equal(got, w0)
    assert torch.isfinite(opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"]).all()


@pytest.mark.parametrize("cls", [lowmem_optim.Muon, lowmem_optim.HybridAuON])
def test_newton_schulz_runs_in_float32_off_cuda_by_default(cls):
    w0, *grads = gaussians(24, 16, count=2)
    default, opt = run(cls, w0, grads)
    assert opt.param_groups[0]["ns_dtype"] == "auto"
    assert torch.equal(default, run(cls, w0, grads, ns_dtype="float32")[0])
    assert not torch.equal(default, run(cls, w0, grads, ns_dtype="bfloat16")[0])


def test_auto_newton_schulz_dtype_is_bfloat16_on_cuda_and_float32_elsewhere():
    assert newton_schulz_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert newton_schulz_dtype("auto", torch.device("cpu")) == torch.float32
    assert newton_schulz_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
