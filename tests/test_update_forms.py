"""Update forms (lowmem_optim/update_forms.py): each form against a float64 reference of its
paper's equations (Fira's residual, APOLLO's channel and tensor scaling, GaLore's projection),
the norm-growth limiter measured without the step size, zero channels, the compositions the
forms make (DCT with Fira's residual), and the refusals. Resume, dtypes on load and ``step_param``
for Fira and the APOLLO forms run in tests/test_conformance.py; FSDP2 in tests/test_sharding.py;
the memory model in tests/test_memory.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem_optim import DCTAdamW, Fira, GaLoreAdamW
from lowmem_optim.layerwise import attach
from lowmem_optim.update_forms import LIMITER_KEY, channel_ratio
from tests.helpers.reference import adam_ref, svd_basis, update_form_ref

FORMS = ("projected", "residual", "channel", "tensor")
#: (shape, proj_type, side): a right projection (channels are rows), a left one (columns)
SIDES = [((40, 16), "std", "right"), ((16, 40), "std", "left")]
STEPS = 10
#: a linear warm-up over the first 6 steps, then constant: the step size changes under the limiter
WARMUP = [2e-2 * min(1.0, t / 6) for t in range(1, STEPS + 1)]


def _grads(shape: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(STEPS)]


def _run(cls: type, w0: torch.Tensor, grads: list[torch.Tensor], lrs: list[float], **hparams) -> tuple:
    """(weights, optimizer) after one step per gradient, the group's lr set to ``lrs`` step by step."""
    p = nn.Parameter(w0.clone())
    opt = cls([{"params": [p], "rank": 4, **hparams}], lr=lrs[0])
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("gamma", [1.01, None], ids=["limited", "unlimited"])
@pytest.mark.parametrize("shape, proj_type, side", SIDES, ids=[s[2] for s in SIDES])
@pytest.mark.parametrize("form", FORMS)
def test_each_form_matches_its_float64_reference_under_a_warm_up(form, shape, proj_type, side, gamma):
    """Ten steps, a refresh every 4, lr warming up: the weights follow the float64 equations; with
    gamma 1.01 the reference's limiter clips on some steps (so this also checks the clipping)."""
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grads = _grads(shape)
    hparams = dict(update_proj_gap=4, scale=0.5, proj_type=proj_type, weight_decay=0.1, update_form=form)
    if form != "projected":
        hparams["norm_growth_limit"] = gamma
    ours, opt = _run(GaLoreAdamW, w0, grads, WARMUP, **hparams)
    ref, clipped = update_form_ref(
        w0, grads, WARMUP, rank=4, gap=4, scale=0.5, side=side, weight_decay=0.1, form=form, gamma=gamma
    )
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-6)
    assert opt.layer_stats()[0]["side"] == side
    if form != "projected" and gamma is not None:
        assert 0 < clipped < STEPS - 1, clipped
        assert opt.state[opt.param_groups[0]["params"][0]][LIMITER_KEY].dtype == torch.float32


def _subspace_plus_growing_rest(shape: tuple[int, int], growth: float) -> list[torch.Tensor]:
    """G_t = A + growth^t B: A of rank 2 (what a rank-4 subspace chosen at step 1 holds), B
    orthogonal to A's column space (the residual), growing by ``growth`` per step."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(shape[0], 6, generator=gen))
    a = 10 * q[:, :2] @ torch.randn(2, shape[1], generator=gen)
    b = q[:, 2:] @ torch.randn(4, shape[1], generator=gen)
    return [a + growth**t * b for t in range(STEPS)]


def test_the_limiter_holds_a_growing_residual_to_gamma_per_step():
    """Fira's residual growing 10% per step at a constant lr (R, and so phi, constant): the limited
    term's step-size-free norm grows by exactly gamma per step, and the weights differ from an
    unlimited run's."""
    form = "residual"
    shape = (16, 40)  # a left projection: R = P^T G keeps A
    grads = _subspace_plus_growing_rest(shape, 1.1)
    w0 = torch.zeros(shape)
    lrs = [1e-2] * STEPS
    norms = []
    p = nn.Parameter(w0.clone())
    group = {"params": [p], "rank": 4, "update_proj_gap": 100, "update_form": form, "norm_growth_limit": 1.05}
    opt = GaLoreAdamW([group], lr=1e-2)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        norms.append(float(opt.state[p][LIMITER_KEY]))
    growth = [b / a for a, b in zip(norms[2:], norms[3:])]
    assert growth == pytest.approx([1.05] * len(growth), rel=1e-6)
    unlimited, _ = _run(GaLoreAdamW, w0, grads, lrs, update_proj_gap=100, update_form=form, norm_growth_limit=None)
    assert not torch.allclose(p.detach(), unlimited)


@pytest.mark.parametrize("form", ["residual", "channel", "tensor"])
def test_a_warm_up_is_not_clipped_by_the_limiter(form):
    """One constant gradient with lr growing 10% per step: S / lr_t is the same every step, so the
    limiter (which would cap S_t itself at 1% growth) changes nothing: bit for bit the unlimited run."""
    shape = (40, 16)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    lrs = [1e-3 * 1.1**t for t in range(STEPS)]
    w0 = torch.zeros(shape)
    keys = dict(update_proj_gap=100, update_form=form)
    limited, opt = _run(GaLoreAdamW, w0, [g] * STEPS, lrs, **keys)
    unlimited, _ = _run(GaLoreAdamW, w0, [g] * STEPS, lrs, **keys, norm_growth_limit=None)
    assert torch.equal(limited, unlimited)
    assert float(opt.state[opt.param_groups[0]["params"][0]][LIMITER_KEY]) > 0


