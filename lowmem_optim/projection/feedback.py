"""Error feedback for projected updates (Seide et al., 2014; Modoranu et al., 2025, arXiv 2505.17967).

The part of the gradient a projection discards is kept and added to the next gradient before
the subspace is chosen and the gradient projected:

    A_t = G_t + E_{t-1};    R_t = project(A_t);    E_t = A_t - back_project(R_t)

so a direction left out at one step is not lost but carried until it is selected. E has the
weight matrix's shape; it is stored as the group's ``error_feedback`` asks: ``"float32"``
(``ef``, 4 bytes per weight; float64 weights keep it in float64), ``"8bit"`` (``ef_codes``, uint8,
and ``ef_absmax``, one float32 per block of 256 values: 1 + 4/256 bytes per weight; bitsandbytes'
signed dynamic map, as the 8-bit Adam rule stores its first moment) or ``"4bit"`` (``ef_codes``,
two INT4 codes per byte along each row, a row of odd length padded by one code, and ``ef_scale`` /
``ef_zero``, float32 min-max per group of 256 values: 1/2 + 8/256 bytes per weight;
:mod:`lowmem_optim.quant.groupwise`, the authors' 4-bit buckets) or ``"nf4"`` (``ef_codes``
packed as for ``"4bit"``, and ``ef_nf4_absmax``, one float32 per block of 256 values: 1/2 + 4/256
bytes per weight; the 16 NormalFloat levels of :func:`lowmem_optim.quant.blockwise.quantize_nf4`,
denser near zero than the 16 evenly spaced min-max levels, where most of E's values lie). A
quantized buffer loses its rounding error at each step (E_t is written from A_t afresh), so that
error does not accumulate.

On an FSDP2-sharded weight E is row-local (A's rows, and back_project(R)'s rows, are this
rank's: :mod:`lowmem_optim.sharding`), so each rank keeps its rows of the buffer: ``ef`` and
``ef_codes`` have the rows of the weight and are ``Shard(0)`` DTensors; the 8-bit and NF4 absmax
and the 4-bit scale and zero are cut on each rank's rows (:data:`SHARDED_LAYOUT`). Where every rank's
rows fill whole 256-value blocks the blocks are the unsharded buffer's and the result is the
same; otherwise a block straddling two ranks is quantized as two, and the buffer differs from
the unsharded one within its quantization error.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem_optim.quant.blockwise import (
    BLOCKSIZE,
    dequantize_blockwise,
    dequantize_nf4,
    quantize_blockwise,
    quantize_nf4,
)
from lowmem_optim.quant.groupwise import dequantize_groupwise, pack_int4, quantize_groupwise, unpack_int4
from lowmem_optim.sharding import StateLayout

#: the values of the group key ``error_feedback`` (None: off)
ERROR_FEEDBACK = (None, "float32", "8bit", "4bit", "nf4")
#: state keys whose dtype is fixed (never cast to the parameter's dtype on load)
FEEDBACK_KEYS = frozenset({"ef", "ef_absmax", "ef_scale", "ef_zero", "ef_nf4_absmax"})
#: the buffer's entries on a row-sharded weight: ``ef`` and ``ef_codes`` have its rows; absmax,
#: scale and zero summarize blocks of 256 values (of ``ef_codes``: 256 8-bit codes, 128 packed bytes)
SHARDED_LAYOUT = StateLayout(
    rows=frozenset({"ef", "ef_codes"}),
    blocks=(
        ("ef_absmax", "ef_codes", BLOCKSIZE),
        ("ef_scale", "ef_codes", BLOCKSIZE // 2),
        ("ef_zero", "ef_codes", BLOCKSIZE // 2),
        ("ef_nf4_absmax", "ef_codes", BLOCKSIZE // 2),
    ),
)


def error_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """E's working dtype: float32, or the gradient's when wider (float64)."""
    return torch.promote_types(grad_dtype, torch.float32)


def load_error(state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
    """E_{t-1} in :func:`error_dtype` (zeros before the first step)."""
    dtype = error_dtype(grad.dtype)
    if "ef" in state:
        return state["ef"].to(dtype)
    if "ef_absmax" in state:
        return dequantize_blockwise(state["ef_codes"], state["ef_absmax"], signed=True, dtype=dtype)
    groups = -(-grad.numel() // BLOCKSIZE)  # a sharded entry may end in one padding block
    if "ef_scale" in state:
        packed = state["ef_codes"]
        if packed.dim() == 1:  # packed over the flattened buffer, as checkpoints before the per-row packing hold it
            codes = unpack_int4(packed, grad.numel()).view(grad.shape)
        else:
            codes = _unpack_rows(packed, grad.shape[1])
        return dequantize_groupwise(codes, state["ef_scale"][:groups], state["ef_zero"][:groups], grad.shape, dtype)
    if "ef_nf4_absmax" in state:
        codes = _unpack_rows(state["ef_codes"], grad.shape[1])
        return dequantize_nf4(codes, state["ef_nf4_absmax"][:groups], grad.shape, dtype)
    return torch.zeros(grad.shape, dtype=dtype, device=grad.device)


def store_error(state: dict[str, Any], error: torch.Tensor, kind: str) -> None:
    """Keep E_t as ``kind`` ("float32", "8bit", "4bit" or "nf4") asks."""
    if kind == "float32":
        state["ef"] = error.to(error_dtype(error.dtype))
    elif kind == "8bit":
        state["ef_codes"], state["ef_absmax"] = quantize_blockwise(error, signed=True)
    elif kind == "4bit":
        codes, state["ef_scale"], state["ef_zero"] = quantize_groupwise(error, bits=4, group_size=BLOCKSIZE)
        state["ef_codes"] = _pack_rows(codes, error.shape[0])
    else:
        codes, state["ef_nf4_absmax"] = quantize_nf4(error)
        state["ef_codes"] = _pack_rows(codes, error.shape[0])


def _pack_rows(codes: torch.Tensor, rows: int) -> torch.Tensor:
    """4-bit codes of a matrix with ``rows`` rows, two per byte along each row (an odd row padded)."""
    by_row = codes.view(rows, -1)
    if by_row.shape[1] % 2:
        by_row = torch.cat([by_row, by_row.new_zeros(rows, 1)], dim=1)
    return pack_int4(by_row).view(rows, -1)


def _unpack_rows(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of :func:`_pack_rows`: the (rows, columns) codes."""
    return unpack_int4(packed.reshape(-1), 2 * packed.numel()).view(packed.shape[0], -1)[:, :columns]


