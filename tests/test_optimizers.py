"""Each optimizer against its own equations (float64 references) and against its peers: the GaLore
family, Q-GaLore (INT4 projection, adaptive refresh, 8-bit moments, q-galore-torch's group keys),
and AuON, HybridAuON and Muon (AdamW for the other parameters, the low-rank variant, a tiny LLaMA).
The properties every optimizer shares (resume, state layout, bad input, ...) are in
tests/test_conformance.py."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import lowmem_optim
from lowmem_optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW8bit
from tests.helpers.models import ConvNet, conv_batch
from tests.helpers.reference import adam_ref, galore_ref, svd_basis

NORMALIZED = [lowmem_optim.AuON, lowmem_optim.HybridAuON, lowmem_optim.Muon]


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


@pytest.mark.parametrize(
    "shape,proj_type,side",
    [
        ((64, 24), "std", "right"),
        ((24, 64), "std", "left"),
        ((64, 24), "reverse_std", "left"),
        ((24, 64), "reverse_std", "right"),
        ((40, 40), "left", "left"),
        ((40, 40), "right", "right"),
    ],
)
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
    ours, opt = _run(
        GaLoreAdamW, w0, grads, dict(rank=5, update_proj_gap=3, proj_type="full"), lr=1e-2, eps=1e-2, weight_decay=0.0
    )
    w, state = w0.double().clone(), {}
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if (t - 1) % 3 == 0:
            p, q = svd_basis(g, 5, "left"), svd_basis(g, 5, "right")
        n = adam_ref(state, p.T @ g @ q, t, 1e-2, eps=1e-2)
        w = w - 0.25 * p @ n @ q.T
    torch.testing.assert_close(ours.double(), w, rtol=0, atol=2e-6)
    assert opt.state[next(iter(opt.state))]["exp_avg"].shape == (5, 5)


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
    import galore_torch  # a dev dependency: never skipped

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


def minmax_roundtrip(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max quantization (float zero point) and back, in float64, per flattened group."""
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), group):
        g = flat[start : start + group]
        lo, hi = g.min(), g.max()
        scale = (hi - lo) / (2**bits - 1) if hi > lo else torch.ones((), dtype=g.dtype)
        zero = -lo / scale
        out[start : start + group] = scale * (torch.clamp(torch.round(g / scale + zero), 0, 2**bits - 1) - zero)
    return out.view_as(x)


def qgalore_ref(w0, grads, *, rank, gap, scale, lr, wd, queue_size, gamma, max_gap, bits=4, group=256):
    """Q-GaLore in float64: INT4-stored basis refreshed at 1 and then step + gap, where the gap
    grows by gamma once the last queue_size |cos| of leading vectors average >= 0 (always)."""
    w = w0.double().clone()
    m, n = w.shape
    side = "right" if m >= n else "left"
    state, queue, basis, next_refresh, refreshes = {}, [], None, 1, []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if t >= next_refresh:
            new = svd_basis(g, rank, side)  # dim x r
            stored = minmax_roundtrip(new.T if side == "right" else new, bits, group)
            new_q = stored.T if side == "right" else stored
            if basis is not None:
                queue = (queue + [float((basis[:, 0] @ new[:, 0]).abs() / basis[:, 0].norm())])[-queue_size:]
            if len(queue) == queue_size:
                gap, queue = min(int(gap * gamma), max_gap), []
            basis, next_refresh = new_q, t + gap
            refreshes.append(t)
        r = basis.T @ g if side == "left" else g @ basis
        step = adam_ref(state, r, t, lr)
        w = w * (1 - lr * wd) - scale * (basis @ step if side == "left" else step @ basis.T)
    return w, refreshes


