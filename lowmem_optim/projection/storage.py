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

import math
from typing import Any

import torch

from lowmem_optim.parts import HParam, Part, integer, one_of
from lowmem_optim.quant.groupwise import (
    DEFAULT_GROUP_SIZE,
    dequantize_groupwise,
    pack_int4,
    quantize_groupwise,
    unpack_int4,
)

_QUANTIZED_SUFFIXES = ("_codes", "_scale", "_zero", "_meta")


class BasisStorage(Part):
    """How a dense projector keeps its bases under ``keys`` in the state (module docstring)."""

    hparams = (
        HParam(
            "proj_bits",
            None,
            one_of(None, 4, 8, 16),
            "bits of the stored projection: None or 16 = the gradient's dtype, 8 or 4 = quantized (Q-GaLore)",
        ),
        HParam("proj_group_size", DEFAULT_GROUP_SIZE, integer(1), "values per quantization group of the projection"),
    )

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys

    def fixed_dtype_keys(self, param_dtype: torch.dtype) -> frozenset[str]:
        # the float32 scale and zero of quantized bases (codes and metadata are integers)
        return frozenset(f"{key}{suffix}" for key in self.keys for suffix in ("_scale", "_zero"))

    def host_keys(self) -> frozenset[str]:
        # rows, cols, bits and group size, read by every load_basis
        return frozenset(f"{key}_meta" for key in self.keys)

    def basis_bytes(self, numel: int, dtype: torch.dtype, group: dict[str, Any]) -> int:
        """Bytes of one stored basis of ``numel`` values computed in ``dtype``."""
        bits = group["proj_bits"]
        if bits in (None, 16):
            return numel * dtype.itemsize
        codes = math.ceil(numel / 2) if bits == 4 else numel
        return codes + 8 * math.ceil(numel / group["proj_group_size"]) + 32  # + float32 scale, zero; int64 meta


def store_basis(state: dict[str, Any], key: str, basis: torch.Tensor, group: dict[str, Any]) -> None:
    """Put ``basis`` (2-D) in ``state`` under ``key`` as the group's ``proj_bits`` asks."""
    bits = group["proj_bits"]
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
