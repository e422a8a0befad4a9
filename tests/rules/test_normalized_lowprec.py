"""The normalized rules' momentum stored in bfloat16, in 8-bit blockwise codes and in 4-bit NF4
codes (``momentum_dtype``): unbiased where rounding to nearest stalls, each step a float64 reference
from the dequantized momentum, ``"float32"`` equal to ``"auto"`` bit for bit, draws from the
group's seed, independent of the order parameters are stepped in, conversion between forms, and the bytes the memory
model counts. Resume, bfloat16 loads, layer-wise steps and bad values: tests/test_conformance.py;
FSDP2: tests/test_sharding.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lowmem_optim
from lowmem_optim.parts import defaults
from lowmem_optim.quant.blockwise import (
    dequantize_blockwise,
    dequantize_nf4,
    dynamic_map,
    normal_float_map,
    quantize_blockwise,
    quantize_nf4,
)
from lowmem_optim.rules import momentum_storage
from lowmem_optim.rules.normalized import AuONRule
from lowmem_optim.tools.memory_optimizer import optimizer_memory
from lowmem_optim.tools.op_count import OpCounter
from tests.helpers.reference import ns_ref

BETA = 0.95
STEPS = 20
#: |mean relative bias| a stored momentum may show (sampling noise: about 0.002 for bfloat16 and
#: 0.006 for 8 bits); rounding to nearest shows -0.29 (bfloat16) and -1 (8 bits: a stall)
BIAS_TOLERANCE = 0.03
#: the same for 4 bits (:func:`_bias_of_4bit_momentum`: sampling noise about 0.007 over 5 seeds
#: of the draws); rounding to nearest shows -1 (a stall)
BIAS_TOLERANCE_4BIT = 0.05
NF4_BLOCK = momentum_storage.NF4_BLOCKSIZE


def gaussians(*shape: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(count)]


def _drifting_momentum(rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, M0): a gradient of ``rows`` blocks of 256 values in [2, 4), each block's first value 4
    (it fixes the 8-bit block scale), and a momentum 10% below it (the first value: equal), so
    each step moves M by under 0.5% of its value: less than half a rounding step of any format."""
    g = 2 * torch.rand(rows, 256, generator=torch.Generator().manual_seed(0)) + 2
    g[:, 0] = 4.0
    m0 = g / 1.1
    m0[:, 0] = 4.0
    return g, m0


def _relative_bias(m: torch.Tensor, m0: torch.Tensor, g: torch.Tensor) -> float:
    """Mean over the moving values of (M - exact M) / (exact M - M0), exact M the float64 average
    M_t = G + (M0 - G) beta^t from the same stored start."""
    exact = g.double() + (m0 - g.double()) * BETA**STEPS
    return float(((m.double() - exact) / (exact - m0))[:, 1:].mean())


def _bias_through_the_rule(kind: str, dtype: torch.dtype) -> float:
    g, m0 = _drifting_momentum()
    rule = AuONRule()
    group = {**defaults(rule), "momentum": BETA, "momentum_dtype": kind}
    state: dict = {}
    if momentum_storage.rounds(kind):
        momentum_storage.store(state, m0, kind, seed=1000)
    else:
        state["momentum_buffer"] = m0.to(dtype)
    start = _stored(state, g.shape)
    for step in range(STEPS):
        rule.update(g.to(dtype), state, group, g, seed=step)
    return _relative_bias(_stored(state, g.shape), start, g)


def _nearest_nf4(m: torch.Tensor) -> torch.Tensor:
    return dequantize_nf4(*quantize_nf4(m, NF4_BLOCK), m.shape, blocksize=NF4_BLOCK).double()


