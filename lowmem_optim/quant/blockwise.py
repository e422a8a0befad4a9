"""Blockwise 8-bit quantization with bitsandbytes' dynamic map (Dettmers et al., 2022).

A tensor is flattened and cut into blocks of ``blocksize`` values; each block stores its
absolute maximum (float32) and one uint8 code per value, the index of the nearest entry of a
256-entry non-linear "dynamic" map scaled by that maximum:

    code_i = argmin_k |x_i / absmax_b - map_k|,    x_i' = map[code_i] * absmax_b

bitsandbytes' kernels do the work (CPU and CUDA); what this module adds is a state-as-data
interface: callers keep ``codes`` and ``absmax`` as plain tensors, the map itself is derived
(never stored) and cached per device.

The same scheme with 16 levels is 4-bit NormalFloat (NF4; Dettmers et al., 2023, QLoRA,
arXiv 2305.14314): the levels are quantiles of a standard normal, 8 for the positive half and 7
for the negative one, with an exact zero, scaled to [-1, 1], so values that are roughly normal
within a block are coded with about equal probability mass per level.
:func:`quantize_nf4` computes it in torch (one code per value, 0-15; packing is the caller's).
"""

from __future__ import annotations

import functools

import torch

BLOCKSIZE = 256


def _real_constant(make):
    """``make``, cached, and run outside any FakeTensorMode: a map made while a step is traced on
    valueless tensors (:mod:`lowmem_optim.tools.memory_trace`) must still hold values afterwards."""

    @functools.cache
    @functools.wraps(make)
    def made(*args):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return make(*args)

    return made


@_real_constant
def _dynamic_map(signed: bool, device: str) -> torch.Tensor:
    import bitsandbytes.functional as bnbf  # optional dependency: imported where it is used

    return bnbf.create_dynamic_map(signed=signed).to(device)


def dynamic_map(signed: bool, device: torch.device | str) -> torch.Tensor:
    """The 256-entry dynamic map: signed for first moments, unsigned for second moments."""
    return _dynamic_map(signed, str(torch.device(device)))


def quantize_blockwise(x: torch.Tensor, signed: bool, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to (codes uint8 of x's shape, absmax float32 of one value per block)."""
    import bitsandbytes.functional as bnbf  # optional dependency: imported where it is used

    code = dynamic_map(signed, x.device)
    codes, quant_state = bnbf.quantize_blockwise(x.detach().float().contiguous(), code=code, blocksize=blocksize)
    return codes, quant_state.absmax.float()


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    signed: bool,
    dtype: torch.dtype = torch.float32,
    blocksize: int = BLOCKSIZE,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: a float tensor of ``codes``' shape."""
    import bitsandbytes.functional as bnbf  # optional dependency: imported where it is used

    code = dynamic_map(signed, codes.device)
    out = bnbf.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=blocksize)
    return out.to(dtype)


#: the normal quantile at which NF4's outermost levels sit (QLoRA's offset: (1 - 1/(2 x 15) + 1 - 1/(2 x 16)) / 2)
NF4_OFFSET = 0.9677083


@_real_constant
def _normal_float_map(device: str) -> torch.Tensor:
    quantiles = torch.special.ndtri
    positive = quantiles(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -quantiles(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.abs().max()).float().to(device)


def normal_float_map(device: torch.device | str) -> torch.Tensor:
    """NF4's 16 levels in [-1, 1], ascending, float32 (level 7 is 0)."""
    return _normal_float_map(str(torch.device(device)))


def quantize_nf4(x: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 0-15, one per value of ``x`` flattened; absmax float32 per block): code_i is
    the nearest NF4 level to x_i / absmax_b. The last block is padded with zeros."""
    flat = x.detach().float().reshape(-1)
    pad = -flat.numel() % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    levels = normal_float_map(x.device)
    # an all-zero block has absmax 0: dividing by 1 instead codes it as level 7 (0) exactly
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    return codes.view(-1)[: flat.numel()], absmax


def dequantize_nf4(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    blocksize: int = BLOCKSIZE,
) -> torch.Tensor:
    """Inverse of :func:`quantize_nf4`: level[code] * absmax of its block, in ``shape``."""
    flat = codes.reshape(-1).long()
    values = normal_float_map(codes.device)[flat] * absmax.repeat_interleave(blocksize)[: flat.numel()]
    return values.view(shape).to(dtype)
