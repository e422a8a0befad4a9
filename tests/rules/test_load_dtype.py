"""Dtype on load, per rule: a float32 state_dict loaded into lower-precision parameters casts the
state like torch.optim does, except the keys the group's own parts declare fixed."""

import pytest
import torch
from torch import nn

import lowmem_optim
from lowmem_optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit


def _saved_and_loaded(make, dtype: torch.dtype, rank: int | None = None):
    """(the state of a float32 run, the state after loading it into ``dtype`` parameters)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 8))
    group = {"params": [w], **({"rank": rank} if rank else {})}
    opt = make([group])
    for _ in range(2):
        w.grad = torch.randn(16, 8)
        opt.step()
    low = nn.Parameter(w.detach().to(dtype))
    fresh = make([{**group, "params": [low]}])
    fresh.load_state_dict(opt.state_dict())
    return opt.state[w], fresh.state[low]


@pytest.mark.parametrize("rank", [None, 2])
def test_adam_moments_take_the_bfloat16_parameter_dtype_like_torch_adamw(rank):
    saved, loaded = _saved_and_loaded(GaLoreAdamW, torch.bfloat16, rank)
    assert loaded["exp_avg"].dtype == loaded["exp_avg_sq"].dtype == torch.bfloat16
    torch.testing.assert_close(loaded["exp_avg"].float(), saved["exp_avg"], rtol=1e-2, atol=1e-6)
    _, torch_loaded = _saved_and_loaded(torch.optim.AdamW, torch.bfloat16)
    assert torch_loaded["exp_avg"].dtype == torch.bfloat16
    if rank:  # the projection follows the parameter too
        assert loaded["proj_right"].dtype == torch.bfloat16


def test_adam_moments_of_float16_parameters_stay_float32():
    _, loaded = _saved_and_loaded(GaLoreAdamW, torch.float16)
    assert loaded["exp_avg"].dtype == loaded["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("min_8bit_size", [0, 4096])
def test_adam8bit_codes_stay_uint8_and_scales_and_small_moments_float32(min_8bit_size):
    saved, loaded = _saved_and_loaded(lambda g: GaLoreAdamW8bit(g, min_8bit_size=min_8bit_size), torch.bfloat16)
    if min_8bit_size:
        assert loaded["exp_avg"].dtype == loaded["exp_avg_sq"].dtype == torch.float32
        return
    assert loaded["exp_avg_codes"].dtype == torch.uint8 and torch.equal(loaded["exp_avg_codes"], saved["exp_avg_codes"])
    assert loaded["exp_avg_absmax"].dtype == loaded["exp_avg_sq_absmax"].dtype == torch.float32
    assert torch.equal(loaded["exp_avg_sq_absmax"], saved["exp_avg_sq_absmax"])


def test_adafactor_statistics_stay_float32():
    _, loaded = _saved_and_loaded(lambda g: GaLoreAdafactor(g, beta1=0.9), torch.bfloat16, rank=2)
    for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"):
        assert loaded[key].dtype == torch.float32, key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_normalized_momentum_buffer_follows_the_parameter_dtype(dtype):
    _, loaded = _saved_and_loaded(lambda g: lowmem_optim.AuON(g), dtype)
    assert loaded["momentum_buffer"].dtype == dtype


def test_quantized_projection_and_adaptive_queue_keep_their_dtypes():
    make = lambda g: GaLoreAdamW(g, proj_bits=4, refresh="adaptive")  # noqa: E731
    _, loaded = _saved_and_loaded(make, torch.bfloat16, rank=2)
    assert loaded["proj_right_codes"].dtype == torch.uint8 and loaded["proj_right_scale"].dtype == torch.float32
    assert loaded["sim_queue"].dtype == torch.float64
