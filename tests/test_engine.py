"""The engine (:mod:`lowmem_optim.engine`): training with and without schedulers, torch.optim's
protocol (hooks, closures, deepcopy, per-group settings), dtypes through a load, statistics, and
inputs that break peers (low precision, odd layouts and shapes, sparse gradients)."""

import copy
import logging

import pytest
import torch

import lowmem_optim
from lowmem_optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, layerwise

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


_X, _Y = (
    torch.randn(32, 16, generator=torch.Generator().manual_seed(1)),
    torch.randn(32, 4, generator=torch.Generator().manual_seed(2)),
)


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


def test_state_follows_params_to_another_dtype_keeping_codes_and_scales():
    model = _model()
    opt = GaLoreAdamW8bit(_groups(model), min_8bit_size=0)
    _train(model, opt, 4)
    saved = opt.state_dict()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    opt_bf16 = GaLoreAdamW8bit(_groups(model_bf16), min_8bit_size=0)
    opt_bf16.load_state_dict(saved)
    low = opt_bf16.state[model_bf16[0].weight]
    assert (
        low["proj_right"].dtype == torch.bfloat16 if "proj_right" in low else low["proj_left"].dtype == torch.bfloat16
    )
    assert low["exp_avg_codes"].dtype == torch.uint8 and low["exp_avg_absmax"].dtype == torch.float32
    assert opt_bf16.state[model_bf16[0].bias]["exp_avg_sq_absmax"].dtype == torch.float32
    model_bf16[0].weight.grad = torch.randn_like(model_bf16[0].weight)
    opt_bf16.step()
    assert torch.isfinite(model_bf16[0].weight.float()).all()


def test_per_group_lr_and_weight_decay_are_honoured():
    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    a, b, c = (torch.nn.Parameter(w.clone()) for _ in range(3))
    opt = GaLoreAdamW(
        [
            {"params": [a], "rank": 4, "lr": 0.0, "weight_decay": 0.5},
            {"params": [b], "rank": 4, "lr": 1e-2, "weight_decay": 0.0},
            {"params": [c], "rank": 4, "lr": 1e-2, "weight_decay": 0.5},
        ],
        lr=1.0,
        weight_decay=0.1,
    )
    a.grad, b.grad, c.grad = g.clone(), g.clone(), g.clone()
    opt.step()
    assert torch.equal(a, w)  # lr 0: neither the update nor the (lr-scaled) decay moves it
    assert not torch.equal(b, w)
    # the same gradient and lr: b and c take the same update, and c alone decays, by its own lr * wd
    torch.testing.assert_close(c - b, -1e-2 * 0.5 * w, rtol=0, atol=1e-6)  # float32 rounding of w


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
    losses = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(_X), _Y)
        loss.backward()
        losses.append(loss)
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step(closure) is losses[0] and len(losses) == 1
    # the step used the gradients the closure computed
    assert all(int(opt.state[p]["step"]) == 1 for p in model.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_layer_stats_and_state_bytes_report_the_real_state():
    model = _model()
    opt = GaLoreAdamW(_groups(model))
    _train(model, opt, 7)
    stats = {s["name"]: s for s in opt.layer_stats()}
    assert set(stats) == {"param2", "param3"}
    first = stats["param2"]  # Linear(16, 96).weight: 96 x 16, std projects on the right
    assert (first["shape"], first["rank"], first["side"], first["refreshes"], first["gap"]) == (
        (96, 16),
        4,
        "right",
        3,
        3,
    )
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor, GaLoreAdamW8bit])
def test_half_precision_params_train_and_stay_in_their_dtype(cls, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(dtype)
    groups = [
        {"params": [model[0].bias, model[2].bias]},
        {"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 5},
    ]
    extra = {} if cls is GaLoreAdafactor else {"lr": 1e-2}
    opt = cls(groups, **extra)
    x, y = torch.randn(32, 16).to(dtype), torch.randn(32, 4).to(dtype)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_non_contiguous_param_gets_the_same_update_as_a_contiguous_one():
    base = torch.randn(24, 40, generator=torch.Generator().manual_seed(4))
    strided = torch.nn.Parameter(base.t().contiguous().t())  # 24 x 40, column-major
    dense = torch.nn.Parameter(base.clone())
    assert not strided.is_contiguous()
    opts = [GaLoreAdamW([{"params": [q], "rank": 4, "update_proj_gap": 2}]) for q in (strided, dense)]
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        g = torch.randn(24, 40, generator=gen)
        strided.grad, dense.grad = g.t().contiguous().t(), g.clone()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(strided, dense, rtol=0, atol=1e-6)


def test_one_dimensional_param_in_a_low_rank_group_is_refused_by_name():
    bias = torch.nn.Parameter(torch.zeros(16))
    with pytest.raises(ValueError, match=r"'fc.bias'.*1-D.*rank=4"):
        GaLoreAdamW([{"params": [bias], "param_names": ["fc.bias"], "rank": 4}])


def test_conv_weight_is_projected_as_out_by_rest():
    conv = torch.nn.Conv2d(8, 32, kernel_size=3)
    opt = GaLoreAdamW([{"params": [conv.weight], "rank": 4}])
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    state = opt.state[conv.weight]
    assert state["proj_left"].shape == (32, 4) and state["exp_avg"].shape == (4, 72)


def test_rank_at_least_the_matrix_size_updates_full_rank_and_says_so(caplog):
    w = torch.randn(12, 8, generator=torch.Generator().manual_seed(6))
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = GaLoreAdamW([{"params": [ours], "rank": 8}])
    torch_opt = torch.optim.AdamW([ref])
    with caplog.at_level(logging.WARNING, logger="lowmem_optim.engine"):
        for _ in range(3):
            g = torch.randn(12, 8)
            ours.grad, ref.grad = g.clone(), g.clone()
            opt.step()
            torch_opt.step()
    assert torch.equal(ours, ref)
    assert sum("updated full-rank" in r.message for r in caplog.records) == 1
    assert opt.layer_stats()[0]["side"] == "full-rank"


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = GaLoreAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor, GaLoreAdamW8bit])
def test_optimizers_step_on_cuda_and_match_cpu(cls):
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(7))
    grads = [torch.randn(256, 128, generator=torch.Generator().manual_seed(8 + i)) for i in range(5)]
    results = []
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(w.clone().to(device))
        opt = cls(
            [{"params": [p], "rank": 16, "update_proj_gap": 2}],
            **({"min_8bit_size": 0} if cls is GaLoreAdamW8bit else {}),
        )
        for g in grads:
            p.grad = g.to(device)
            opt.step()
        results.append(p.detach().cpu())
    torch.testing.assert_close(results[0], results[1], rtol=1e-3, atol=1e-4)


