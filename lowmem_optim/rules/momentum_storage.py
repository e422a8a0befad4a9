"""How a normalized rule keeps its momentum M between steps, as the group's ``momentum_dtype`` asks.

* ``"auto"`` (the default): ``momentum_buffer`` in the gradient's dtype, advanced in place
  (torch.optim.Muon's buffer). In bfloat16 each M = beta M + (1 - beta) G is rounded to
  nearest, which loses every change smaller than half a unit in M's last place (2^-9 of |M|):
  with beta = 0.95, a gradient within 4% of M moves nothing, and M stalls.
* ``"float32"``: ``momentum_float32``, advanced in place, float32 whatever the weight's dtype.
* ``"bfloat16"``: ``momentum_bfloat16``, 2 bytes per value.
* ``"8bit"``: ``momentum_codes`` (one uint8 per value) and ``momentum_absmax`` (one float32 per
  block of 256 values), 1 + 4/256 bytes per value: bitsandbytes' signed dynamic map, the blocks
  of the 8-bit Adam rule's first moment.
* ``"4bit"``: ``momentum_nf4_codes`` (two 4-bit codes per byte along each row of M viewed as
  (rows, -1), a row of odd length padded by one zero) and ``momentum_nf4_absmax`` (one float32
  per block of :data:`NF4_BLOCKSIZE` = 64 values of the padded rows): 1/2 + 4/64 = 0.5625 bytes
  per value (a row of odd length: half a byte more per row). The 16 levels are NormalFloat's
  (:func:`lowmem_optim.quant.blockwise.normal_float_map`): they span [-1, 1] (so the block's
  absmax is its scale and no value is clipped), hold an exact zero (a zero momentum, and the
  padding, stay exactly zero), and are denser near zero, where most of a momentum's values lie.
  Rounding Gaussian and Student-t(3) momenta with each set of 16 levels
  (``scripts/bench/four_bit_levels.py``), NF4's relative error was the smallest (0.130 and 0.170
  at blocks of 64; evenly spaced levels 0.142 and 0.236, bitsandbytes' 4-bit signed dynamic map
  0.192 and 0.228); blocks of 256 raised t(3)'s to 0.240 for 0.047 bytes less per value, hence
  blocks of 64 (QLoRA's NF4 block size).

``"bfloat16"``, ``"8bit"`` and ``"4bit"`` dequantize M to float32 at each step, advance it
there, and store it with stochastic rounding (:mod:`lowmem_optim.quant.stochastic`): the stored
value is one of its two neighbours in the format, the upper with probability equal to the
distance from the lower, so E[stored M] = the float32 M and small changes survive in
expectation; the rounding errors of successive steps are independent, and the momentum's decay
beta shrinks each one, so their sum stays of the order of one rounding step. The draws are a
counter-based function of the rule's seed (:meth:`lowmem_optim.parts.Rule.update`) and of the
value's index in the whole tensor (4 bits: in its padded rows): the same on every rank, in every
hook order and after a resume.

A momentum stored in one form and read with another ``momentum_dtype`` (a run resumed with a
different setting) is converted at that step. When an index-based projector (DCT) moves the
momentum to new positions (:func:`carry`), 8- and 4-bit codes are dequantized, moved and
re-quantized to nearest: one rounding per refresh, not per step.
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
from lowmem_optim.quant.groupwise import pack_int4, round_keys, unpack_int4
from lowmem_optim.quant.stochastic import (
    BFLOAT16_ROUNDING_BYTES,
    CHUNK,
    ROUNDING_BYTES,
    quantize_blockwise_stochastic,
    quantize_nf4_stochastic,
    round_bfloat16,
)
from lowmem_optim.rules.base import reindex_along
from lowmem_optim.sharding import RowShard, StateLayout

#: the values of ``momentum_dtype``
MOMENTUM_DTYPES = ("auto", "float32", "bfloat16", "8bit", "4bit")
#: values per float32 absmax of the 4-bit form
NF4_BLOCKSIZE = 64
#: the state keys of each form (the first holds the values)
KEYS = {
    "auto": ("momentum_buffer",),
    "float32": ("momentum_float32",),
    "bfloat16": ("momentum_bfloat16",),
    "8bit": ("momentum_codes", "momentum_absmax"),
    "4bit": ("momentum_nf4_codes", "momentum_nf4_absmax"),
}
#: keys whose dtype is the form's, whatever the parameter's (``auto``'s follows the parameter)
FIXED_DTYPE_KEYS = frozenset({"momentum_float32", "momentum_bfloat16", "momentum_absmax", "momentum_nf4_absmax"})
#: on a row-sharded tensor every form has its rows; an absmax summarizes 256 of this rank's 8-bit
#: codes, or 64 values of its padded rows (32 bytes of 4-bit codes)
SHARDED_LAYOUT = StateLayout(
    rows=frozenset(
        {"momentum_buffer", "momentum_float32", "momentum_bfloat16", "momentum_codes", "momentum_nf4_codes"}
    ),
    blocks=(
        ("momentum_absmax", "momentum_codes", BLOCKSIZE),
        ("momentum_nf4_absmax", "momentum_nf4_codes", NF4_BLOCKSIZE // 2),
    ),
)


def rounds(kind: str) -> bool:
    """Whether ``kind`` stores M with stochastic rounding (from a float32 copy) rather than in place."""
    return kind in ("bfloat16", "8bit", "4bit")


def _padded_rows(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, columns, padded columns) of the 4-bit form's layout: M as (rows, columns), a row of
    odd length padded by one value."""
    columns = math.prod(shape[1:])
    return shape[0], columns, columns + columns % 2


