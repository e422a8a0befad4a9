"""Group-wise asymmetric min-max quantization (INT8 weights, INT4 projections: Q-GaLore).

The tensor is flattened and cut into groups of ``group_size`` values (the last group padded
with its own last value, so padding never widens a range). Per group, with b bits:

    scale = (max - min) / (2^b - 1),     zero = -min / scale
    q = clamp(round(x / scale + zero), 0, 2^b - 1),     x' = scale * (q - zero)

The zero point is kept as a float, not rounded and clamped to [0, 2^b - 1] as in Q-GaLore's
reference, where a group whose values share one sign collapses (INT4 maps [1, 2] to [1, 1]);
here every group uses its whole code range. A constant group gets scale 1 and decodes exactly.

Stochastic rounding replaces round(y) by floor(y + u), u ~ U[0, 1): unbiased inside the
group's range (E[x'] = x), so updates far smaller than one quantization step still move the
weight on average. u comes from a counter-based generator (:func:`counter_uniform`): the value
of element i is a hash of (seed, i), so no generator object or random tensor exists, any slice
of a tensor can be rounded on its own with the draws the whole tensor would get, and a fused
kernel computes the same draws in registers.
"""

from __future__ import annotations

import torch

DEFAULT_GROUP_SIZE = 256
_MASK32 = 0xFFFF_FFFF
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele et al., 2014) on Python ints: spreads a seed's bits."""
    x = (x + 0x9E37_79B9_7F4A_7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58_476D_1CE4_E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D0_49BB_1331_11EB) & _MASK64
    return x ^ (x >> 31)


def round_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys of a seed (any Python int) for :func:`counter_uniform`."""
    a = _splitmix64(seed & _MASK64)
    return a & _MASK32, a >> 32


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' hash prospector), in place: a bijection of 32-bit values held in
    int64, so the products never overflow past what the mask keeps."""
    x.bitwise_xor_(x >> 16)
    x.mul_(0x7FEB_352D).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x846C_A68B).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def counter_uniform(counter: torch.Tensor, keys: tuple[int, int]) -> torch.Tensor:
    """u in [0, 1) (float32, multiples of 2^-24) for each int64 ``counter`` value:
    u = mix(mix(c_lo + k0) + (c_hi ^ k1)) / 2^32, truncated to 24 bits: two keyed rounds of a
    32-bit bijective hash, so the same (keys, counter) give the same u on every device."""
    k0, k1 = keys
    h = _mix32_((counter & _MASK32).add_(k0).bitwise_and_(_MASK32))
    h = _mix32_(h.add_((counter >> 32).bitwise_xor_(k1)).bitwise_and_(_MASK32))
    return h.bitwise_right_shift_(8).to(torch.float32).mul_(2.0**-24)


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def quantize_rows(
    g: torch.Tensor, bits: int, keys: tuple[int, int] | None = None, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of the float32 ``g`` (groups x group_size) as one group: (codes uint8
    of g's shape, scale, zero). With ``keys``, stochastic rounding with the draws of
    :func:`counter_uniform` at counters ``offset + row * group_size + column``; else round to
    nearest. Pure tensor code: the eager reference and what :func:`torch.compile` fuses."""
    lo, hi = g.amin(dim=1), g.amax(dim=1)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -lo / scale
    y = g / scale[:, None] + zero[:, None]
    if keys is not None:
        counter = torch.arange(offset, offset + g.numel(), device=g.device).view(g.shape)
        y = torch.floor(y + counter_uniform(counter, keys))
    else:
        y = torch.round(y)
    return y.clamp_(0, qmax).to(torch.uint8), scale, zero


def quantize_groupwise(
    x: torch.Tensor,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    stochastic: bool = False,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 of ``x.numel()`` values, scale float32 per group, zero float32 per group).
    ``stochastic``: the draw of element i is :func:`counter_uniform` of counter ``offset + i``
    under the keys of ``seed``."""
    if bits not in (2, 4, 8):
        raise ValueError(f"Invalid bits: {bits!r} (allowed: 2, 4, 8)")
    if group_size < 1:
        raise ValueError(f"Invalid group_size: {group_size!r} (allowed: an int >= 1)")
    codes, scale, zero = quantize_rows(_groups(x, group_size), bits, round_keys(seed) if stochastic else None, offset)
    return codes.view(-1)[: x.numel()], scale, zero


def dequantize_groupwise(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> torch.Tensor:
    """Inverse of :func:`quantize_groupwise` (codes unpacked, one per value)."""
    numel = codes.numel()
    pad = (-numel) % group_size
    q = codes.reshape(-1).float()
    if pad:
        q = torch.cat([q, q.new_zeros(pad)])
    x = (q.view(-1, group_size) - zero[:, None]) * scale[:, None]
    return x.view(-1)[:numel].view(shape).to(dtype)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale (q - zero) in ``dtype`` for codes of whole groups (groups x group_size); the
    group-aligned case of :func:`dequantize_groupwise`, written to be fused by :func:`fused`."""
    return ((codes.to(torch.float32) - zero[:, None]) * scale[:, None]).to(dtype)


def requantize_rows_(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    update: torch.Tensor,
    alpha: float,
    decay: float | torch.Tensor,
    bits: int,
    keys: tuple[int, int] | None,
    offset: int,
) -> None:
    """In place, per group (row of ``codes``): W = scale (q - zero);  W' = decay W - alpha U in
    float32;  (q, scale, zero) <- quantize(W') with fresh min/max (:func:`quantize_rows`, counters
    from ``offset``). Eager, this runs about 25 kernels and float32 temporaries of the rows'
    size; :func:`fused` makes one pass that keeps W' in registers."""
    w = (codes.to(torch.float32) - zero[:, None]) * scale[:, None]
    w = w * decay - alpha * update.to(torch.float32)
    new_codes, new_scale, new_zero = quantize_rows(w, bits, keys, offset)
    codes.copy_(new_codes)
    scale.copy_(new_scale)
    zero.copy_(new_zero)


_COMPILED: dict[object, object] = {}


def fused(fn):
    """``fn`` compiled by :func:`torch.compile` (dynamic shapes and scalars, whole graph, built
    once per function): on CUDA each of :func:`dequantize_rows` and :func:`requantize_rows_`
    becomes one Triton kernel. Exact integer arithmetic makes the rounding draws equal to the
    eager ones; float results may differ in the last bit where the compiler contracts a
    multiply-add, which can move a value that sits on a rounding boundary by one code."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[fn]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte (low nibble first); an odd count is padded with a zero nibble."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``numel`` codes, one per byte."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)[:numel]
