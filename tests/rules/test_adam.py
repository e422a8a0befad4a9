"""The Adam rule (:mod:`lowmem_optim.rules.adam`): torch.optim.AdamW's equations bit for bit on the
full gradient, and float32 moments for float16 parameters."""

import torch

from lowmem_optim import GaLoreAdamW
from tests.reference import step_side_by_side


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


def test_float16_params_keep_float32_moments_through_a_state_dict_roundtrip():
    p = torch.nn.Parameter(torch.randn(32, 16).half())
    opt = GaLoreAdamW([{"params": [p], "rank": 4}])
    p.grad = torch.randn_like(p)
    opt.step()
    fresh = GaLoreAdamW([{"params": [p], "rank": 4}])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["exp_avg"].dtype == torch.float32 and fresh.state[p]["proj_right"].dtype == torch.float16