def _bias_of_4bit_momentum(stochastic: bool) -> float:
    """The mean relative bias (as :func:`_relative_bias`) of 4-bit M after 20 steps from M0, the
    NF4 codes of :func:`_drifting_momentum`'s momentum (256 x 256 values: 1024 blocks of 64),
    towards G = 1.1 M0, except at each block's largest value (G = M0: it fixes the block's
    scale): each step moves a value by 0.5% of itself, under a tenth of the gap between the
    NF4 levels it lies between (G is set from the stored M0, so no exact move is near zero)."""
    _, m0 = _drifting_momentum(rows=256)
    state: dict = {}
    momentum_storage.store(state, m0, "4bit", seed=1000)
    start = _stored(state, m0.shape)
    block_max = start.view(-1, NF4_BLOCK).abs().amax(1, keepdim=True).expand(-1, NF4_BLOCK).reshape(start.shape)
    moving = start.abs() < block_max
    g = torch.where(moving, 1.1 * start, start).float()
    if stochastic:
        rule = AuONRule()
        group = {**defaults(rule), "momentum": BETA, "momentum_dtype": "4bit"}
        for step in range(STEPS):
            rule.update(g, state, group, g, seed=step)
        m = _stored(state, g.shape)
    else:  # the same average with NF4 codes rounded to nearest
        m = _nearest_nf4(start)
        for _ in range(STEPS):
            m = _nearest_nf4(m.lerp(g.double(), 1 - BETA))
    exact = g.double() + (start - g.double()) * BETA**STEPS
    return float(((m - exact) / (exact - start))[moving].mean())


@pytest.mark.parametrize("kind", ["bfloat16", "8bit", "4bit"])
def test_stochastically_rounded_momentum_follows_its_exact_average_where_rounding_to_nearest_stalls(kind):
    if kind == "4bit":
        assert abs(_bias_of_4bit_momentum(stochastic=True)) < BIAS_TOLERANCE_4BIT
        assert _bias_of_4bit_momentum(stochastic=False) < -5 * BIAS_TOLERANCE_4BIT
        return
    assert abs(_bias_through_the_rule(kind, torch.float32)) < BIAS_TOLERANCE
    # the check fails for rounding to nearest: the "auto" buffer of bfloat16 gradients, and the
    # 8-bit Adam rule's nearest codes applied to the same average
    if kind == "bfloat16":
        nearest = _bias_through_the_rule("auto", torch.bfloat16)
    else:
        g, m0 = _drifting_momentum()
        m = dequantize_blockwise(*quantize_blockwise(m0, signed=True), signed=True)
        start = m.double()
        for _ in range(STEPS):
            m = dequantize_blockwise(*quantize_blockwise(m.lerp(g, 1 - BETA), signed=True), signed=True)
        nearest = _relative_bias(m, start, g)
    assert nearest < -5 * BIAS_TOLERANCE