def momentum_bytes(shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> int:
    """Bytes of the stored momentum of ``shape`` whose gradient has ``dtype``."""
    numel = math.prod(shape)
    if kind == "8bit":
        return numel + 4 * math.ceil(numel / BLOCKSIZE)
    if kind == "4bit":
        rows, _, columns = _padded_rows(shape)
        padded = rows * columns
        return padded // 2 + 4 * math.ceil(padded / NF4_BLOCKSIZE)
    return numel * {"auto": dtype.itemsize, "float32": 4, "bfloat16": 2}[kind]


def rounding_workspace_bytes(shape: tuple[int, ...], kind: str) -> int:
    """Transient bytes of a rounded form's step besides the direction D: the float32 M (the
    gradient's float32 copy that advanced it is freed by then), the 4-bit form's padded copy of M
    (rows of odd length), the new float32 absmax of the 8-bit and 4-bit forms (one per block,
    beside the stored one until it is replaced) and the rounding's per-pass temporaries (written
    into the stored tensors: no new result)."""
    numel = math.prod(shape)
    per_value = BFLOAT16_ROUNDING_BYTES if kind == "bfloat16" else ROUNDING_BYTES
    padded = shape[0] * _padded_rows(shape)[2] if kind == "4bit" else numel
    padded_copy = 4 * padded if padded != numel else 0
    block = {"8bit": BLOCKSIZE, "4bit": NF4_BLOCKSIZE}.get(kind)
    absmax = 4 * math.ceil(padded / block) if block else 0
    return 4 * numel + padded_copy + absmax + per_value * min(padded, CHUNK)


def compute_dtype(g: torch.Tensor) -> torch.dtype:
    """The dtype a rounded form's M is advanced in: float32, or the gradient's when wider."""
    return torch.promote_types(g.dtype, torch.float32)


def stored_kind(state: dict[str, Any]) -> str | None:
    """The form the state holds its momentum in (None before the first step)."""
    return next((kind for kind, keys in KEYS.items() if keys[0] in state), None)


def _value(state: dict[str, Any], kind: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The stored M as a new tensor of ``dtype``; the 4-bit form's in ``shape`` (without one: its
    padded rows, which :func:`store` takes back unchanged)."""
    if kind == "8bit":
        return dequantize_blockwise(state["momentum_codes"], state["momentum_absmax"], signed=True, dtype=dtype)
    if kind == "4bit":
        packed = state["momentum_nf4_codes"]
        codes = unpack_int4(packed.reshape(-1), 2 * packed.numel())
        padded = (packed.shape[0], 2 * packed.shape[1])
        values = dequantize_nf4(codes, state["momentum_nf4_absmax"], padded, dtype, NF4_BLOCKSIZE)
        return values if shape is None else values[:, : math.prod(shape[1:])].reshape(shape)
    return state[KEYS[kind][0]].to(dtype, copy=True)


def load(state: dict[str, Any], kind: str, g: torch.Tensor) -> torch.Tensor:
    """M to advance with ``g``: for ``"auto"`` and ``"float32"`` the stored buffer itself (zeros
    at first), for the rounded forms a float copy (:func:`compute_dtype`) that :func:`store` writes
    back. A momentum stored in another form is converted."""
    dtype = {"auto": g.dtype, "float32": torch.float32}.get(kind, compute_dtype(g))
    old = stored_kind(state)
    if old is None:
        m = torch.zeros_like(g, dtype=dtype, memory_format=torch.preserve_format)
    elif old == kind:
        return state[KEYS[kind][0]] if not rounds(kind) else _value(state, kind, dtype, tuple(g.shape))
    else:
        m = _value(state, old, dtype, tuple(g.shape))
        for key in KEYS[old]:
            del state[key]
    if not rounds(kind):
        state[KEYS[kind][0]] = m
    return m


def store(state: dict[str, Any], m: torch.Tensor, kind: str, seed: int, shard: RowShard | None = None) -> None:
    """Write the advanced float M of a rounded form back, stochastically rounded with the draws of
    ``seed``; with ``shard`` (M is this rank's rows), value i draws as in the whole tensor."""
    offset = 0 if shard is None or m.numel() == 0 else shard.start * (m.numel() // m.shape[0])
    keys = round_keys(seed)
    if kind == "bfloat16":
        if "momentum_bfloat16" not in state:
            state["momentum_bfloat16"] = torch.empty(m.shape, dtype=torch.bfloat16, device=m.device)
        round_bfloat16(m, keys, offset, out=state["momentum_bfloat16"])
        return
    if kind == "4bit":
        rows, columns, padded = _padded_rows(tuple(m.shape))
        by_row = m.reshape(rows, columns)
        if columns != padded:
            by_row = torch.nn.functional.pad(by_row, (0, 1))
        if "momentum_nf4_codes" not in state:
            state["momentum_nf4_codes"] = torch.empty((rows, padded // 2), dtype=torch.uint8, device=m.device)
            blocks = math.ceil(rows * padded / NF4_BLOCKSIZE)
            state["momentum_nf4_absmax"] = torch.empty(blocks, dtype=torch.float32, device=m.device)
        out = (state["momentum_nf4_codes"], state["momentum_nf4_absmax"])
        offset = 0 if shard is None else shard.start * padded
        quantize_nf4_stochastic(by_row, keys, out, offset, NF4_BLOCKSIZE)
        return
    if "momentum_codes" not in state:
        state["momentum_codes"] = torch.empty(m.shape, dtype=torch.uint8, device=m.device)
        state["momentum_absmax"] = torch.empty(math.ceil(m.numel() / BLOCKSIZE), dtype=torch.float32, device=m.device)
    quantize_blockwise_stochastic(m, keys, (state["momentum_codes"], state["momentum_absmax"]), offset)


def carry(state: dict[str, Any], kept: torch.Tensor, dim: int, shard: RowShard | None = None) -> None:
    """Move the stored momentum to the new positions ``kept`` gives along ``dim`` (new ones: zero)."""
    kind = stored_kind(state)
    if kind is None:
        return
    if kind == "8bit":
        moved = reindex_along(_value(state, kind, torch.float32), kept, dim, shard)
        state["momentum_codes"], state["momentum_absmax"] = quantize_blockwise(moved, signed=True)
    elif kind == "4bit":  # the padded rows: no kept index points at the padding, which stays zero
        moved = reindex_along(_value(state, kind, torch.float32), kept, dim, shard)
        codes, state["momentum_nf4_absmax"] = quantize_nf4(moved, NF4_BLOCKSIZE)
        state["momentum_nf4_codes"] = pack_int4(codes).view(moved.shape[0], -1)
    else:
        state[KEYS[kind][0]] = reindex_along(state[KEYS[kind][0]], kept, dim, shard)
