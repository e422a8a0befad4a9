import io

import pytest
import torch

from lowmem_optim import GaLoreAdamW
from lowmem_optim.projection.base import leading_similarity
from lowmem_optim.projection.storage import load_basis, store_basis


def _basis(m: int, r: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, r, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_basis_error_is_at_most_half_a_step_of_its_group(bits):
    basis = _basis(300, 7)  # 2100 values: 8 full groups and a partial one
    state = {}
    store_basis(state, "proj_left", basis, {"proj_bits": bits, "proj_group_size": 256})
    restored = load_basis(state, "proj_left", torch.float32)
    steps = state["proj_left_scale"].repeat_interleave(256)[: basis.numel()].view(basis.shape)
    assert restored.shape == basis.shape
    assert bool(((restored - basis).abs() <= 0.5 * steps + 1e-7).all())
    codes_bytes = (basis.numel() + 1) // 2 if bits == 4 else basis.numel()
    assert state["proj_left_codes"].dtype == torch.uint8 and state["proj_left_codes"].numel() == codes_bytes


def test_int4_basis_takes_under_a_third_of_bf16_bytes():
    basis = _basis(1024, 32).bfloat16()
    state = {}
    store_basis(state, "proj_right", basis, {"proj_bits": 4})
    stored = sum(v.numel() * v.element_size() for v in state.values())
    assert stored < basis.numel() * 2 / 3


def test_single_sign_basis_groups_keep_their_range():
    basis = torch.linspace(0.5, 1.0, 256).view(64, 4)  # every group positive (Q-GaLore's zero clamp collapses it)
    state = {}
    store_basis(state, "proj_left", basis, {"proj_bits": 4, "proj_group_size": 64})
    restored = load_basis(state, "proj_left", torch.float32)
    assert len(restored.unique()) == 4 * 16
    assert float((restored - basis).abs().max()) <= 0.5 * 0.5 / 15 + 1e-6


def test_plain_storage_keeps_the_basis_in_its_dtype_and_switching_drops_stale_keys():
    basis = _basis(32, 4).bfloat16()
    state = {}
    store_basis(state, "proj_left", basis, {"proj_bits": 4})
    store_basis(state, "proj_left", basis, {"proj_bits": 16})
    assert set(state) == {"proj_left"} and state["proj_left"].dtype == torch.bfloat16
    assert torch.equal(load_basis(state, "proj_left", torch.bfloat16), basis)
    assert load_basis(state, "proj_right", torch.float32) is None


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_projection_is_close_to_the_float_one(bits):
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(96, 8, generator=gen) @ torch.randn(8, 40, generator=gen)
    results = {}
    for proj_bits in (None, bits):
        w = torch.nn.Parameter(torch.zeros(96, 40))
        opt = GaLoreAdamW([{"params": [w], "rank": 8, "proj_bits": proj_bits}], lr=1e-3)
        w.grad = g
        opt.step()
        results[proj_bits] = opt.state[w]["exp_avg"] / 0.1  # exp_avg = (1 - beta1) R after one step
    rel = (results[bits] - results[None]).norm() / results[None].norm()
    assert float(rel) < (0.1 if bits == 4 else 0.01)


def test_quantized_basis_keeps_its_dtypes_through_a_weights_only_round_trip_with_bf16_params():
    w = torch.nn.Parameter(torch.randn(64, 32, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "proj_bits": 4}], lr=1e-3)
    w.grad = torch.randn(64, 32, dtype=torch.bfloat16)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = GaLoreAdamW([{"params": [w], "rank": 4, "proj_bits": 4}], lr=1e-3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    state = fresh.state[w]
    assert state["proj_right_codes"].dtype == torch.uint8 and state["proj_right_meta"].dtype == torch.int64
    assert state["proj_right_scale"].dtype == torch.float32 and state["proj_right_zero"].dtype == torch.float32
    for key in ("proj_right_codes", "proj_right_scale", "proj_right_zero", "proj_right_meta"):
        assert torch.equal(state[key], opt.state[w][key])


@pytest.mark.parametrize("key, value", [("proj_bits", 3), ("proj_bits", 32), ("proj_group_size", 0)])
def test_bad_storage_hyperparameters_are_rejected_by_name(key, value):
    w = torch.nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(ValueError, match=key):
        GaLoreAdamW([{"params": [w], "rank": 2, key: value}])


def test_build_optimizer_routes_proj_bits_to_the_low_rank_group():
    from lowmem_optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(300, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = build_optimizer("galore_adamw", model, target_modules=["0"], rank=8, proj_bits=4, lr=1e-3)
    model(torch.randn(5, 300)).sum().backward()
    opt.step()
    state = opt.state[model[0].weight]
    assert "proj_left" not in state and "proj_right" not in state
    assert state["proj_left_codes"].numel() == 64 * 8 // 2  # 64 x 300: the left side (64 x 8), two codes a byte


@pytest.mark.parametrize("vector_dim", [1, 0])
def test_leading_similarity_is_the_cosine_of_the_leading_vectors_whatever_their_norms(vector_dim):
    """A stored basis is not exactly orthonormal (bf16, INT8/INT4 codes): the |cos| divides by both
    norms. Leading vectors (2, 0, 0) and -(3, 4, 0): |cos| = 6 / (2 * 5)."""
    old = torch.tensor([[2.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # leading vector: column 0
    new = torch.tensor([[-3.0, 0.0], [-4.0, 0.0], [0.0, 7.0]])
    if vector_dim == 0:  # a right basis: leading vector is row 0
        old, new = old.T, new.T
    assert leading_similarity(old, new, vector_dim) == pytest.approx(0.6)
    assert leading_similarity(None, new, vector_dim) is None
