"""Numbers and bits: blockwise 8-bit codes for optimizer moments (and, later, INT4/INT8 storage)."""

from lowmem_optim.quant.blockwise import dequantize_blockwise, quantize_blockwise

__all__ = ["quantize_blockwise", "dequantize_blockwise"]
