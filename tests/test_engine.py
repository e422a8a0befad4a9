"""The engine's contract: torch.optim conformance, state as data, exact resume, statistics."""

import copy
import io

import pytest
import torch

import lowmem_optim
from lowmem_optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

OPTIMIZERS = [GaLoreAdamW, GaLoreAdafactor, GaLoreAdamW8bit]
LOWRANK = {"rank": 4, "update_proj_gap": 3}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 96), torch.nn.Tanh(), torch.nn.Linear(96, 4))


def _groups(model, **low):
    return [
        {"params": [model[0].bias, model[2].bias]},
        {"params": [model[0].weight, model[2].weight], **LOWRANK, **low},
    ]


def _kwargs(cls):
    # small blocks so the 8-bit path is exercised on these small matrices
    return {"min_8bit_size": 0} if cls is GaLoreAdamW8bit else {}


_X, _Y = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), torch.randn(32, 4, generator=torch.Generator().manual_seed(2))


def _train(model, opt, steps, scheduler=None):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(_X), _Y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("with_scheduler", [False, True])
def test_loss_goes_down_with_and_without_lr_scheduler(cls, with_scheduler):
    model = _model()
    # a scheduler scales an explicit lr: Adafactor then runs without its relative step
    lr = dict(lr=1e-2, relative_step=False, scale_parameter=False) if cls is GaLoreAdafactor else {"lr": 1e-2}
    opt = cls(_groups(model), **lr, **_kwargs(cls))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s)) if with_scheduler else None
    losses = _train(model, opt, 30, scheduler)
    assert losses[-1] < 0.7 * losses[0]


def test_adafactor_relative_step_default_trains():
    model = _model()
    losses = _train(model, GaLoreAdafactor(_groups(model)), 60)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_state_dict_weights_only_roundtrip_resumes_bit_for_bit_across_refresh(cls):
    """Save after 4 steps (a refresh at step 4 follows), load with weights_only=True into a fresh
    optimizer, continue: identical to the uninterrupted run."""
    full_model = _model()
    full_opt = cls(_groups(full_model), **_kwargs(cls))
    _train(full_model, full_opt, 10)

    model = _model()
    opt = cls(_groups(model), **_kwargs(cls))
    _train(model, opt, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = _model(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed_opt = cls(_groups(resumed_model), **_kwargs(cls))
    resumed_opt.load_state_dict(saved["opt"])
    _train(resumed_model, resumed_opt, 6)

    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full_opt.state.values(), resumed_opt.state.values()):
        assert a.keys() == b.keys()
        for key in a:
            assert (torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]), key


def test_state_holds_only_tensors_and_numbers():
    model = _model()
    opt = GaLoreAdamW8bit(_groups(model), min_8bit_size=0)
    _train(model, opt, 4)
    for state in opt.state_dict()["state"].values():
        for key, value in state.items():
            assert torch.is_tensor(value) or isinstance(value, (int, float)), (key, type(value))


def test_state_follows_params_to_another_dtype_keeping_codes_and_scales():
    model = _model()
    opt = GaLoreAdamW8bit(_groups(model), min_8bit_size=0)
    _train(model, opt, 4)
    saved = opt.state_dict()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    opt_bf16 = GaLoreAdamW8bit(_groups(model_bf16), min_8bit_size=0)
    opt_bf16.load_state_dict(saved)
    low = opt_bf16.state[model_bf16[0].weight]
    assert low["proj_right"].dtype == torch.bfloat16 if "proj_right" in low else low["proj_left"].dtype == torch.bfloat16
    assert low["exp_avg_codes"].dtype == torch.uint8 and low["exp_avg_absmax"].dtype == torch.float32
    assert opt_bf16.state[model_bf16[0].bias]["exp_avg_sq_absmax"].dtype == torch.float32
    model_bf16[0].weight.grad = torch.randn_like(model_bf16[0].weight)
    opt_bf16.step()
    assert torch.isfinite(model_bf16[0].weight.float()).all()


def test_per_group_lr_and_weight_decay_are_honoured():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 16, generator=gen)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = GaLoreAdamW([{"params": [a], "rank": 4, "lr": 0.0, "weight_decay": 0.5},
                       {"params": [b], "rank": 4, "lr": 1e-2, "weight_decay": 0.0}], lr=1.0)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert torch.equal(a, w)  # lr 0: neither the update nor the (lr-scaled) decay moves it
    assert not torch.equal(b, w)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_zero_gradient_step_is_a_no_op_without_weight_decay(cls):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = cls(_groups(model), weight_decay=0.0, **_kwargs(cls))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(4):  # includes the refresh at step 1 and step 4 (SVD of an all-zero matrix)
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
        assert all(torch.isfinite(v).all() for v in opt.state[p].values() if torch.is_tensor(v) and v.is_floating_point())


