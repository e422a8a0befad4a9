"""A parameter's saved state must fit the parameter: checked when an optimizer's state is loaded.

torch's ``Optimizer.load_state_dict`` checks the number of parameters per group, not their
shapes, so a state saved for a parameter of another shape (another model size, parameters in
another order) loads silently and the next ``step`` fails deep inside a kernel. Here the tensors
of each parameter's saved state are checked against the parameter before anything is loaded:
a tensor with as many dimensions as the parameter (a moment, its 8-bit codes, an error-feedback
buffer) must have the parameter's shape, or, for a parameter projected at rank r, a matrix with
the rows (m or r) or the columns (n or r) of a projected shape of its m x n matrix view (m x r,
r x n, r x r; the projection matrices share them too; a packed buffer halves the other side), or
4-bit codes packed two per byte along the rows of the matrix view (m x ceil(n / 2)).
Statistics of one dimension (factored second moments, quantization scales, subspace indices)
and plain numbers depend on choices of the parts, not only on the shape: they pass.
FSDP2-sharded parameters are left to torch.distributed.checkpoint, which checks the shapes of
what it loads against the shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from lowmem_optim.sharding import is_dtensor


def misfit(param: torch.Tensor, state: dict[str, Any], rank: int | None) -> str | None:
    """The first tensor of ``state`` that cannot belong to ``param`` (projected at ``rank``, None:
    not projected), e.g. "exp_avg of shape (24, 40)"; or None."""
    if is_dtensor(param):
        return None
    rows = param.shape[0] if param.dim() else 1
    view = (rows, param.numel() // rows if rows else 0)  # the matrix a projection sees
    for key, value in state.items():
        if not torch.is_tensor(value) or value.numel() <= 1 or tuple(value.shape) == tuple(param.shape):
            continue
        matrix = rank is not None and value.dim() == 2
        if matrix and (value.shape[0] in (view[0], rank) or value.shape[1] in (view[1], rank)):
            continue
        if tuple(value.shape) == (view[0], -(-view[1] // 2)):  # 4-bit codes of the matrix view, two per byte
            continue
        if matrix or value.dim() == param.dim():
            return f"{key} of shape {tuple(value.shape)}"
    return None


def check_state_fits(
    where: str,
    param_groups: Iterable[dict[str, Any]],
    state_dict: dict[str, Any],
    projected_rank: Callable[[torch.Tensor, dict[str, Any]], int | None],
    label: Callable[[dict[str, Any], int, torch.Tensor], str],
) -> None:
    """ValueError naming the parameter and the tensor when a saved state does not fit its
    parameter (``projected_rank(p, group)``: the rank p is projected at, or None; ``label(group, i, p)``:
    its name)."""
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    for group in param_groups:
        for i, (p, saved_id) in enumerate(zip(group["params"], saved_ids)):
            wrong = misfit(p, state_dict["state"].get(saved_id, {}), projected_rank(p, group))
            if wrong is not None:
                raise ValueError(
                    f"{where}: the saved state of {label(group, i, p)} holds {wrong}, which does not fit it "
                    "(allowed: a state dict saved for parameters of these shapes, in this order)"
                )