def _trained_state(make) -> dict:
    model = _model()
    opt = make(model)
    _train(model, opt, 2)
    return copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        (
            lambda m: GaLoreAdamW(_groups(m), lr=1e-3),
            lambda m: GaLoreAdamW8bit(_groups(m), lr=1e-3),
            "param group 0 has rule='adam' in the state dict but rule='adam8bit' here",
        ),
        (
            lambda m: lowmem_optim.AuON(lowmem_optim.normalized_param_groups(m), lr=1e-3),
            lambda m: GaLoreAdamW(lowmem_optim.lowrank_param_groups(m, rank=4), lr=1e-3),
            "param group 1 has rule='auon' in the state dict but rule='adam' here",
        ),
        (
            lambda m: GaLoreAdamW(_groups(m, rank=2), lr=1e-3),
            lambda m: GaLoreAdamW(_groups(m, rank=3), lr=1e-3),
            "param group 1 has rank=2 in the state dict but rank=3 here",
        ),
        (
            lambda m: GaLoreAdamW(_groups(m, proj_type="left"), lr=1e-3),
            lambda m: GaLoreAdamW(_groups(m), lr=1e-3),
            "param group 1 has proj_type='left' in the state dict but proj_type='std' here",
        ),
        (
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
            lambda m: GaLoreAdamW(_groups(m), lr=1e-3),
            "the state dict has 1 param groups, this optimizer 2",
        ),
        (
            lambda m: torch.optim.AdamW(_groups(m), lr=1e-3),
            lambda m: GaLoreAdamW(_groups(m), lr=1e-3),
            "param group 0 of the state dict names no rule, proj_method, refresh",
        ),
    ],
)
def test_load_state_dict_refuses_another_algorithm_or_layout_and_loads_nothing(source, target, message):
    saved = _trained_state(source)
    model = _model()
    opt = target(model)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(saved)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(opt.state_dict()) == str(before)  # nothing was loaded


