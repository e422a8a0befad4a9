"""Blockwise 8-bit quantization with bitsandbytes' dynamic map (Dettmers et al., 2022).

A tensor is flattened and cut into blocks of ``blocksize`` values; each block stores its
absolute maximum (float32) and one uint8 code per value, the index of the nearest entry of a
256-entry non-linear "dynamic" map scaled by that maximum:

    code_i = argmin_k |x_i / absmax_b - map_k|,    x_i' = map[code_i] * absmax_b

bitsandbytes' kernels do the work (CPU and CUDA); what this module adds is a state-as-data
interface: callers keep ``codes`` and ``absmax`` as plain tensors, the map itself is derived
(never stored) and cached per device.
"""

from __future__ import annotations

import functools

import torch

BLOCKSIZE = 256


@functools.cache
def _dynamic_map(signed: bool, device: str) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.create_dynamic_map(signed=signed).to(device)


def dynamic_map(signed: bool, device: torch.device | str) -> torch.Tensor:
    """The 256-entry dynamic map: signed for first moments, unsigned for second moments."""
    return _dynamic_map(signed, str(torch.device(device)))


def quantize_blockwise(x: torch.Tensor, signed: bool, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to (codes uint8 of x's shape, absmax float32 of one value per block)."""
    import bitsandbytes.functional as bnbf

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
    import bitsandbytes.functional as bnbf

    code = dynamic_map(signed, codes.device)
    out = bnbf.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=blocksize)
    return out.to(dtype)
