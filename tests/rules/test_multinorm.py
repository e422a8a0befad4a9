"""SinkGD's and SCALE's rules against float64 references of their formulas, and the documented
facts: unit-RMS rows and columns at SR-Sinkhorn's fixed point, no state without momentum, scale
invariance up to float32's largest gradients, zero rows kept zero, and the rule inside a subspace."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowmem_optim
from lowmem_optim.rules.multinorm import normalize_rows, sinkhorn_normalize
from tests.helpers.reference import channel_normalized_ref, sinkhorn_ref, svd_basis


def run(opt_cls, w0, grads, **kwargs):
    w = nn.Parameter(w0.clone())
    opt = opt_cls([w], **kwargs)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach(), opt


def gaussians(*shape, count=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # rows and columns of different scales, so that the normalizations have something to do
    rows = torch.logspace(-1, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    return [rows * torch.randn(*shape, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (8, 3, 3, 3)])
@pytest.mark.parametrize("iterations", [1, 5])
@pytest.mark.parametrize("adjust", ["none", "original"])
def test_sinkgd_matches_float64_reference_of_sr_sinkhorn(shape, iterations, adjust):
    w0, grads = torch.randn(shape), gaussians(*shape)
    lr, wd = 0.01, 0.1
    got, opt = run(
        lowmem_optim.SinkGD, w0, grads, lr=lr, weight_decay=wd, sinkhorn_iterations=iterations, adjust_lr_fn=adjust
    )
    m, n = shape[0], math.prod(shape[1:])
    s = math.sqrt(max(1.0, m / n)) if adjust == "original" else 1.0
    want = w0.double()
    for g in grads:
        want = want * (1 - lr * wd) - lr * s * sinkhorn_ref(g.reshape(m, n), iterations).reshape(shape)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 16), (8, 3, 3, 3)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_scale_matches_float64_reference_of_channel_normalization(shape, momentum):
    w0, grads = torch.randn(shape), gaussians(*shape)
    lr, wd = 0.01, 0.1
    got, opt = run(lowmem_optim.SCALE, w0, grads, lr=lr, weight_decay=wd, momentum=momentum)
    m = shape[0]
    want, buf = w0.double(), torch.zeros(m, math.prod(shape[1:]), dtype=torch.float64)
    for g in grads:
        buf = momentum * buf + (1 - momentum) * g.double().reshape(m, -1)
        want = want * (1 - lr * wd) - lr * channel_normalized_ref(buf).reshape(shape)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_sinkhorn_rounds_converge_to_unit_rms_rows_and_columns():
    g = gaussians(48, 32)[0] * torch.logspace(-2, 2, 32)  # rows and columns both badly scaled
    x = sinkhorn_normalize(g, 30).double()
    ones = torch.ones((), dtype=torch.float64)
    torch.testing.assert_close(x.square().mean(dim=0).sqrt(), ones.expand(32), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.square().mean(dim=1).sqrt(), ones.expand(48), rtol=1e-5, atol=0)
    one_round = sinkhorn_normalize(g, 1).double()  # a round ends with the columns: exact there only
    torch.testing.assert_close(one_round.square().mean(dim=0).sqrt(), ones.expand(32), rtol=1e-6, atol=0)
    assert (one_round.square().mean(dim=1).sqrt() - 1).abs().max() > 1e-2


@pytest.mark.parametrize("cls", [lowmem_optim.SinkGD, lowmem_optim.SCALE])
def test_stateless_rules_keep_only_the_engines_step_count(cls):
    _, opt = run(cls, torch.randn(12, 8), gaussians(12, 8, count=2))
    (state,) = opt.state.values()
    assert set(state) == {"step"}, state
    _, with_momentum = run(lowmem_optim.SCALE, torch.randn(12, 8), gaussians(12, 8, count=2), momentum=0.9)
    (state,) = with_momentum.state.values()
    assert set(state) == {"step", "momentum_buffer"} and state["momentum_buffer"].shape == (12, 8)


@pytest.mark.parametrize("factor", [2.0**-100, 1e-30, 1e30, 3e38])
@pytest.mark.parametrize("cls", [lowmem_optim.SinkGD, lowmem_optim.SCALE])
def test_update_is_invariant_to_gradient_scale_up_to_float32s_largest(cls, factor):
    w0, grads = torch.randn(16, 24), gaussians(16, 24, count=2)
    grads = [g / g.abs().max() for g in grads]  # entries up to 1, so 3e38 x g stays finite
    base, _ = run(cls, w0, grads, lr=0.01)
    scaled, _ = run(cls, w0, [factor * g for g in grads], lr=0.01)
    assert torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled, base, rtol=1e-5, atol=1e-7)


def test_zero_rows_and_columns_stay_zero_and_the_rest_is_normalized():
    g = torch.randn(6, 5)
    g[2] = 0
    g[:, 3] = 0
    for x in (normalize_rows(g), sinkhorn_normalize(g, 5)):
        assert torch.isfinite(x).all()
        assert not x[2].any() and not x[:, 3].any()
    torch.testing.assert_close(normalize_rows(g)[0].square().mean(), torch.tensor(1.0))


@pytest.mark.parametrize("cls", [lowmem_optim.SinkGD, lowmem_optim.SCALE])
def test_zero_gradient_with_zero_lr_leaves_weights_finite(cls):
    # what torch.distributed checkpointing does to initialize state: a step on zero gradients, lr 0
    w0 = torch.randn(8, 6)
    got, _ = run(cls, w0, [torch.zeros(8, 6)] * 2, lr=0.0)
    assert torch.equal(got, w0)


def test_sinkgd_inside_a_subspace_normalizes_the_projected_gradient():
    """With ``rank``, the engine projects: W <- W - lr P SR-Sinkhorn(P^T G), P the top-4 left
    singular vectors of the first gradient (m < n: projected on the left)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 40))
    w0 = w.detach().clone()
    opt = lowmem_optim.SinkGD([{"params": [w], "rank": 4, "update_proj_gap": 100}], lr=0.01)
    grads = gaussians(24, 40, count=3, seed=1)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    p = svd_basis(grads[0], 4, "left")
    want = w0.double()
    for g in grads:
        want = want - 0.01 * p @ sinkhorn_ref(p.T @ g.double(), 5)
    torch.testing.assert_close(w.detach().double(), want, rtol=1e-4, atol=1e-5)
