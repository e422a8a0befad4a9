"""lowmem_optim/finite.py: the gradient's finiteness check in passes."""

from __future__ import annotations

import pytest
import torch

from lowmem_optim import finite
from lowmem_optim.tools.op_count import OpCounter


@pytest.mark.parametrize("chunk", [1 << 22, 64, 7], ids=["one pass", "passes of 2 rows", "a row per pass"])
def test_all_finite_agrees_with_torch_isfinite_in_every_pass(monkeypatch, chunk):
    monkeypatch.setattr(finite, "FINITE_CHUNK", chunk)
    t = torch.randn(9, 32, generator=torch.Generator().manual_seed(0))
    assert bool(finite.all_finite(t))
    for row, bad in [(0, float("nan")), (4, float("inf")), (8, float("-inf"))]:  # the last pass is short
        broken = t.clone()
        broken[row, 5] = bad
        assert not bool(finite.all_finite(broken)), (row, bad)
    assert bool(finite.all_finite(torch.tensor(1.0))) and not bool(finite.all_finite(torch.tensor(float("nan"))))
    assert bool(finite.all_finite(torch.empty(0, 4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_check_in_passes_peaks_at_one_pass_of_temporaries_as_modelled(monkeypatch, dtype):
    """torch.isfinite makes |t| and three bool tensors of t's size; in passes of 2 rows, of two."""
    t = torch.randn(9, 32).to(dtype)
    whole = OpCounter()
    with whole:
        torch.isfinite(t).all()
    monkeypatch.setattr(finite, "FINITE_CHUNK", 64)
    passes = OpCounter()
    with passes:
        finite.all_finite(t)
    assert whole.peak_bytes == 9 * 32 * (dtype.itemsize + 3)
    assert passes.peak_bytes - 2 * 32 * (dtype.itemsize + 3) in range(0, 16)  # + the per-pass answers
    assert finite.all_finite_bytes((9, 32), dtype) == 2 * 32 * (dtype.itemsize + 3)