def _stored(state: dict, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    kind = momentum_storage.stored_kind(state)
    return momentum_storage._value(state, kind, torch.float64, None if shape is None else tuple(shape))


def _neighbours(m: torch.Tensor, kind: str, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The two values of the format around each value of the float64 ``m`` (the 8-bit scale as
    stored: it is computed from M before rounding)."""
    if kind == "bfloat16":
        nearest = m.to(torch.bfloat16).double()
        step = 2.0 ** (torch.floor(torch.log2(m.abs())) - 7)  # bfloat16's spacing at |m|: 8 bits
        return torch.where(nearest > m, nearest - step, nearest), torch.where(nearest < m, nearest + step, nearest)
    if kind == "4bit":  # m's rows have an even length: no padding
        code = normal_float_map("cpu").double()
        scale = state["momentum_nf4_absmax"].double().repeat_interleave(NF4_BLOCK).view(m.shape)
    else:
        code = dynamic_map(True, "cpu").double()
        scale = state["momentum_absmax"].double().repeat_interleave(256)[: m.numel()].view(m.shape)
    hi = torch.searchsorted(code, (m / scale).contiguous()).clamp(1, code.numel() - 1)
    return code[hi - 1] * scale, code[hi] * scale


@pytest.mark.parametrize("kind", ["bfloat16", "8bit", "4bit"])
@pytest.mark.parametrize("name", ["auon", "hybrid_auon", "muon"])
def test_a_step_is_the_float64_reference_from_the_dequantized_momentum(name, kind):
    """W' = W (1 - lr wd) - lr s U(D), D = (1-b) G + b M, M = b M_prev + (1-b) G in float64 from the
    stored M_prev; the stored M' is one of the two values of the format around M."""
    w0, *grads = gaussians(24, 40, count=4)
    w = w0.clone().requires_grad_()
    kwargs = {"lr": 0.05, "weight_decay": 0.1, "momentum_dtype": kind}
    if name != "auon":
        kwargs["ns_dtype"] = "float32"
    opt = lowmem_optim.registry.get_optimizer_class(name)([w], **kwargs)
    for g in grads[:-1]:
        w.grad = g.clone()
        opt.step()
    before, m_prev, g = w.detach().double(), _stored(opt.state[w], w.shape), grads[-1].double()
    w.grad = grads[-1].clone()
    opt.step()

    m = BETA * m_prev + (1 - BETA) * g
    d = (1 - BETA) * g + BETA * m
    x = d / (d.norm() + 1e-7)
    if name == "auon":
        u = x / (torch.cosh(x).square().mean().sqrt() + 1e-8)
    elif name == "hybrid_auon":
        y = ns_ref(x, 1)
        u = y / (torch.cosh(y).square().mean().sqrt() + 1e-8)
    else:
        u = ns_ref(x, 5)
    want = before * (1 - 0.05 * 0.1) - 0.05 * math.sqrt(max(1.0, 24 / 40)) * u
    torch.testing.assert_close(w.detach().double(), want, rtol=1e-5, atol=1e-6)
    low, high = _neighbours(m, kind, opt.state[w])
    stored = _stored(opt.state[w], w.shape)
    assert bool(((stored >= low - 1e-6 * m.abs()) & (stored <= high + 1e-6 * m.abs())).all())


@pytest.mark.parametrize("cls", [lowmem_optim.AuON, lowmem_optim.Muon])
def test_float32_momentum_is_auto_bit_for_bit_on_float32_weights(cls):
    w0, *grads = gaussians(24, 16, count=4)
    results = []
    for kind in ("auto", "float32"):
        w = w0.clone().requires_grad_()
        opt = cls([w], lr=0.05, momentum_dtype=kind)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results.append((w.detach(), opt.state[w][momentum_storage.KEYS[kind][0]]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_float32_momentum_of_bfloat16_weights_is_float32():
    w = torch.nn.Parameter(torch.randn(16, 24, dtype=torch.bfloat16))
    opt = lowmem_optim.AuON([w], momentum_dtype="float32")
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["momentum_float32"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["bfloat16", "8bit", "4bit"])
def test_draws_do_not_depend_on_the_order_parameters_are_stepped_in(kind):
    """Each parameter's draws come from (seed, its index, step): stepping the parameters in
    reverse (layer-wise hooks fire from the last layer) gives the same weights and state."""
    grads = gaussians(4, 24, 32, count=3)
    runs = []
    for order in (1, -1):
        ws = [torch.nn.Parameter(v) for v in gaussians(4, 24, 32, count=1, seed=1)[0]]
        opt = lowmem_optim.AuON(ws, momentum_dtype=kind, seed=5)
        for g in grads:
            for w, gw in list(zip(ws, g))[::order]:
                w.grad = gw.clone()
                opt.step_param(w)
        runs.append((ws, opt))
    (ws_a, opt_a), (ws_b, opt_b) = runs
    for a, b in zip(ws_a, ws_b):
        assert torch.equal(a, b)
        for key, value in opt_a.state[a].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b.state[b][key])), key


@pytest.mark.parametrize("kind", ["bfloat16", "8bit", "4bit"])
def test_another_group_seed_draws_other_roundings(kind):
    grads = gaussians(24, 32, count=2)
    stored = []
    for seed in (5, 6):
        w = torch.nn.Parameter(gaussians(24, 32, count=1, seed=1)[0])
        opt = lowmem_optim.AuON([w], momentum_dtype=kind, seed=seed)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        stored.append(opt.state[w][momentum_storage.KEYS[kind][0]])
    assert not torch.equal(*stored)


#: (saved form, resumed form, largest |stored - exact| relative to max |exact|: half a bfloat16
#: step, float32's rounding, or NF4's widest gap (0.28 of a block's absmax))
CONVERSIONS = [("8bit", "bfloat16", 2.0**-7), ("4bit", "float32", 1e-6), ("8bit", "4bit", 0.28)]


@pytest.mark.parametrize("saved_kind, resumed_kind, tolerance", CONVERSIONS, ids=str)
def test_a_momentum_saved_in_one_form_is_converted_when_resumed_with_another(saved_kind, resumed_kind, tolerance):
    w0, *grads = gaussians(24, 15, count=4)  # rows of odd length: the 4-bit form pads them
    w = w0.clone().requires_grad_()
    opt = lowmem_optim.Muon([w], lr=0.02, momentum_dtype=saved_kind)
    for g in grads[:2]:
        w.grad = g.clone()
        opt.step()
    saved = _stored(opt.state[w], w.shape)
    resumed_w = w.detach().clone().requires_grad_()
    resumed = lowmem_optim.Muon([resumed_w], lr=0.02)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.param_groups[0]["momentum_dtype"] == saved_kind  # a rule key follows the state dict, as lr
    resumed.param_groups[0]["momentum_dtype"] = resumed_kind
    resumed_w.grad = grads[2].clone()
    resumed.step()
    state = resumed.state[resumed_w]
    assert momentum_storage.stored_kind(state) == resumed_kind
    assert not set(momentum_storage.KEYS[saved_kind]) & set(state)
    want = BETA * saved + (1 - BETA) * grads[2].double()
    assert (_stored(state, w.shape) - want).abs().max() <= tolerance * want.abs().max()


@pytest.mark.parametrize(
    "kind, per_value",
    [("auto", 4), ("float32", 4), ("bfloat16", 2), ("8bit", 1 + 4 / 256), ("4bit", 1 / 2 + 4 / 64)],
    ids=str,
)
def test_state_bytes_per_value_of_each_form_are_the_real_tensors(kind, per_value):
    w = torch.nn.Parameter(torch.randn(64, 128))
    opt = lowmem_optim.Muon([w], momentum_dtype=kind)
    w.grad = torch.randn_like(w)
    opt.step()
    keys = momentum_storage.KEYS[kind]
    assert sum(opt.state[w][key].numel() * opt.state[w][key].element_size() for key in keys) == per_value * w.numel()
    real = sum(v.numel() * v.element_size() for v in opt.state[w].values() if torch.is_tensor(v))
    assert optimizer_memory("muon", opt)["optimizer_states"] == real  # with the step counter


@pytest.mark.parametrize(
    "kind, shape", [("auto", (128, 96)), ("bfloat16", (128, 96)), ("8bit", (128, 96)), ("4bit", (127, 95))]
)
def test_memory_model_workspace_bounds_the_measured_peak_of_a_step(kind, shape):
    """The temporaries of a step (after the first: the stored momentum exists) are the workspace
    the memory model counts, up to its scalars and per-block scales (under 1%); 4 bits on rows
    of odd length, whose padded copy the model counts."""
    w = torch.nn.Parameter(torch.randn(*shape))
    opt = lowmem_optim.AuON([w], momentum_dtype=kind)
    for _ in range(2):
        w.grad = torch.randn_like(w)
        with OpCounter() as counter:
            opt.step()
    predicted = optimizer_memory("auon", opt)["workspace"]
    assert abs(counter.peak_bytes - predicted) <= 0.01 * predicted


def test_4bit_momentum_packs_rows_of_odd_length_and_keeps_the_padding_zero():
    """M of 7 x 13: 7 bytes of codes per row (13 codes and one zero), an absmax per 64 values of
    the padded 7 x 14 rows; the codes decode to M's neighbours and the padding to exactly 0."""
    w = torch.nn.Parameter(torch.randn(7, 13))
    opt = lowmem_optim.Muon([w], momentum_dtype="4bit", ns_dtype="float32")
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state[w]
    assert state["momentum_nf4_codes"].shape == (7, 7) and state["momentum_nf4_codes"].dtype == torch.uint8
    assert state["momentum_nf4_absmax"].shape == (math.ceil(7 * 14 / 64),)
    assert momentum_storage.momentum_bytes((7, 13), torch.float32, "4bit") == 7 * 7 + 4 * 2
    padded = _stored(state)
    assert padded.shape == (7, 14) and bool((padded[:, 13] == 0).all())
    m = (1 - BETA) * w.grad.double()  # the first step's M from zero
    code = normal_float_map("cpu").double()
    scale = state["momentum_nf4_absmax"].double().repeat_interleave(64)[: 7 * 14].view(7, 14)[:, :13]
    hi = torch.searchsorted(code, (m / scale).contiguous()).clamp(1, 15)
    stored = _stored(state, (7, 13))
    assert bool(((stored >= code[hi - 1] * scale - 1e-7) & (stored <= code[hi] * scale + 1e-7)).all())
