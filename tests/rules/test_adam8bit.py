"""The 8-bit Adam rule (:mod:`lowmem_optim.rules.adam8bit`): the chunked pass over a large tensor
equals one pass, codes and scales included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem_optim import GaLoreAdamW8bit, QGaLoreAdamW8bit


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


def _full_rank_8bit(w0: torch.Tensor, grads: list[torch.Tensor], **hparams) -> tuple[torch.Tensor, dict]:
    p = nn.Parameter(w0.clone())
    opt = GaLoreAdamW8bit([p], lr=1e-2, weight_decay=0.1, min_8bit_size=0, **hparams)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]


def _codes_agree(a: torch.Tensor, b: torch.Tensor) -> None:
    """8-bit codes of two computations that differ in float32 rounding: a value that the rounding
    moves across the midpoint of two codes takes the neighbour code, nothing else."""
    diff = (a.int() - b.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


def test_bitsandbytes_fused_8bit_kernel_agrees_with_the_eager_step_on_cpu():
    """bitsandbytes' optimizer_update_8bit_blockwise (CPU kernel in the installed version) on this
    rule's state: the same codes, maps, blocks and absmax, so its step agrees with the eager one
    up to float32 rounding, for a weight (decay and update in place) and for a projected gradient
    (the update written into a zeroed buffer)."""
    from lowmem_optim.rules import adam8bit

    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(40, 33, generator=gen)
    grads = [torch.randn(40, 33, generator=gen) for _ in range(4)]
    # betas and eps other than the defaults: the eager step must read the group's, as the kernel does
    adam = {"betas": (0.8, 0.95), "eps": 1e-2}
    eager, eager_state = _full_rank_8bit(w0, grads, **adam)
    rule, group = adam8bit.Adam8bitRule(), {"lr": 1e-2, **adam, "weight_decay": 0.1}
    group["min_8bit_size"] = 0
    fused, state = w0.clone(), {"step": torch.tensor(0.0)}
    low_state, updates = {"step": torch.tensor(0.0)}, []
    for g in grads:
        state["step"] += 1
        rule._init(g, state, group)
        adam8bit.fused_adam8bit_(fused, g, state, group, group["lr"], group["weight_decay"])
        low_state["step"] += 1
        rule._init(g, low_state, group)
        update = torch.zeros_like(g)
        adam8bit.fused_adam8bit_(update, g, low_state, group, -group["lr"], 0.0)
        updates.append(update)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):
        _codes_agree(state[key], eager_state[key])
        _codes_agree(low_state[key], eager_state[key])
    torch.testing.assert_close(state["exp_avg_sq_absmax"], eager_state["exp_avg_sq_absmax"], rtol=1e-5, atol=0)
    # the update of a projected gradient: the same rule's eager update, step for step
    ref_state = {"step": torch.tensor(0.0)}
    for g, update in zip(grads, updates):
        ref_state["step"] += 1
        expected, _ = rule.update(g, ref_state, group, torch.empty(0))
        torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-7)


def test_off_cuda_the_eager_8bit_step_runs(monkeypatch):
    """The fused kernel is dispatched on CUDA only; CPU steps (full-rank and projected) run the
    eager reference."""
    import bitsandbytes.functional as bnbf

    from lowmem_optim.rules.adam8bit import fuses

    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel ran off CUDA")

    monkeypatch.setattr(bnbf, "optimizer_update_8bit_blockwise", refuse)
    gen = torch.Generator().manual_seed(2)
    w, b = nn.Parameter(torch.randn(64, 80, generator=gen)), nn.Parameter(torch.randn(64, 80, generator=gen))
    opt = GaLoreAdamW8bit([{"params": [w], "rank": 8}, {"params": [b]}], min_8bit_size=0)
    for _ in range(2):
        w.grad, b.grad = torch.randn(64, 80, generator=gen), torch.randn(64, 80, generator=gen)
        opt.step()
    assert "exp_avg_codes" in opt.state[w] and "exp_avg_codes" in opt.state[b]
    assert not fuses(b, b.grad, opt.state[b]) and not fuses(b.grad.bfloat16(), b.grad.bfloat16(), opt.state[b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_full_rank_8bit_step_has_no_float32_update_of_the_weights_size(monkeypatch, dtype):
    """The eager full-rank step applies each chunk's update to the weight as it comes: its
    temporaries are one chunk's (with the previous chunk's update and moment once there are
    several), whatever the weight's size, and the memory model predicts them to the byte."""
    from lowmem_optim.rules import adam8bit
    from lowmem_optim.tools.memory_optimizer import optimizer_memory
    from lowmem_optim.tools.op_count import OpCounter

    monkeypatch.setattr(adam8bit, "_CHUNK", 1024)
    peaks, predicted = [], []
    for numel in (1 << 10, 1 << 14, 1 << 16):
        p = nn.Parameter(torch.randn(numel // 64, 64).to(dtype))
        opt = GaLoreAdamW8bit([p], min_8bit_size=0)
        for _ in range(2):
            p.grad = torch.randn_like(p)
            with OpCounter() as counter:
                opt.step()
        peaks.append(counter.peak_bytes)
        predicted.append(optimizer_memory("galore_adamw8bit", opt)["workspace"])
    assert predicted == peaks
    assert peaks[0] < peaks[1] == peaks[2] < 4 * (1 << 14)  # chunks', not a float32 copy of the weight


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_cuda_8bit_step_agrees_with_the_eager_cpu_reference(dtype):
    """On CUDA bitsandbytes' fused kernel steps both the full-rank weight and the projected
    moments; the eager CPU step is the reference (agreement up to float32 rounding and the codes
    it moves)."""
    gen = torch.Generator().manual_seed(3)
    w0, b0 = torch.randn(256, 128, generator=gen), torch.randn(256, 128, generator=gen)
    grads = [(torch.randn(256, 128, generator=gen), torch.randn(256, 128, generator=gen)) for _ in range(3)]
    results = {}
    for device in ("cpu", "cuda"):
        w, b = (nn.Parameter(t.to(device, dtype)) for t in (w0, b0))
        opt = GaLoreAdamW8bit([{"params": [w], "rank": 16}, {"params": [b]}], lr=1e-2, min_8bit_size=0)
        for gw, gb in grads:
            w.grad, b.grad = gw.to(device, dtype), gb.to(device, dtype)
            opt.step()
        results[device] = (w.detach().cpu().float(), b.detach().cpu().float(), opt.state[b])
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for i in range(2):
        torch.testing.assert_close(results["cuda"][i], results["cpu"][i], rtol=0, atol=atol)
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):
        _codes_agree(results["cuda"][2][key].cpu(), results["cpu"][2][key])
