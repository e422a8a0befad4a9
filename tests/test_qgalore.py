"""QGaLoreAdamW8bit: its rule against a float64 reference (INT4 projection, adaptive refresh,
Adam in the subspace), 8-bit moments within tolerance, resume, q-galore-torch's group keys, and
end to end with INT8 weights and layer-wise updates."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lowmem_optim import QGaLoreAdamW8bit, build_optimizer, layerwise, lowrank_param_groups
from lowmem_optim.quant.int8_linear import quantize_linear_layers
from tests.reference import adam_ref, svd_basis


def minmax_roundtrip(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max quantization (float zero point) and back, in float64, per flattened group."""
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), group):
        g = flat[start:start + group]
        lo, hi = g.min(), g.max()
        scale = (hi - lo) / (2**bits - 1) if hi > lo else torch.ones((), dtype=g.dtype)
        zero = -lo / scale
        out[start:start + group] = scale * (torch.clamp(torch.round(g / scale + zero), 0, 2**bits - 1) - zero)
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


def run(w0, grads, **kwargs):
    p = nn.Parameter(w0.clone())
    opt = QGaLoreAdamW8bit([{"params": [p], "rank": 6}], lr=1e-2, weight_decay=0.1, update_proj_gap=1,
                           scale=0.5, queue_size=2, cos_threshold=0.0, gamma_proj=2, max_gap=4, **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def problem(m=48, n=40, steps=9):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(m, n, generator=gen), [torch.randn(m, n, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(48, 40), (40, 48)])
def test_rule_matches_float64_reference_with_float32_moments(shape):
    w0, grads = problem(*shape)
    got, opt = run(w0, grads, min_8bit_size=10**9)  # moments below the 8-bit threshold stay fp32
    want, refreshes = qgalore_ref(w0, grads, rank=6, gap=1, scale=0.5, lr=1e-2, wd=0.1, queue_size=2, gamma=2,
                                  max_gap=4)
    assert refreshes == [1, 2, 3, 5, 7]  # gap 1, 1, 2, 2, 4: the adaptive schedule at work
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["refreshes"] == len(refreshes)
    assert any(k.endswith("_codes") for k in state) and not any(k in state for k in ("proj_left", "proj_right"))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_8bit_moments_stay_within_quantization_tolerance_of_the_reference():
    w0, grads = problem()
    got, opt = run(w0, grads, min_8bit_size=0)
    want, _ = qgalore_ref(w0, grads, rank=6, gap=1, scale=0.5, lr=1e-2, wd=0.1, queue_size=2, gamma=2, max_gap=4)
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg_codes"].dtype == torch.uint8
    moved = (want - w0.double()).norm()
    assert float((got.double() - want).norm() / moved) < 0.02  # 8-bit moments: about 1% per value


def test_resume_from_weights_only_state_dict_is_exact():
    w0, grads = problem()
    straight, _ = run(w0, grads, min_8bit_size=0)
    p = nn.Parameter(w0.clone())
    make = lambda params: QGaLoreAdamW8bit([{"params": params, "rank": 6}], lr=1e-2, weight_decay=0.1,  # noqa: E731
                                           update_proj_gap=1, scale=0.5, queue_size=2, cos_threshold=0.0,
                                           max_gap=4, min_8bit_size=0)
    opt = make([p])
    for g in grads[:4]:
        p.grad = g.clone()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    q = nn.Parameter(p.detach().clone())
    opt2 = make([q])
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for g in grads[4:]:
        q.grad = g.clone()
        opt2.step()
    assert torch.equal(q.detach(), straight)


def test_accepts_q_galore_torch_group_keys():
    p = nn.Parameter(torch.zeros(8, 8))
    opt = QGaLoreAdamW8bit([{"params": [p], "rank": 2, "quant": True, "quant_n_bit": 8, "quant_group_size": 64,
                             "cos_threshold": 0.5, "gamma_proj": 3, "queue_size": 4}])
    group = opt.param_groups[0]
    assert (group["proj_bits"], group["proj_group_size"], group["refresh"], group["rule"]) == (8, 64, "adaptive",
                                                                                               "adam8bit")
    off = QGaLoreAdamW8bit([{"params": [nn.Parameter(torch.zeros(8, 8))], "rank": 2, "quant": False}])
    assert off.param_groups[0]["proj_bits"] is None
    with pytest.raises(ValueError, match="quant_n_bit"):
        QGaLoreAdamW8bit([{"params": [p], "rank": 2, "quant_n_bit": 8, "proj_bits": 4}])


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 80), nn.ReLU(), nn.Linear(80, 32))
        self.lm_head = nn.Linear(32, 64, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.lm_head(h + self.mlp(h))


def train(use_layerwise: bool, steps: int = 6) -> tuple[nn.Module, float, float]:
    model = quantize_linear_layers(Tiny())
    opt = build_optimizer("q_galore_adamw8bit", model, rank=4, update_proj_gap=2, lr=2e-2, min_8bit_size=0)
    if use_layerwise:
        layerwise.attach(opt)
    tokens = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 64), tokens[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss.item())
        if not use_layerwise:
            opt.step()
            opt.zero_grad()
    return model, losses[0], losses[-1]


def test_int8_weights_with_layerwise_updates_train_and_equal_ordinary_stepping():
    lw, first, last = train(use_layerwise=True)
    ordinary, _, _ = train(use_layerwise=False)
    assert last < first - 0.1
    for a, b in zip(lw.modules(), ordinary.modules()):
        for (name, x), y in zip(a.named_buffers(recurse=False), b.buffers(recurse=False)):
            assert torch.equal(x, y), name
    for (name, x), y in zip(lw.named_parameters(), ordinary.parameters()):
        assert torch.equal(x, y), name
    assert len(lowrank_param_groups(lw, rank=4)[1]["params"]) == 2


def test_8bit_rule_in_chunks_equals_one_pass(monkeypatch):
    from lowmem_optim.rules import adam8bit

    w0, grads = problem(m=40, n=33, steps=3)  # 1320 values: 5 full blocks and a partial one

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
