"""The 8-bit Adam rule (:mod:`lowmem_optim.rules.adam8bit`): the chunked pass over a large tensor
equals one pass, codes and scales included."""

from __future__ import annotations

import torch
from torch import nn

from lowmem_optim import QGaLoreAdamW8bit


def test_8bit_rule_in_chunks_equals_one_pass(monkeypatch):
    from lowmem_optim.rules import adam8bit

    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(40, 33, generator=gen)  # 1320 values: 5 full blocks and a partial one
    grads = [torch.randn(40, 33, generator=gen) for _ in range(3)]

    def full_rank_adam8bit():
        p = nn.Parameter(w0.clone())
        opt = QGaLoreAdamW8bit([p], lr=1e-2, min_8bit_size=0)  # no rank: 8-bit Adam on the whole matrix
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt.state[p]

    one_pass, state = full_rank_adam8bit()
    monkeypatch.setattr(adam8bit, "_CHUNK", 512)  # three chunks, the last partial
    chunked, chunked_state = full_rank_adam8bit()
    assert state["exp_avg_codes"].shape == (40, 33)
    assert torch.equal(chunked, one_pass)
    for key in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
        assert torch.equal(chunked_state[key], state[key]), key
