import pytest
import torch

from lowmem_optim.quant.groupwise import (
    counter_uniform,
    dequantize_groupwise,
    pack_int4,
    quantize_groupwise,
    round_keys,
    unpack_int4,
)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("numel", [256 * 3, 1000])
def test_roundtrip_error_is_at_most_half_a_step(bits, numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    codes, scale, zero = quantize_groupwise(x, bits, 256)
    y = dequantize_groupwise(codes, scale, zero, x.shape, group_size=256)
    steps = scale.repeat_interleave(256)[:numel]
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert bool(((y - x).abs() <= 0.5 * steps + 1e-6).all())


def test_single_sign_groups_keep_their_range():
    x = torch.linspace(1.0, 2.0, 256)  # Q-GaLore's clamped zero point collapses this to [1, 1]
    codes, scale, zero = quantize_groupwise(x, 4, 256)
    y = dequantize_groupwise(codes, scale, zero, x.shape)
    assert len(codes.unique()) == 16
    assert abs(float(y.min()) - 1.0) < 1e-6 and abs(float(y.max()) - 2.0) < 1e-6
    assert float((y - x).abs().max()) <= 0.5 / 15 + 1e-6


def test_constant_group_decodes_exactly():
    x = torch.full((256,), -3.25)
    codes, scale, zero = quantize_groupwise(x, 8)
    assert torch.equal(dequantize_groupwise(codes, scale, zero, x.shape), x)


def test_stochastic_rounding_is_unbiased_for_sub_step_values():
    step = 1.0 / 255
    x = torch.cat([torch.tensor([0.0, 1.0]), torch.full((254,), 0.1 * step + 0.5)])  # 0.1 step above a grid point
    means = torch.stack(
        [
            dequantize_groupwise(*quantize_groupwise(x, 8, stochastic=True, seed=seed), x.shape)[2:]
            for seed in range(400)
        ]
    ).mean()
    deterministic = dequantize_groupwise(*quantize_groupwise(x, 8), x.shape)[2:].mean()
    assert abs(float(means) - float(x[2:].mean())) < 0.02 * step
    assert abs(float(deterministic) - float(x[2:].mean())) > 0.05 * step  # the sub-step part vanishes


@pytest.mark.parametrize("numel", [10, 11])
def test_int4_packing_roundtrips_two_codes_per_byte(numel):
    codes = torch.randint(0, 16, (numel,), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_int4(packed, numel), codes)


def test_bad_bits_name_the_parameter():
    with pytest.raises(ValueError, match="bits"):
        quantize_groupwise(torch.zeros(4), 3)


def test_two_dimensional_codes_with_a_padded_last_group_decode():
    x = torch.randn(7, 45, generator=torch.Generator().manual_seed(1))  # 315 values: last group padded
    codes, scale, zero = quantize_groupwise(x, 8, 256)
    y = dequantize_groupwise(codes.view(7, 45), scale, zero, x.shape)
    assert float((y - x).abs().max()) <= 0.5 * float(scale.max()) + 1e-6


def test_counter_uniform_is_uniform_and_a_function_of_seed_and_counter():
    counter = torch.arange(2**32 - 50_000, 2**32 + 50_000)  # crosses the 32-bit boundary of the counter
    u = counter_uniform(counter, round_keys(7))
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = u.numel() / 20
    assert float(((counts - expected) ** 2 / expected).sum()) < 45.3  # chi-square, 19 dof, p = 0.001
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01  # neighbours uncorrelated
    assert torch.equal(counter_uniform(counter[1234:5678], round_keys(7)), u[1234:5678])
    other = counter_uniform(counter, round_keys(8))
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.01  # seeds give other streams


def test_stochastic_rounding_of_a_slice_uses_the_whole_tensors_draws():
    x = torch.randn(4 * 256, generator=torch.Generator().manual_seed(2))
    whole = quantize_groupwise(x, 8, stochastic=True, seed=5)
    part = quantize_groupwise(x[512:], 8, stochastic=True, seed=5, offset=512)
    assert torch.equal(part[0], whole[0][512:]) and torch.equal(part[1], whole[1][2:])
    assert not torch.equal(quantize_groupwise(x, 8, stochastic=True, seed=6)[0], whole[0])
