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

``"bfloat16"`` and ``"8bit"`` dequantize M to float32 at each step, advance it there, and store
it with stochastic rounding (:mod:`lowmem_optim.quant.stochastic`): the stored value is one of
its two neighbours in the format, the upper with probability equal to the distance from the
lower, so E[stored M] = the float32 M and small changes survive in expectation; the rounding
errors of successive steps are independent, and the momentum's decay beta shrinks each one, so
their sum stays of the order of one rounding step. The draws are a counter-based function of the
rule's seed (:meth:`lowmem_optim.parts.Rule.update`) and of the value's index in the whole
tensor: the same on every rank, in every hook order and after a resume.

A momentum stored in one form and read with another ``momentum_dtype`` (a run resumed with a
different setting) is converted at that step. When an index-based projector (DCT) moves the
momentum to new positions (:func:`carry`), 8-bit codes are dequantized, moved and re-quantized
to nearest: one rounding per refresh, not per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem_optim.quant.blockwise import BLOCKSIZE, dequantize_blockwise, quantize_blockwise
from lowmem_optim.quant.groupwise import round_keys
from lowmem_optim.quant.stochastic import (
    BFLOAT16_ROUNDING_BYTES,
    CHUNK,
    ROUNDING_BYTES,
    quantize_blockwise_stochastic,
    round_bfloat16,
)
from lowmem_optim.rules.base import reindex_along
from lowmem_optim.sharding import RowShard, StateLayout

#: the values of ``momentum_dtype``
MOMENTUM_DTYPES = ("auto", "float32", "bfloat16", "8bit")
#: the state keys of each form (the first holds the values)
KEYS = {
    "auto": ("momentum_buffer",),
    "float32": ("momentum_float32",),
    "bfloat16": ("momentum_bfloat16",),
    "8bit": ("momentum_codes", "momentum_absmax"),
}
#: keys whose dtype is the form's, whatever the parameter's (``auto``'s follows the parameter)
FIXED_DTYPE_KEYS = frozenset({"momentum_float32", "momentum_bfloat16", "momentum_absmax"})
#: on a row-sharded tensor every form has its rows; the absmax summarizes 256 of this rank's codes
SHARDED_LAYOUT = StateLayout(
    rows=frozenset({"momentum_buffer", "momentum_float32", "momentum_bfloat16", "momentum_codes"}),
    blocks=(("momentum_absmax", "momentum_codes", BLOCKSIZE),),
)


def rounds(kind: str) -> bool:
    """Whether ``kind`` stores M with stochastic rounding (from a float32 copy) rather than in place."""
    return kind in ("bfloat16", "8bit")


def momentum_bytes(numel: int, dtype: torch.dtype, kind: str) -> int:
    """Bytes of the stored momentum of ``numel`` values whose gradient has ``dtype``."""
    if kind == "8bit":
        return numel + 4 * math.ceil(numel / BLOCKSIZE)
    return numel * {"auto": dtype.itemsize, "float32": 4, "bfloat16": 2}[kind]


def rounding_workspace_bytes(numel: int, dtype: torch.dtype, kind: str) -> int:
    """Transient bytes of a rounded form's step besides the direction D: the float32 M, the
    gradient in float32 (unless it is), and the rounding's per-pass temporaries (written into
    the stored tensors: no new result)."""
    per_value = BFLOAT16_ROUNDING_BYTES if kind == "bfloat16" else ROUNDING_BYTES
    return 4 * numel + (0 if dtype == torch.float32 else 4 * numel) + per_value * min(numel, CHUNK)


def compute_dtype(g: torch.Tensor) -> torch.dtype:
    """The dtype a rounded form's M is advanced in: float32, or the gradient's when wider."""
    return torch.promote_types(g.dtype, torch.float32)


def stored_kind(state: dict[str, Any]) -> str | None:
    """The form the state holds its momentum in (None before the first step)."""
    return next((kind for kind, keys in KEYS.items() if keys[0] in state), None)


def _value(state: dict[str, Any], kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The stored M as a new tensor of ``dtype``."""
    if kind == "8bit":
        return dequantize_blockwise(state["momentum_codes"], state["momentum_absmax"], signed=True, dtype=dtype)
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
        return state[KEYS[kind][0]] if not rounds(kind) else _value(state, kind, dtype)
    else:
        m = _value(state, old, dtype)
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
    else:
        state[KEYS[kind][0]] = reindex_along(state[KEYS[kind][0]], kept, dim, shard)