def test_zero_channels_get_the_factor_zero_and_an_all_zero_gradient_leaves_no_nan():
    low = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    update = torch.tensor([[0.5, 0.0, 1.0], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(channel_ratio(update, low, 0), torch.tensor([0.5**0.5 / 10**0.5, 0.0, 0.5]))
    torch.testing.assert_close(channel_ratio(update, low, 1), torch.tensor([1.25**0.5 / 5**0.5, 0.5 / 3]))
    for form in ("residual", "channel", "tensor"):
        w = nn.Parameter(torch.ones(16, 40))
        opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_form": form}], lr=1e-2, weight_decay=0.0)
        for g in (torch.zeros(16, 40), torch.zeros(16, 40), torch.randn(16, 40)):
            g[:, 7] = 0  # one column (a channel of the left projection) always zero
            w.grad = g
            opt.step()
        assert torch.isfinite(w).all() and torch.isfinite(opt.state[w][LIMITER_KEY])
        if form == "channel":  # U = G s: a zero column of G stays where it was
            assert torch.equal(w[:, 7], torch.ones(16))


def test_dct_with_firas_residual_is_fira_on_the_dct_projector():
    """DCTAdamW(update_form="residual", error_feedback=None) is Fira on DCT's subspace at DCTAdamW's
    defaults (a refresh every step, scale 1): bit for bit, and it trains."""
    w0 = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    grads = _grads((40, 16), seed=6)
    lrs = [1e-2] * STEPS
    dct, _ = _run(DCTAdamW, w0, grads, lrs, update_form="residual", error_feedback=None)
    fira, _ = _run(Fira, w0, grads, lrs, proj_method="dct", update_proj_gap=1, scale=1.0)
    assert torch.equal(dct, fira)
    galore_dct, _ = _run(DCTAdamW, w0, grads, lrs, error_feedback=None)
    assert not torch.equal(dct, galore_dct)


def test_fira_defaults_are_the_papers():
    opt = Fira([nn.Parameter(torch.zeros(4, 4))])
    assert {k: opt.defaults[k] for k in ("update_form", "scale", "norm_growth_limit", "proj_method", "rule")} == {
        "update_form": "residual",
        "scale": 0.25,
        "norm_growth_limit": 1.01,
        "proj_method": "svd",
        "rule": "adam",
    }


def test_a_projection_on_both_sides_takes_the_tensor_form():
    """R = P^T G Q (r x r), U = G ||N|| / ||R||: the weights follow the float64 equations (eps 1e-2
    keeps R's rounding-level off-diagonal entries at a refresh out of Adam's N, as in
    tests/test_optimizers.py's two-sided reference); the per-channel forms are refused."""
    w0 = torch.randn(16, 40, generator=torch.Generator().manual_seed(7))
    grads = _grads((16, 40), seed=8)[:3]
    w = nn.Parameter(w0.clone())
    group = {"params": [w], "rank": 4, "proj_type": "full", "update_form": "tensor", "scale": 0.5}
    opt = GaLoreAdamW([{**group, "norm_growth_limit": None}], lr=1e-2, eps=1e-2, weight_decay=0.1)
    want, state = w0.double(), {}
    for t, g in enumerate(grads, start=1):
        w.grad = g.clone()
        opt.step()
        g = g.double()
        if t == 1:  # the only refresh (update_proj_gap 200)
            p, q = svd_basis(g, 4, "left"), svd_basis(g, 4, "right")
        r = p.T @ g @ q
        n = adam_ref(state, r, t, 1e-2, eps=1e-2)
        want = want * (1 - 1e-2 * 0.1) - 0.5 * g * (n.norm() / r.norm())
    torch.testing.assert_close(w.detach().double(), want, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="proj_type='full' with update_form='residual'"):
        Fira([{"params": [w], "rank": 4, "proj_type": "full"}])


def test_error_feedback_with_a_scaled_form_is_refused_naming_both_keys():
    w = nn.Parameter(torch.randn(16, 40))
    with pytest.raises(ValueError, match=r"error_feedback='nf4' with update_form='residual'.*update_form='projected'"):
        DCTAdamW([{"params": [w], "rank": 4}], update_form="residual")
    with pytest.raises(ValueError, match=r"error_feedback='8bit' with update_form='channel'"):
        GaLoreAdamW([{"params": [w], "rank": 4, "error_feedback": "8bit", "update_form": "channel"}])


def test_low_rank_accumulation_refuses_a_scaled_form_by_name():
    """The split step (begin_step, project_gradient, finish_step) never holds the whole gradient
    the forms scale: refused at begin_step, and by the layer-wise handle when it is attached."""
    w = nn.Parameter(torch.randn(16, 40))
    opt = Fira([{"params": [w], "rank": 4}], lr=1e-2)
    with pytest.raises(ValueError, match=r"begin_step: .* update_form='residual'.*allowed: update_form='projected'"):
        opt.begin_step(w, torch.randn(16, 40))
    assert not opt.state[w]  # nothing was stepped
    with pytest.raises(ValueError, match=r"accumulation_buffer with update_form='residual'"):
        attach(opt, accumulation_steps=2, accumulation_buffer="float32")
