"""The inner update rule: one optimizer rule over a tensor (full or projected) and its state.

A rule knows nothing of projections. The engine hands it a gradient-like tensor ``g`` (the
full gradient, or the projected low-rank gradient R) and the parameter's state dict; the rule
updates its own entries of that dict and returns ``(update, lr_t)``. The engine then applies

    W <- W (1 - lr_t * weight_decay)            (decoupled decay, first, as torch.optim.AdamW)
    W <- W - scale * back_project(update)

``update`` already carries the step size (so a rule can average lr-scaled updates, as HF's
Adafactor does). ``lr_t`` is the group's ``lr`` for most rules; rules with their own step-size
logic (Adafactor's relative step) return theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class SubspaceChange:
    """What a projector tells the engine after a refresh.

    similarity: how far the subspace moved, in [0, 1] (|cos| of the leading vectors; for index
        based projectors the overlap of index sets); ``None`` on the first refresh.
    kept: for index-based projectors, a LongTensor over the new positions holding the old
        position of each index that stayed, or -1 for a new index; ``None`` means the rule's
        moments are kept as they are (GaLore's convention: not reset, not rotated).
    """

    similarity: float | None = None
    kept: torch.Tensor | None = None


class Rule(Protocol):
    """An update rule. Implementations are stateless; all state lives in ``state``."""

    #: state keys whose floating dtype is fixed by the rule (not cast to the param dtype on load)
    fixed_dtype_keys: frozenset[str]

    def validate(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming a bad hyperparameter of ``group``."""

    def update(
        self, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any], param: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """Advance the rule's state with ``g`` (``state['step']`` already incremented) and
        return ``(update, lr_t)``."""

    def carry(self, state: dict[str, Any], change: SubspaceChange, dim: int) -> None:
        """Carry the rule's moments into a new subspace (``dim``: the projected dimension)."""


def reindex_along(t: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    """Moments of indices that stayed move to their new positions; new indices start at zero."""
    out = torch.zeros_like(t)
    new_pos = (kept >= 0).nonzero().squeeze(1)
    old_pos = kept[new_pos]
    out.index_copy_(dim, new_pos, t.index_select(dim, old_pos))
    return out


def check_betas(group: dict[str, Any]) -> None:
    beta1, beta2 = group["betas"]
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1} (allowed: 0 <= beta1 < 1)")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2} (allowed: 0 <= beta2 < 1)")


def check_nonnegative(group: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = group[key]
        if not isinstance(value, (int, float)) or not value >= 0.0:
            raise ValueError(f"Invalid {key}: {value!r} (allowed: a number >= 0)")
