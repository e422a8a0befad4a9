"""Numbers and bits: blockwise 8-bit moment codes, group-wise INT8/INT4 storage, stochastic rounding."""

from lowmem_optim.quant.blockwise import dequantize_blockwise, quantize_blockwise
from lowmem_optim.quant.groupwise import dequantize_groupwise, pack_int4, quantize_groupwise, unpack_int4

__all__ = [
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_groupwise",
    "dequantize_groupwise",
    "pack_int4",
    "unpack_int4",
]