def feedback_bytes(kind: str | None, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of the buffer of a weight of matrix ``shape`` and ``dtype`` under ``error_feedback=kind``."""
    if kind is None:
        return 0
    numel = shape[0] * shape[1]
    if kind == "float32":
        return numel * torch.empty((), dtype=error_dtype(dtype)).element_size()
    if kind == "8bit":
        return numel + 4 * math.ceil(numel / BLOCKSIZE)
    per_block = 8 if kind == "4bit" else 4  # float32 scale and zero, or absmax
    return shape[0] * math.ceil(shape[1] / 2) + per_block * math.ceil(numel / BLOCKSIZE)


def feedback_workspace_bytes(kind: str | None, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """The most transient bytes :func:`store_error` allocates beside E_t (in :func:`error_dtype`)
    for a weight of matrix ``shape`` and ``dtype``, the previous buffer still held (as measured
    by following every storage, :class:`lowmem_optim.tools.op_count.OpCounter`)."""
    if kind in (None, "float32"):
        return 0  # E_t itself becomes the buffer, the previous one freed as it is replaced
    numel = shape[0] * shape[1]
    blocks = math.ceil(numel / BLOCKSIZE)
    if kind == "8bit":
        return numel + 4 * blocks  # bitsandbytes' uint8 codes and float32 absmax
    if kind == "4bit":
        # the float32 scaled and shifted values, and per group its float32 min, max, scale and zero
        return 8 * numel + 16 * blocks
    # NF4, per value of E_t padded to whole blocks: its float32 copy, the scaled values (float32),
    # bucketize's int64 level indices and their uint8 codes; and the new float32 absmax per block
    return 17 * blocks * BLOCKSIZE + 4 * blocks
