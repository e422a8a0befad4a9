"""NF4 blockwise quantization (:mod:`lowmem_optim.quant.blockwise`): QLoRA's levels, nearest-level
codes against a float64 reference, exact zeros."""

import torch

from lowmem_optim.quant.blockwise import dequantize_nf4, normal_float_map, quantize_nf4

#: NF4's levels as published with QLoRA (Dettmers et al., 2023, appendix E), 4 decimals
QLORA_NF4 = (
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
)  # fmt: skip


def test_levels_are_qloras_normal_float_table():
    assert torch.allclose(normal_float_map("cpu").double(), torch.tensor(QLORA_NF4, dtype=torch.float64), atol=6e-5)


def test_each_value_decodes_to_the_nearest_level_times_its_blocks_absmax():
    x = torch.randn(3 * 256 + 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    codes, absmax = quantize_nf4(x.float())
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() and absmax.numel() == 4
    levels = torch.tensor(normal_float_map("cpu").tolist(), dtype=torch.float64)
    blocks = torch.cat([x, x.new_zeros(-x.numel() % 256)]).view(-1, 256)
    scale = blocks.abs().amax(1, keepdim=True)
    nearest = (blocks / scale)[..., None].sub(levels).abs().argmin(-1)
    expected = (levels[nearest] * scale).reshape(-1)[: x.numel()]
    decoded = dequantize_nf4(codes, absmax, tuple(x.shape), torch.float64)
    assert torch.allclose(decoded, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(absmax, scale.squeeze(1).float())  # each block's largest value is kept exactly


def test_zero_blocks_and_zero_values_decode_to_exact_zeros():
    x = torch.zeros(2, 256)
    x[1, 3] = -2.0
    codes, absmax = quantize_nf4(x)
    decoded = dequantize_nf4(codes, absmax, (2, 256))
    assert torch.equal(decoded, x)
