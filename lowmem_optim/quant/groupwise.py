"""Group-wise asymmetric min-max quantization (INT8 weights, INT4 projections: Q-GaLore).

The tensor is flattened and cut into groups of ``group_size`` values (the last group padded
with its own last value, so padding never widens a range). Per group, with b bits:

    scale = (max - min) / (2^b - 1),     zero = -min / scale
    q = clamp(round(x / scale + zero), 0, 2^b - 1),     x' = scale * (q - zero)

The zero point is kept as a float, not rounded and clamped to [0, 2^b - 1] as in Q-GaLore's
reference, where a group whose values share one sign collapses (INT4 maps [1, 2] to [1, 1]);
here every group uses its whole code range. A constant group gets scale 1 and decodes exactly.

Stochastic rounding replaces round(y) by floor(y + u), u ~ U[0, 1) drawn from a caller's
generator: unbiased inside the group's range (E[x'] = x), so updates far smaller than one
quantization step still move the weight on average.
"""

from __future__ import annotations

import torch

DEFAULT_GROUP_SIZE = 256


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def quantize_groupwise(
    x: torch.Tensor,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 of ``x.numel()`` values, scale float32 per group, zero float32 per group)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"Invalid bits: {bits!r} (allowed: 2, 4, 8)")
    if group_size < 1:
        raise ValueError(f"Invalid group_size: {group_size!r} (allowed: an int >= 1)")
    g = _groups(x, group_size)
    lo, hi = g.amin(dim=1), g.amax(dim=1)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -lo / scale
    y = g / scale[:, None] + zero[:, None]
    if stochastic:
        y = torch.floor(y + torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype))
    else:
        y = torch.round(y)
    codes = y.clamp_(0, qmax).to(torch.uint8).view(-1)[: x.numel()]
    return codes, scale, zero


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
