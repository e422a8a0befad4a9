"""Where a dense projection basis lives in the optimizer state: as is, or group-wise quantized.

A param group's ``proj_bits`` chooses the storage of every dense basis (SVD, randomized SVD):

* ``None`` or 16 (default): the basis under ``key`` in the gradient's dtype.
* 8 or 4 (Q-GaLore, Zhang et al. 2024): asymmetric min-max quantization of the flattened
  basis in groups of ``proj_group_size`` (256) values,

      scale = (max - min) / (2^b - 1),   zero = -min / scale,   q = round(x / scale + zero),

  stored as ``key_codes`` (uint8; INT4 codes packed two per byte), ``key_scale`` and
  ``key_zero`` (float32 per group) and ``key_meta`` (int64: rows, cols, bits, group size), and
  dequantized on use, x' = scale (q - zero). The zero point is a float
  (:mod:`lowmem_optim.quant.groupwise`), so a group whose values share one sign keeps its range.

INT4 stores an m x r basis in m r / 2 bytes plus 8 bytes per group: about 3.9x less than bf16.
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem_optim.quant.groupwise import DEFAULT_GROUP_SIZE, dequantize_groupwise, pack_int4, quantize_groupwise, unpack_int4

PROJ_BITS = (None, 4, 8, 16)
_QUANTIZED_SUFFIXES = ("_codes", "_scale", "_zero", "_meta")


def quantized_float_keys(*keys: str) -> frozenset[str]:
    """The float32 state entries of quantized bases under ``keys`` (kept float32 on load)."""
    return frozenset(f"{key}{suffix}" for key in keys for suffix in ("_scale", "_zero"))


def validate_storage(group: dict[str, Any]) -> None:
    bits = group.get("proj_bits")
    if bits not in PROJ_BITS:
        raise ValueError(f"Invalid proj_bits: {bits!r} (allowed: None or 16 = gradient dtype, 8, 4)")
    size = group.get("proj_group_size", DEFAULT_GROUP_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"Invalid proj_group_size: {size!r} (allowed: an int >= 1)")


def store_basis(state: dict[str, Any], key: str, basis: torch.Tensor, group: dict[str, Any]) -> None:
    """Put ``basis`` (2-D) in ``state`` under ``key`` as the group's ``proj_bits`` asks."""
    bits = group.get("proj_bits")
    for stale in (key, *(key + s for s in _QUANTIZED_SUFFIXES)):
        state.pop(stale, None)
    if bits in (None, 16):
        state[key] = basis
        return
    size = group.get("proj_group_size", DEFAULT_GROUP_SIZE)
    codes, scale, zero = quantize_groupwise(basis, bits, size)
    state[key + "_codes"] = pack_int4(codes) if bits == 4 else codes
    state[key + "_scale"], state[key + "_zero"] = scale, zero
    state[key + "_meta"] = torch.tensor([*basis.shape, bits, size], dtype=torch.int64)


def load_basis(state: dict[str, Any], key: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The basis stored under ``key`` (dequantized if quantized) in ``dtype``; None if absent."""
    if key in state:
        return state[key].to(dtype)
    if key + "_codes" not in state:
        return None
    rows, cols, bits, size = (int(v) for v in state[key + "_meta"])
    codes = state[key + "_codes"]
    if bits == 4:
        codes = unpack_int4(codes, rows * cols)
    return dequantize_groupwise(codes, state[key + "_scale"], state[key + "_zero"], (rows, cols), dtype, size)