def test_params_without_grad_are_skipped():
    model = _model()
    opt = GaLoreAdamW(_groups(model))
    model[0].weight.grad = torch.randn_like(model[0].weight)
    before = model[2].weight.detach().clone()
    opt.step()
    assert model[2].weight not in opt.state and torch.equal(model[2].weight, before)
    assert model[0].weight in opt.state


def test_deepcopy_gives_an_independent_optimizer():
    model = _model()
    opt = GaLoreAdamW(_groups(model))
    _train(model, opt, 2)
    clone = copy.deepcopy(opt)
    _train(model, opt, 2)
    assert {int(s["step"]) for s in clone.state.values()} == {2}
    assert {int(s["step"]) for s in opt.state.values()} == {4}
    assert all(p not in opt.state for p in clone.param_groups[0]["params"])


def test_step_and_state_dict_hooks_run():
    model = _model()
    opt = GaLoreAdamW(_groups(model))
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("state_dict") or sd)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load"))
    _train(model, opt, 1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "state_dict", "load"]


def test_closure_is_called_and_its_loss_returned():
    model = _model()
    opt = GaLoreAdamW(_groups(model))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(_X), _Y)
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.999)), "beta"), (dict(betas=(0.9, -0.1)), "beta"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(rank=0), "rank"),
    (dict(rank=2.5), "rank"), (dict(update_proj_gap=0), "update_proj_gap"), (dict(scale=0.0), "scale"),
    (dict(scale=float("nan")), "scale"), (dict(proj_type="diagonal"), "proj_type"),
    (dict(proj_method="qr"), "proj_method"), (dict(refresh="sometimes"), "refresh"),
])
def test_bad_hyperparameters_raise_value_error_naming_them(kwargs, name):
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=name):
        GaLoreAdamW([{"params": [w], "rank": kwargs.pop("rank", 2)}], **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=1e-3), "relative_step"), (dict(relative_step=False), "lr"), (dict(eps=1e-30), "eps"),
    (dict(beta1=1.5), "beta1"), (dict(decay_rate=0.5), "decay_rate"), (dict(clip_threshold=0), "clip_threshold"),
])
def test_bad_adafactor_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GaLoreAdafactor([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_layer_stats_and_state_bytes_report_the_real_state():
    model = _model()
    opt = GaLoreAdamW(_groups(model))
    _train(model, opt, 7)
    stats = {s["name"]: s for s in opt.layer_stats()}
    assert set(stats) == {"param2", "param3"}
    first = stats["param2"]  # Linear(16, 96).weight: 96 x 16, std projects on the right
    assert (first["shape"], first["rank"], first["side"], first["refreshes"], first["gap"]) == ((96, 16), 4, "right", 3, 3)
    assert 0.0 <= first["last_similarity"] <= 1.0
    state = opt.state[model[0].weight]
    assert state["exp_avg"].shape == (96, 4) and state["proj_right"].shape == (4, 16)
    expected = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert opt.state_bytes() == expected
    assert first["state_bytes"] == sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def test_low_rank_state_is_smaller_than_adamw_state():
    model = torch.nn.Linear(256, 256, bias=False)
    model.weight.grad = torch.randn(256, 256)
    opt = GaLoreAdamW([{"params": [model.weight], "rank": 16}])
    opt.step()
    adam_bytes = 2 * 256 * 256 * 4
    # moments 256 x 16 x 2 plus a 16 x 256 projection, plus the step counter
    assert opt.state_bytes() == 3 * 256 * 16 * 4 + 4 < adam_bytes


def test_param_names_from_lowrank_param_groups_appear_in_stats():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 8))
    opt = GaLoreAdamW(lowmem_optim.lowrank_param_groups(model, rank=4))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert [s["name"] for s in opt.layer_stats()] == ["0.weight", "1.weight"]


def test_float16_params_keep_float32_moments_through_a_state_dict_roundtrip():
    p = torch.nn.Parameter(torch.randn(32, 16).half())
    opt = GaLoreAdamW([{"params": [p], "rank": 4}])
    p.grad = torch.randn_like(p)
    opt.step()
    fresh = GaLoreAdamW([{"params": [p], "rank": 4}])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["exp_avg"].dtype == torch.float32 and fresh.state[p]["proj_right"].dtype == torch.float16
