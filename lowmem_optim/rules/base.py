"""What the inner update rules share: the learning rate and weight decay every rule reads, and
moving moments into a new subspace. The rule protocol is :class:`lowmem_optim.parts.Rule`.
"""

from __future__ import annotations

import torch

from lowmem_optim.parts import HParam, number

#: the learning rate (rules and named optimizers set their own default with dataclasses.replace)
LR = HParam("lr", 1e-3, number(0), "learning rate")
#: W <- W (1 - lr_t weight_decay) before the update (decoupled, as torch.optim.AdamW)
WEIGHT_DECAY = HParam("weight_decay", 1e-2, number(0), "decoupled weight decay")


def reindex_along(t: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    """Moments of indices that stayed move to their new positions; new indices start at zero."""
    out = torch.zeros_like(t)
    new_pos = (kept >= 0).nonzero().squeeze(1)
    old_pos = kept[new_pos]
    out.index_copy_(dim, new_pos, t.index_select(dim, old_pos))
    return out
