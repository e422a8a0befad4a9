"""Stochastic rounding to bfloat16 and to blockwise 8- and 4-bit codes, for sums kept in low precision.

A running sum S <- round(S + x) in a low-precision format loses, with round-to-nearest, every
increment smaller than half a step of S's magnitude, and the loss is systematic (the sum stalls).
Stochastic rounding rounds up with probability equal to the distance to the lower neighbour:

    round(y) = hi with probability (y - lo) / (hi - lo), lo otherwise,    so E[round(y)] = y

(Gupta et al., 2015), so a sum of k rounded additions is unbiased and its error grows like
sqrt(k) steps, not k. The draws come from the counter-based generator of
:mod:`lowmem_optim.quant.groupwise` (value i of a tensor gets a hash of (keys, i)): no generator
object, and the same keys give the same result on every device, rank and resume. Users: the
low-rank accumulation buffers (:mod:`lowmem_optim.layerwise`) and the normalized rules'
momentum, a running average (:mod:`lowmem_optim.rules.momentum_storage`).

* bfloat16: add 16 random bits below the float32 value's upper 16, then truncate.
* 8 bits: bitsandbytes' blockwise dynamic map (:mod:`lowmem_optim.quant.blockwise`: per block
  of 256 values a float32 scale, and per value an index into the 256-entry signed map);
  the value y = x / scale is rounded to one of its two neighbours in the map. Decoding is
  :func:`lowmem_optim.quant.blockwise.dequantize_blockwise`.
* 4 bits: the same with the 16 NormalFloat levels (:func:`lowmem_optim.quant.blockwise.
  normal_float_map`, in [-1, 1] with an exact zero) and a per-block absmax, two codes per byte.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowmem_optim.quant.blockwise import BLOCKSIZE, dynamic_map, normal_float_map
from lowmem_optim.quant.groupwise import counter_uniform, pack_int4

#: values rounded per pass: the draws and indices of a pass are temporaries
CHUNK = 1 << 20
#: temporaries per value of a pass at their peak (8 bits, the larger: padded float32 values, int64
#: counters, float32 draws, int32 neighbours, their map values and gap, the chosen codes), as
#: measured by following every storage (lowmem_optim.tools.op_count.OpCounter): 36 (bfloat16: 26)
ROUNDING_BYTES = 36
#: the same of :func:`round_bfloat16` writing into a given ``out`` (without one, 2 more: the result)
BFLOAT16_ROUNDING_BYTES = 24


def _uniform(start: int, stop: int, keys: tuple[int, int], device: torch.device) -> torch.Tensor:
    return counter_uniform(torch.arange(start, stop, dtype=torch.int64, device=device), keys)


def round_bfloat16(
    x: torch.Tensor, keys: tuple[int, int], offset: int = 0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` (float32) stochastically rounded to bfloat16 with the draws of ``keys`` (value i
    gets draw ``offset + i``: a block of rows of a larger tensor draws as in the whole), in
    passes of :data:`CHUNK` values; written into ``out`` (bfloat16, contiguous) when given."""
    bits = x.float().contiguous().view(-1).view(torch.int32)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    flat = out.view(-1)
    for start in range(0, bits.numel(), CHUNK):
        stop = min(start + CHUNK, bits.numel())
        noise = (_uniform(offset + start, offset + stop, keys, x.device) * 65536).to(torch.int32)
        # float32 -> bfloat16 keeps the upper 16 bits; adding noise to the lower 16 first carries
        # into them with probability (lower bits) / 2^16
        flat[start:stop] = (bits[start:stop] + noise).bitwise_and_(-65536).view(torch.float32)
    return out


def round_blocks_to_levels(
    flat: torch.Tensor,
    levels: torch.Tensor,
    blocksize: int,
    keys: tuple[int, int],
    scales: torch.Tensor,
    offset: int,
    write: Callable[[int, int, torch.Tensor], None],
) -> None:
    """The blockwise stochastic rounding both code widths share: per block of ``blocksize``
    values of the float32 ``flat`` a scale (written into ``scales``), and per value the index of
    one of its two neighbours among ``levels`` (ascending, in [-1, 1]), handed to ``write(start,
    stop, codes)`` pass by pass (int32 codes of values start to stop; value i draws ``offset + i``)."""
    numel = flat.numel()
    # the block's scale maps its largest magnitude to the levels' nearer end, so no value lies
    # outside the levels and none is clipped (which would bias)
    reach = torch.minimum(levels[0].abs(), levels[-1])
    for start in range(0, numel, CHUNK):  # CHUNK is a multiple of the block sizes: whole blocks per pass
        stop = min(start + CHUNK, numel)
        part = flat[start:stop]
        blocks = -(-part.numel() // blocksize)
        padded = torch.nn.functional.pad(part, (0, blocks * blocksize - part.numel())).view(blocks, blocksize)
        scale = padded.abs().amax(dim=1).div_(reach)
        scales[start // blocksize : start // blocksize + blocks] = scale
        y = padded.div_(scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).view(-1)[: part.numel()]
        hi = torch.searchsorted(levels, y, out_int32=True).clamp_(1, levels.numel() - 1)
        lo = hi - 1
        up = y.sub_(levels[lo]).div_(levels[hi] - levels[lo]).clamp_(0, 1)
        write(start, stop, torch.where(_uniform(offset + start, offset + stop, keys, flat.device) < up, hi, lo))


def quantize_blockwise_stochastic(
    x: torch.Tensor, keys: tuple[int, int], out: tuple[torch.Tensor, torch.Tensor], offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as signed blockwise 8-bit, written into ``out``: codes (uint8, x's shape) and a
    float32 scale per block of 256 (:func:`~lowmem_optim.quant.blockwise.dequantize_blockwise`
    takes it as its absmax), each value stochastically rounded to a neighbour in the dynamic
    map (value i gets draw ``offset + i``), in passes of :data:`CHUNK` values."""
    codes = out[0].view(-1)

    def write(start: int, stop: int, chosen: torch.Tensor) -> None:
        codes[start:stop] = chosen.to(torch.uint8)

    flat = x.detach().float().reshape(-1)
    round_blocks_to_levels(flat, dynamic_map(True, x.device), BLOCKSIZE, keys, out[1], offset, write)
    return out


def quantize_nf4_stochastic(
    x: torch.Tensor,
    keys: tuple[int, int],
    out: tuple[torch.Tensor, torch.Tensor],
    offset: int = 0,
    blocksize: int = BLOCKSIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (an even number of values) as NF4 codes packed two per byte, written into ``out``:
    codes (uint8, half as many as x's values, any shape; value 2k in byte k's low nibble, 2k + 1
    in its high one) and a float32 absmax per block of ``blocksize`` values; each value
    stochastically rounded to one of its two neighbouring NF4 levels (value i gets draw
    ``offset + i``), in passes of :data:`CHUNK` values. Decoding: :func:`~lowmem_optim.quant.
    groupwise.unpack_int4` then :func:`~lowmem_optim.quant.blockwise.dequantize_nf4`."""
    flat = x.detach().float().reshape(-1)
    if flat.numel() % 2:
        raise ValueError(f"quantize_nf4_stochastic packs pairs of values: got {flat.numel()} values, an odd count")
    packed = out[0].view(-1)

    def write(start: int, stop: int, chosen: torch.Tensor) -> None:
        packed[start // 2 : stop // 2] = pack_int4(chosen.to(torch.uint8))  # passes start at even values

    round_blocks_to_levels(flat, normal_float_map(x.device), blocksize, keys, out[1], offset, write)
    return out