def run_q_galore(w0, grads, **kwargs):
    p = nn.Parameter(w0.clone())
    opt = QGaLoreAdamW8bit(
        [{"params": [p], "rank": 6}],
        lr=1e-2,
        weight_decay=0.1,
        update_proj_gap=1,
        scale=0.5,
        queue_size=2,
        cos_threshold=0.0,
        gamma_proj=2,
        max_gap=4,
        **kwargs,
    )
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def q_galore_problem(m=48, n=40, steps=9):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(m, n, generator=gen), [torch.randn(m, n, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(48, 40), (40, 48)])
def test_q_galore_matches_float64_reference_with_float32_moments(shape):
    w0, grads = q_galore_problem(*shape)
    got, opt = run_q_galore(w0, grads, min_8bit_size=10**9)  # moments below the 8-bit threshold stay fp32
    want, refreshes = qgalore_ref(
        w0, grads, rank=6, gap=1, scale=0.5, lr=1e-2, wd=0.1, queue_size=2, gamma=2, max_gap=4
    )
    assert refreshes == [1, 2, 3, 5, 7]  # gap 1, 1, 2, 2, 4: the adaptive schedule at work
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["refreshes"] == len(refreshes)
    assert any(k.endswith("_codes") for k in state) and not any(k in state for k in ("proj_left", "proj_right"))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_q_galore_8bit_moments_stay_within_quantization_tolerance_of_the_reference():
    w0, grads = q_galore_problem()
    got, opt = run_q_galore(w0, grads, min_8bit_size=0)
    want, _ = qgalore_ref(w0, grads, rank=6, gap=1, scale=0.5, lr=1e-2, wd=0.1, queue_size=2, gamma=2, max_gap=4)
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg_codes"].dtype == torch.uint8
    moved = (want - w0.double()).norm()
    assert float((got.double() - want).norm() / moved) < 0.02  # 8-bit moments: about 1% per value


def test_q_galore_accepts_q_galore_torch_group_keys():
    p = nn.Parameter(torch.zeros(8, 8))
    opt = QGaLoreAdamW8bit(
        [
            {
                "params": [p],
                "rank": 2,
                "quant": True,
                "quant_n_bit": 8,
                "quant_group_size": 64,
                "cos_threshold": 0.5,
                "gamma_proj": 3,
                "queue_size": 4,
            }
        ]
    )
    group = opt.param_groups[0]
    assert (group["proj_bits"], group["proj_group_size"], group["refresh"], group["rule"]) == (
        8,
        64,
        "adaptive",
        "adam8bit",
    )
    off = QGaLoreAdamW8bit([{"params": [nn.Parameter(torch.zeros(8, 8))], "rank": 2, "quant": False}])
    assert off.param_groups[0]["proj_bits"] is None
    with pytest.raises(ValueError, match="quant_n_bit"):
        QGaLoreAdamW8bit([{"params": [p], "rank": 2, "quant_n_bit": 8, "proj_bits": 4}])


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def train_conv(model: nn.Module, opt: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        x, y = conv_batch(seed)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("cls", NORMALIZED)
def test_adamw_groups_get_adamw_defaults_and_equal_torch_adamw(cls):
    model = ConvNet()
    twin = copy.deepcopy(model)
    opt = cls(
        lowmem_optim.normalized_param_groups(model, ["conv", "fc"]),
        lr=0.05,
        adamw_lr=3e-3,
        adamw_betas=(0.8, 0.95),
        adamw_weight_decay=0.1,
    )
    rest = opt.param_groups[0]
    assert (rest["rule"], rest["lr"], rest["betas"], rest["weight_decay"]) == ("adam", 3e-3, (0.8, 0.95), 0.1)
    assert opt.param_groups[1]["lr"] == 0.05
    twin_rest = [p for n, p in twin.named_parameters() if n in rest["param_names"]]
    reference = torch.optim.AdamW(twin_rest, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)
    for seed in range(3):
        x, y = conv_batch(seed)
        for m, o in ((model, opt), (twin, reference)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        reference.step()
        # keep the twin's matrices equal to ours so the AdamW parameters see the same gradients
        with torch.no_grad():
            for name in opt.param_groups[1]["param_names"]:
                twin.get_parameter(name).copy_(model.get_parameter(name))
    for name in rest["param_names"]:
        assert torch.equal(model.get_parameter(name), twin.get_parameter(name)), name


def test_conv_weight_is_updated_as_out_by_rest_matrix():
    model = ConvNet()
    opt = lowmem_optim.AuON(
        lowmem_optim.normalized_param_groups(model, ["conv"]), lr=0.1, momentum=0.0, adjust_lr_fn="none"
    )
    w0 = model.conv.weight.detach().clone()
    train_conv(model, opt, range(1))
    g = model.conv.weight.grad.reshape(8, -1).double()
    x = g / (g.norm() + 1e-7)
    u = x / torch.sqrt(torch.mean(torch.cosh(x) ** 2))
    torch.testing.assert_close((w0 - model.conv.weight.detach()).reshape(8, -1).double(), 0.1 * u, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", NORMALIZED)
def test_one_dimensional_parameter_in_matrix_group_is_rejected_with_the_fix(cls):
    with pytest.raises(ValueError, match="rule='adam'"):
        cls([nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(3))])


def test_lowrank_auon_keeps_r_by_n_momentum_and_matches_projected_reference():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 40))
    w0 = w.detach().clone()
    opt = lowmem_optim.AuON([{"params": [w], "rank": 4, "update_proj_gap": 100}], lr=0.2)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(24, 40, generator=gen) for _ in range(3)]
    for g in grads:
        w.grad = g.clone()
        opt.step()
    assert opt.state[w]["momentum_buffer"].shape == (4, 40)  # m < n: projected on the left
    # float64 reference: P = top-4 left singular vectors of the first gradient; AuON on P^T G
    p = torch.linalg.svd(grads[0].double(), full_matrices=False)[0][:, :4]
    ref, buf = w0.double(), torch.zeros(4, 40, dtype=torch.float64)
    for g in grads:
        r = p.T @ g.double()
        buf = 0.95 * buf + 0.05 * r
        x = (0.05 * r + 0.95 * buf) / ((0.05 * r + 0.95 * buf).norm() + 1e-7)
        ref = ref - 0.2 * p @ (x / torch.sqrt(torch.mean(torch.cosh(x) ** 2)))
    torch.testing.assert_close(w.detach().double(), ref, rtol=1e-4, atol=1e-5)


