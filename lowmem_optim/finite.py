"""Whether a gradient holds only finite values, in passes of bounded memory.

``torch.isfinite(t).all()`` makes |t| (in t's dtype) and three bool tensors of t's size before it
reduces them: 5 bytes per value of a bfloat16 gradient, 215 MiB for one of LLaMA-7B's MLP
weights, at every subspace refresh (every step for the DCT). Over rows of at most
``FINITE_CHUNK`` values at a time the same answer takes a few MiB. The answer stays on the
device: reading it is the caller's one host sync.
"""

from __future__ import annotations

import math

import torch

#: values per pass of :func:`all_finite`
FINITE_CHUNK = 1 << 22


def _rows_per_pass(shape: tuple[int, ...]) -> int:
    return max(1, FINITE_CHUNK // max(math.prod(shape[1:]), 1))


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(t).all()``, a 0-D bool tensor on ``t``'s device, over rows of at most
    ``FINITE_CHUNK`` values at a time (one row at a time where a row is longer)."""
    rows = _rows_per_pass(tuple(t.shape))
    if t.dim() == 0 or t.shape[0] <= rows:
        return torch.isfinite(t).all()
    return torch.stack([torch.isfinite(part).all() for part in t.split(rows)]).all()


def all_finite_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The peak temporaries of :func:`all_finite` on a tensor of ``shape`` and ``dtype``: one
    pass's |t| and three bool tensors."""
    rows = min(shape[0], _rows_per_pass(shape)) if shape else 1
    return rows * math.prod(shape[1:]) * (dtype.itemsize + 3)
