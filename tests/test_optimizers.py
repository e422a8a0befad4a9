"""Each optimizer against its own equations (float64 references) and against its peers."""

import pytest
import torch

import lowmem_optim
from lowmem_optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from tests.reference import galore_ref


def _grads(shape, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def _run(opt_cls, w0, grads, group_kwargs, **opt_kwargs):
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([{"params": [p], **group_kwargs}], **opt_kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def _step_side_by_side(ours, ref, opt, ref_opt, steps, gen):
    """Give both parameter lists the same random gradients and step both optimizers."""
    for _ in range(steps):
        for a, c in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=gen)
            c.grad = a.grad.clone()
        opt.step()
        ref_opt.step()


def test_full_rank_group_equals_torch_adamw_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=gen), torch.randn(32, generator=gen)
    ours = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    ref = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    groups = lambda ps: [{"params": [ps[0]], "lr": 3e-3, "weight_decay": 0.1}, {"params": [ps[1]]}]  # noqa: E731
    opt = GaLoreAdamW(groups(ours), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05)
    torch_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05)
    _step_side_by_side(ours, ref, opt, torch_opt, 15, gen)
    for a, c in zip(ours, ref):
        assert torch.equal(a, c)
        assert torch.equal(opt.state[a]["exp_avg_sq"], torch_opt.state[c]["exp_avg_sq"])


@pytest.mark.parametrize("shape,proj_type,side", [
    ((64, 24), "std", "right"), ((24, 64), "std", "left"),
    ((64, 24), "reverse_std", "left"), ((24, 64), "reverse_std", "right"),
    ((40, 40), "left", "left"), ((40, 40), "right", "right"),
])
def test_galore_adamw_matches_float64_reference(shape, proj_type, side):
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grads = _grads(shape, 12)
    kwargs = dict(rank=6, update_proj_gap=5, scale=0.25, proj_type=proj_type)
    ours, opt = _run(GaLoreAdamW, w0, grads, kwargs, lr=1e-2, weight_decay=0.1)
    ref = galore_ref(w0, grads, rank=6, gap=5, scale=0.25, side=side, lr=1e-2, weight_decay=0.1)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-6)
    assert opt.layer_stats()[0]["side"] == side and opt.layer_stats()[0]["refreshes"] == 3


def test_galore_adafactor_matches_float64_reference():
    w0 = torch.randn(64, 24, generator=torch.Generator().manual_seed(2))
    grads = _grads((64, 24), 12, seed=3)
    ours, _ = _run(GaLoreAdafactor, w0, grads, dict(rank=6, update_proj_gap=5, scale=0.25))
    ref = galore_ref(w0, grads, rank=6, gap=5, scale=0.25, side="right", lr=0.0, weight_decay=0.0, rule="adafactor")
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-6)


def test_full_projection_matches_two_sided_reference():
    """At a refresh P^T G Q is diagonal up to rounding (1e-6 in float32, 1e-15 in float64), and
    Adam maps those off-diagonal crumbs to about +-1; a large eps keeps the comparison about the
    equations rather than about rounding noise."""
    w0 = torch.randn(32, 48, generator=torch.Generator().manual_seed(4))
    grads = _grads((32, 48), 6, seed=5)
    ours, opt = _run(GaLoreAdamW, w0, grads, dict(rank=5, update_proj_gap=3, proj_type="full"), lr=1e-2,
                     eps=1e-2, weight_decay=0.0)
    w, state = w0.double().clone(), {}
    from tests.reference import adam_ref, svd_basis
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if (t - 1) % 3 == 0:
            p, q = svd_basis(g, 5, "left"), svd_basis(g, 5, "right")
        n = adam_ref(state, p.T @ g @ q, t, 1e-2, eps=1e-2)
        w = w - 0.25 * p @ n @ q.T
    torch.testing.assert_close(ours.double(), w, rtol=0, atol=2e-6)
    assert opt.state[next(iter(opt.state))]["exp_avg"].shape == (5, 5)


def test_full_rank_adafactor_group_matches_hf_transformers_adafactor():
    from transformers.optimization import Adafactor

    gen = torch.Generator().manual_seed(6)
    w, b = torch.randn(32, 16, generator=gen), torch.randn(16, generator=gen)
    ours = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    ref = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    opt, hf = GaLoreAdafactor(ours, beta1=0.9, weight_decay=0.01), Adafactor(ref, beta1=0.9, weight_decay=0.01)
    _step_side_by_side(ours, ref, opt, hf, 8, gen)
    for a, c in zip(ours, ref):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_adamw8bit_tracks_32bit_rule_within_tolerance():
    """Blockwise 8-bit moments: the parameter change stays within 5% (relative, Frobenius) of
    the 32-bit rule's over 30 steps, low-rank and full-rank."""
    w0 = torch.randn(256, 64, generator=torch.Generator().manual_seed(7))
    grads = [g + 0.5 for g in _grads((256, 64), 30, seed=8)]
    for group in ({"rank": 32, "update_proj_gap": 10}, {}):
        exact, _ = _run(GaLoreAdamW, w0, grads, group, lr=1e-3)
        quant, opt = _run(GaLoreAdamW8bit, w0, grads, group, lr=1e-3, min_8bit_size=0)
        state = next(iter(opt.state.values()))
        assert state["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in state
        rel = float((quant - exact).norm() / (exact - w0).norm())
        assert rel < 0.05, rel


def test_galore_adamw_tracks_galore_torch_on_the_same_problem():
    """Parity with the peer. Within the first subspace window the parameters agree closely (eps
    before vs after the bias correction is the only difference); after a refresh galore-torch
    keeps LAPACK's arbitrary singular-vector signs while we fix them, so moments of flipped
    coordinates differ and the comparison is on the loss."""
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    model_b = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    model_b.load_state_dict(model_a.state_dict())

    def groups(model):
        low = [model[0].weight, model[2].weight]
        rest = [model[0].bias, model[2].bias]
        return [{"params": rest}, {"params": low, "rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}]

    # eps tiny on both sides, so its placement (before vs after the bias correction) is immaterial
    ours = GaLoreAdamW(groups(model_a), lr=1e-2, eps=1e-12, weight_decay=0.0)
    peer = galore_torch.GaLoreAdamW(groups(model_b), lr=1e-2, eps=1e-12, weight_decay=0.0, no_deprecation_warning=True)
    x, y = torch.randn(64, 32), torch.randn(64, 8)

    def train(model, opt, steps):
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    train(model_a, ours, 10)
    train(model_b, peer, 10)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    start = torch.nn.functional.mse_loss(model_a(x), y).item()
    ours_loss, peer_loss = train(model_a, ours, 90), train(model_b, peer, 90)
    assert ours_loss < 0.75 * start and peer_loss < 0.75 * start
    assert abs(ours_loss - peer_loss) < 0.05 * peer_loss, (ours_loss, peer_loss)


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor", "galore_adamw8bit"])
def test_registry_builds_each_optimizer_from_a_model(name):
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 32), torch.nn.Linear(32, 8))
    opt = lowmem_optim.build_optimizer(name, model, rank=4)
    assert isinstance(opt, lowmem_optim.get_optimizer_class(name))
    assert [g["rank"] for g in opt.param_groups] == [None, 4]
