"""The Adam rule (:mod:`lowmem_optim.rules.adam`): torch.optim.AdamW's equations bit for bit on the
full gradient, and float32 moments for float16 parameters."""

import copy

import pytest
import torch

from lowmem_optim import GaLoreAdamW
from lowmem_optim.tools.memory_optimizer import optimizer_memory
from lowmem_optim.tools.op_count import OpCounter
from tests.helpers.reference import step_side_by_side


def test_full_rank_group_equals_torch_adamw_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=gen), torch.randn(32, generator=gen)
    ours = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    ref = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    groups = lambda ps: [{"params": [ps[0]], "lr": 3e-3, "weight_decay": 0.1}, {"params": [ps[1]]}]  # noqa: E731
    opt = GaLoreAdamW(groups(ours), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05)
    torch_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05)
    step_side_by_side(ours, ref, opt, torch_opt, 15, gen)
    for a, c in zip(ours, ref):
        assert torch.equal(a, c)
        assert torch.equal(opt.state[a]["exp_avg_sq"], torch_opt.state[c]["exp_avg_sq"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_rank_params_move_by_lr_on_a_first_step_of_gradients_beyond_float32_squares(dtype):
    """Entries of 1e30 would make torch's V infinite and their update zero for good: clamped to
    2^63 they give Adam's first step, lr x sign(g), like any gradient."""
    params = [torch.nn.Parameter(torch.zeros(8, 4, dtype=dtype)), torch.nn.Parameter(torch.zeros(4, dtype=dtype))]
    opt = GaLoreAdamW(params, lr=0.5, weight_decay=0.0)
    signs = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).sign() for i, p in enumerate(params)]
    for p, s in zip(params, signs):
        p.grad = (s * 1e30).to(dtype)
    opt.step()
    for p, s in zip(params, signs):
        torch.testing.assert_close(p.detach(), (-0.5 * s).to(dtype))
        assert torch.isfinite(opt.state[p]["exp_avg_sq"]).all()


def test_float16_params_keep_float32_moments_through_a_state_dict_roundtrip():
    p = torch.nn.Parameter(torch.randn(32, 16).half())
    opt = GaLoreAdamW([{"params": [p], "rank": 4}])
    p.grad = torch.randn_like(p)
    opt.step()
    fresh = GaLoreAdamW([{"params": [p], "rank": 4}])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["exp_avg"].dtype == torch.float32 and fresh.state[p]["proj_right"].dtype == torch.float16


def _llama_like_full_rank(dtype: torch.dtype) -> list[torch.Tensor]:
    """The full-rank parameters of a LLaMA-like model: embedding, norms, head."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(96, 16), (16,), (16,), (16,), (96, 16)]
    return [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_full_rank_params_step_together_bit_for_bit_as_torch_adamw_foreach(dtype):
    values = _llama_like_full_rank(dtype)
    ours, ref, layerwise = ([torch.nn.Parameter(v.clone()) for v in values] for _ in range(3))
    hparams = dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    opt, by_param = GaLoreAdamW(ours, **hparams), GaLoreAdamW(layerwise, **hparams)
    torch_opt = torch.optim.AdamW(ref, foreach=True, **hparams)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        for a, c, d in zip(ours, ref, layerwise):
            a.grad = torch.randn(a.shape, generator=gen).to(dtype)
            c.grad, d.grad = a.grad.clone(), a.grad.clone()
        with OpCounter() as counter:
            opt.step()
        torch_opt.step()
        for d in layerwise:
            by_param.step_param(d)
        assert counter.by_op["_foreach_lerp_"] == 1  # the five parameters in one call
    for a, c, d in zip(ours, ref, layerwise):
        assert torch.equal(a, c) and torch.equal(d, c)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], torch_opt.state[c][key])
            assert torch.equal(by_param.state[d][key], torch_opt.state[c][key])
    assert opt.state[ours[0]]["step"].device.type == "cpu" and set(opt.state[ours[0]]) == {
        "step",
        "exp_avg",
        "exp_avg_sq",
    }


def test_full_rank_params_of_several_groups_resume_bit_for_bit_through_a_state_dict():
    values = _llama_like_full_rank(torch.float32)
    ours, resumed = ([torch.nn.Parameter(v.clone()) for v in values] for _ in range(2))
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.0}, {"params": ps[2:], "lr": 1e-2}]  # noqa: E731
    opt = GaLoreAdamW(groups(ours), lr=3e-2)
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(v.shape, generator=gen) for v in values] for _ in range(4)]
    for step, gs in enumerate(grads):
        if step == 2:  # resume the second copy from the first's state after two steps
            for a, b in zip(ours, resumed):
                b.data.copy_(a.data)
            other = GaLoreAdamW(groups(resumed), lr=3e-2)
            other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as read back from a file
        for p, g in zip(ours, gs):
            p.grad = g.clone()
        opt.step()
        if step >= 2:
            for p, g in zip(resumed, gs):
                p.grad = g.clone()
            other.step()
    for a, b in zip(ours, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_memory_model_workspace_of_full_rank_params_stepped_together_is_the_measured_peak(dtype):
    params = [torch.nn.Parameter(v) for v in _llama_like_full_rank(dtype)]
    opt = GaLoreAdamW(params, weight_decay=0.1)
    for _ in range(2):  # the second step: the moments exist, the step allocates its temporaries only
        for p in params:
            p.grad = torch.randn_like(p)
        with OpCounter() as counter:
            opt.step()
    predicted = optimizer_memory("galore_adamw", opt)["workspace"]
    assert counter.peak_bytes == predicted == sum(p.numel() * p.element_size() for p in params)


def test_device_ops_of_a_full_rank_group_step_do_not_grow_with_its_parameter_count():
    """The group's parameters are stepped by multi-tensor ops: only the host's step counters
    (CPU tensors, no kernel) are handled one by one."""
    counts = []
    for n in (3, 9):
        with torch.device("meta"):
            params = [torch.nn.Parameter(torch.empty(64, 16)) for _ in range(n)]
        opt = GaLoreAdamW(params, weight_decay=0.1)
        for _ in range(2):
            for p in params:
                p.grad = torch.empty_like(p)
            with OpCounter() as counter:
                opt.step()
        counts.append((counter.ops - counter.host_ops, counter.host_ops))
    assert counts[0][0] == counts[1][0] and counts[1][1] > counts[0][1]