def llama_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


@pytest.mark.parametrize(
    ("cls", "lr"), [(lowmem_optim.AuON, 0.3), (lowmem_optim.HybridAuON, 0.1), (lowmem_optim.Muon, 0.02)]
)
def test_tiny_llama_loss_goes_down(cls, lr):
    model = tiny_llama()
    opt = cls(lowmem_optim.normalized_param_groups(model), lr=lr, adamw_lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 128, (16,), generator=gen)
    tokens = pattern.repeat(4, 2)  # learnable: each sequence repeats a fixed 16-token pattern
    first = llama_loss(model, tokens).item()
    for _ in range(12):
        opt.zero_grad()
        llama_loss(model, tokens).backward()
        opt.step()
    assert llama_loss(model, tokens).item() < 0.85 * first


def test_named_optimizers_are_declarations_without_an_init_of_their_own():
    from lowmem_optim.engine import declared_defaults
    from lowmem_optim.registry import OPTIMIZERS, get_optimizer_class

    named = [get_optimizer_class(name) for name, path in OPTIMIZERS.items() if path.startswith("lowmem_optim.")]
    assert named and not [cls.__name__ for cls in named if "__init__" in vars(cls)]
    for cls in named:
        shown = list(inspect.signature(cls).parameters.values())[1 : 1 + len(cls.leading)]
        assert [(p.name, p.default) for p in shown] == [(n, declared_defaults(cls)[n]) for n in cls.leading]


def test_leading_hyperparameters_are_taken_by_position_once():
    w = [torch.nn.Parameter(torch.randn(8, 8))]
    given = {"lr": 0.1, "weight_decay": 0.01, "momentum": 0.95}
    assert lowmem_optim.AuON(w, 0.1, 0.01).defaults.items() >= given.items()
    assert GaLoreAdafactor(w, 0.01, relative_step=False).defaults["lr"] == 0.01
    with pytest.raises(TypeError, match="multiple values for argument 'lr'"):
        GaLoreAdamW(w, 0.01, lr=0.1)
    with pytest.raises(TypeError, match="positional arguments"):
        GaLoreAdamW(w, 0.01, (0.9, 0.99), 1e-8, 0.0, 4)
