"""Error feedback: the discarded part of each gradient is carried to the next step."""

import pytest
import torch

from lowmem_optim import DCTAdamW, GaLoreAdamW
from lowmem_optim.projection.dct import dct_basis
from lowmem_optim.projection.feedback import load_error, store_error
from lowmem_optim.quant.groupwise import pack_int4, quantize_groupwise

CPU = torch.device("cpu")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("keep", [True, False])
def test_dct_adamw_with_error_feedback_matches_a_float64_reference_of_its_equations(keep):
    lr, wd, eps, (b1, b2), rank, (m, n) = 0.05, 0.1, 1e-8, (0.9, 0.999), 3, (12, 9)
    w0 = _randn(m, n, seed=5)
    w = torch.nn.Parameter(w0.clone())
    opt = DCTAdamW(
        [{"params": [w], "rank": rank}],
        lr=lr,
        weight_decay=wd,
        eps=eps,
        betas=(b1, b2),
        dct_keep_moments=keep,
        error_feedback="float32",
    )
    q = dct_basis(n, torch.float64, CPU)
    ref, e = w0.clone(), torch.zeros(m, n, dtype=torch.float64)
    mom, v, index = torch.zeros(m, rank, dtype=torch.float64), torch.zeros(m, rank, dtype=torch.float64), None
    for t in range(1, 7):
        g = _randn(m, n, seed=10 + t)
        w.grad = g.clone()
        opt.step()
        a = g + e  # A_t = G_t + E_{t-1}: the selection and the projection see A
        s = a @ q
        new = torch.topk(s.abs().sum(0), rank).indices.sort().values
        if index is not None and keep:
            kept = [index.tolist().index(i) if i in index.tolist() else -1 for i in new.tolist()]
            mom = torch.stack([mom[:, k] if k >= 0 else torch.zeros(m, dtype=torch.float64) for k in kept], dim=1)
            v = torch.stack([v[:, k] if k >= 0 else torch.zeros(m, dtype=torch.float64) for k in kept], dim=1)
        index = new
        r = s[:, index]
        e = a - r @ q[:, index].T  # E_t: what the projection discarded
        mom, v = b1 * mom + (1 - b1) * r, b2 * v + (1 - b2) * r**2
        update = lr / (1 - b1**t) * mom / ((v / (1 - b2**t)).sqrt() + eps)
        ref = ref * (1 - lr * wd) - update @ q[:, index].T
        assert torch.allclose(w.detach(), ref, rtol=0, atol=1e-12)
        assert torch.allclose(opt.state[w]["ef"], e, rtol=0, atol=1e-12)


def test_error_feedback_composes_with_galore_the_buffer_is_the_part_outside_the_subspace():
    w = torch.nn.Parameter(torch.zeros(10, 6, dtype=torch.float64))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3, "error_feedback": "float32"}], lr=1e-2)
    e = torch.zeros(10, 6, dtype=torch.float64)
    for t in range(1, 5):
        g = _randn(10, 6, seed=t)
        w.grad = g.clone()
        opt.step()
        q = opt.state[w]["proj_right"].T  # V^T[:r] stored: q is 6 x 2, orthonormal columns
        e = (g + e) - (g + e) @ q @ q.T
        assert torch.allclose(opt.state[w]["ef"], e, atol=1e-12)


def _eight_bit_layout(state: dict) -> bool:
    return (
        state["ef_codes"].shape == (64, 48)
        and state["ef_absmax"].dtype == torch.float32
        and state["ef_absmax"].numel() == 64 * 48 // 256
    )


def _four_bit_layout(state: dict) -> bool:
    return state["ef_codes"].numel() == 64 * 48 // 2 and state["ef_scale"].numel() == state["ef_zero"].numel() == 12


def _nf4_layout(state: dict) -> bool:
    return state["ef_codes"].shape == (64, 24) and state["ef_nf4_absmax"].numel() == 12 and "ef_scale" not in state


def _within_half_the_widest_nf4_gap(blocks: torch.Tensor) -> torch.Tensor:
    return 0.152 * blocks.abs().amax(1)


def _within_one_percent_of_absmax(blocks: torch.Tensor) -> torch.Tensor:
    return 0.01 * blocks.abs().amax(1)


def _within_half_an_int4_step(blocks: torch.Tensor) -> torch.Tensor:
    return (blocks.amax(1) - blocks.amin(1)) / 30 * (1 + 1e-5)


@pytest.mark.parametrize(
    "kind, layout, tolerance",
    [
        # uint8 codes of the signed dynamic map, float32 absmax per 256 values (1 + 4/256 bytes per weight):
        # near the top of the map codes lie ~1/100 of absmax apart (measured max error: 0.7% of absmax)
        ("8bit", _eight_bit_layout, _within_one_percent_of_absmax),
        # INT4 min-max, two codes per byte, float32 scale and zero per 256 values (1/2 + 8/256 bytes):
        # round to nearest, within half a step (max - min) / 15 / 2
        ("4bit", _four_bit_layout, _within_half_an_int4_step),
        # NF4 codes packed as for 4bit, float32 absmax per 256 values (1/2 + 4/256 bytes): the widest
        # gap between NF4 levels is -0.6962 - (-1), so within 0.152 of absmax
        ("nf4", _nf4_layout, _within_half_the_widest_nf4_gap),
    ],
)
def test_quantized_buffer_holds_each_steps_discarded_part_within_its_quantization_error(kind, layout, tolerance):
    """Each step stores E_t = A_t - Q_I Q_I^T A_t, with A_t = G_t + the dequantized E_{t-1}."""
    w = torch.nn.Parameter(torch.zeros(64, 48))
    opt = DCTAdamW([{"params": [w], "rank": 8}], lr=1e-3, error_feedback=kind)
    previous = torch.zeros(64, 48)
    for t in range(4):
        g = _randn(64, 48, seed=t).float()
        w.grad = g.clone()
        opt.step()
        state = opt.state[w]
        assert state["ef_codes"].dtype == torch.uint8 and layout(state)
        q = dct_basis(48, torch.float32, CPU)[:, state["proj_index"]]
        a = g + previous
        exact = (a - a @ q @ q.T).reshape(-1, 256)
        stored = load_error(state, g)
        assert torch.all((stored.reshape(-1, 256) - exact).abs().amax(1) <= tolerance(exact))
        previous = stored


@pytest.mark.parametrize("value", ["yes", 8, True])
def test_bad_error_feedback_is_refused_by_name(value):
    w = torch.nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(ValueError, match="error_feedback"):
        DCTAdamW([{"params": [w], "rank": 2, "error_feedback": value}])


@pytest.mark.parametrize("shape", [(64, 48), (37, 21)])
def test_4bit_buffer_is_packed_per_row_and_reads_like_a_flat_packed_one(shape):
    """Per-row packing (a row of odd length padded by one code) keeps a sharded rank's rows whole
    bytes; a buffer packed over the flattened values, as saved before, reads back the same."""
    error = _randn(*shape, seed=3).float()
    state: dict = {}
    store_error(state, error, "4bit")
    codes, scale, zero = quantize_groupwise(error, bits=4)
    flat = {"ef_codes": pack_int4(codes), "ef_scale": scale, "ef_zero": zero}
    assert state["ef_codes"].shape == (shape[0], -(-shape[1] // 2))
    assert torch.equal(load_error(state, error), load_error(flat, error))