def test_load_state_dict_lets_lr_betas_and_weight_decay_follow_the_state_dict():
    saved = _trained_state(lambda m: GaLoreAdamW(_groups(m), lr=1e-3, betas=(0.8, 0.9), weight_decay=0.1))
    opt = GaLoreAdamW(_groups(_model()), lr=5e-3)
    opt.load_state_dict(saved)
    assert [(g["lr"], tuple(g["betas"]), g["weight_decay"]) for g in opt.param_groups] == [(1e-3, (0.8, 0.9), 0.1)] * 2


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_step_that_raises_at_a_refresh_leaves_every_parameter_and_its_state_as_they_were(cls):
    model = _model()
    opt = cls(_groups(model), **_kwargs(cls))
    params = copy.deepcopy(list(model.parameters()))
    torch.nn.functional.mse_loss(model(_X), _Y).backward()
    model[0].weight.grad[0, 0] = float("nan")  # projected, after the biases' group; refreshes are due at step 1
    with pytest.raises(FloatingPointError, match=r"gradient of parameter \(index 0 in its group.*nothing was updated"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert not opt.state  # no moment, no subspace, no step counter
    model[0].weight.grad.zero_()
    opt.step()  # and the optimizer steps on afterwards
    assert int(opt.state[model[0].weight]["step"]) == 1


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_begin_project_finish_equals_step_param(cls):
    """The split step (begin_step, project_gradient, finish_step) is step_param's projected update."""
    models = [_model(), _model()]
    opts = [cls(_groups(m), **_kwargs(cls)) for m in models]
    for _ in range(4):  # refreshes at steps 1 and 4 (update_proj_gap 3)
        for m in models:
            m.zero_grad()
            torch.nn.functional.mse_loss(m(_X), _Y).backward()
        for p in models[0].parameters():
            opts[0].step_param(p)
        for p in models[1].parameters():
            if opts[1].is_projected(p):
                opts[1].begin_step(p, p.grad)
                opts[1].finish_step(p, opts[1].project_gradient(p, p.grad))
            else:
                opts[1].step_param(p)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_split_step_refuses_error_feedback_and_unprojected_params_by_name():
    model = _model()
    opt = GaLoreAdamW(_groups(model, error_feedback="float32"), lr=1e-2)
    torch.nn.functional.mse_loss(model(_X), _Y).backward()
    with pytest.raises(ValueError, match="error_feedback='float32'"):
        opt.begin_step(model[0].weight, model[0].weight.grad)
    with pytest.raises(ValueError, match="is not projected"):
        opt.project_gradient(model[0].bias, model[0].bias.grad)
    with pytest.raises(KeyError, match="not a parameter"):
        opt.begin_step(torch.nn.Parameter(torch.ones(3, 3)), torch.ones(3, 3))


def test_a_deepcopy_and_a_loaded_optimizer_step_their_own_parameters_by_lookup():
    """The parameter index follows the groups: a copy finds its own parameters (not the
    original's), and so does an optimizer after load_state_dict replaced its groups."""
    model = _model()
    opt = GaLoreAdamW(_groups(model))
    _train(model, opt, 2)
    clone = copy.deepcopy(opt)
    weight = clone.param_groups[1]["params"][0]
    weight.grad = torch.ones_like(weight)
    assert clone.is_projected(weight) and clone.draw_seed(weight, 1) == opt.draw_seed(model[0].weight, 1)
    clone.step_param(weight)
    assert int(clone.state[weight]["step"]) == 3 and int(opt.state[model[0].weight]["step"]) == 2
    with pytest.raises(KeyError, match="not a parameter"):
        clone.step_param(model[0].weight)
    fresh_model = _model()
    fresh = GaLoreAdamW(_groups(fresh_model))
    fresh.load_state_dict(opt.state_dict())
    assert fresh.draw_seed(fresh_model[2].weight, 1) == opt.draw_seed(model[2].weight, 1)


def test_a_param_group_refused_after_it_was_added_leaves_no_parameter_behind():
    """layerwise.attach pops a group it cannot serve after add_param_group took it: its
    parameters are no longer the optimizer's, for every per-parameter call."""
    model = _model()
    opt = GaLoreAdamW([{"params": [model[0].bias, model[2].bias]}])
    handle = layerwise.attach(opt, accumulation_steps=2, accumulation_buffer="float32")
    extra = {"params": [model[0].weight], **LOWRANK, "error_feedback": "float32"}
    with pytest.raises(ValueError, match="error_feedback"):
        opt.add_param_group(extra)
    handle.remove()
    for call in (opt.is_projected, opt.refresh_due, lambda p: opt.step_param(p, torch.ones_like(p))):
        with pytest.raises(KeyError, match="not a parameter"):
            call(model[0].weight)
