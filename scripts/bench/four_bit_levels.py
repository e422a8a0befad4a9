"""Which 16 levels and which block size for a momentum stored in 4-bit codes with stochastic
rounding (``momentum_dtype="4bit"``, :mod:`lowmem_optim.rules.momentum_storage`).

Protocol: two synthetic momenta of 256 x 1024 values whose rows have log-normal scales
(exp(N(0, 1))), one with Gaussian values and one with Student-t(3) values (heavy tails, as
momenta with outlier entries). Each is rounded once, stochastically, to each set of 16 signed
levels in [-1, 1] (NF4; 16 evenly spaced levels; bitsandbytes' 4-bit signed dynamic map: its
15 distinct non-zero levels and zero) with one absmax per block of 32, 64, 128 or 256 values,
and the table gives the relative RMS error ||stored - M|| / ||M|| and the bytes per value
(1/2 + 4 / block). The rounding is unbiased for every set; its error is what the momentum's
decay must average away, so smaller is better.

    OMP_NUM_THREADS=1 python -m scripts.bench.four_bit_levels
"""

from __future__ import annotations

import torch

from lowmem_optim.quant.blockwise import normal_float_map
from lowmem_optim.quant.groupwise import round_keys
from lowmem_optim.quant.stochastic import round_blocks_to_levels

BLOCKS = (32, 64, 128, 256)


def dynamic_map_4bit() -> torch.Tensor:
    import bitsandbytes.functional as bnbf  # optional dependency: imported where it is used

    return bnbf.create_dynamic_map(signed=True, max_exponent_bits=2, total_bits=4).float().unique()


def relative_error(x: torch.Tensor, levels: torch.Tensor, block: int) -> float:
    codes = torch.empty(x.numel(), dtype=torch.int64)
    scales = torch.empty(x.numel() // block)

    def write(start: int, stop: int, chosen: torch.Tensor) -> None:
        codes[start:stop] = chosen

    round_blocks_to_levels(x.reshape(-1), levels, block, round_keys(1), scales, 0, write)
    stored = (levels[codes] * scales.repeat_interleave(block)).view_as(x)
    return float((stored - x).norm() / x.norm())


def main() -> None:
    torch.manual_seed(0)  # the Student-t sampler draws from the global generator
    gen = torch.Generator().manual_seed(0)
    scale = torch.randn(256, 1, generator=gen).exp()
    momenta = {
        "Gaussian": torch.randn(256, 1024, generator=gen) * scale,
        "Student-t(3)": torch.distributions.StudentT(3.0).sample((256, 1024)) * scale,
    }
    levels = {"NF4": normal_float_map("cpu"), "even": torch.linspace(-1, 1, 16), "dynamic 4-bit": dynamic_map_4bit()}
    print("| momentum | levels | " + " | ".join(f"block {b} ({0.5 + 4 / b:.4f} B)" for b in BLOCKS) + " |")
    print("|---|---|" + "---|" * len(BLOCKS))
    for name, x in momenta.items():
        for level_name, level in levels.items():
            errors = " | ".join(f"{relative_error(x, level, b):.3f}" for b in BLOCKS)
            print(f"| {name} | {level_name} | {errors} |")


if __name__ == "__main__":
    main()
