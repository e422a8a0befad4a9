"""What the inner update rules share: the learning rate and weight decay every rule reads, and
moving moments into a new subspace. The rule protocol is :class:`lowmem_optim.parts.Rule`.
"""

from __future__ import annotations

import torch

from lowmem_optim.parts import HParam, number
from lowmem_optim.sharding import RowShard

#: the learning rate (rules and named optimizers set their own default with dataclasses.replace)
LR = HParam("lr", 1e-3, number(0), "learning rate")
#: W <- W (1 - lr_t weight_decay) before the update (decoupled, as torch.optim.AdamW)
WEIGHT_DECAY = HParam("weight_decay", 1e-2, number(0), "decoupled weight decay")


def reindex_along(t: torch.Tensor, kept: torch.Tensor, dim: int, shard: RowShard | None = None) -> torch.Tensor:
    """Moments of indices that stayed move to their new positions; new indices start at zero.
    With ``shard``, ``t`` is this rank's rows; along dim 0 a row may move to another rank, so
    the rows are gathered (at refresh steps only) and this rank's new rows kept."""
    if shard is not None and dim == 0:
        return reindex_along(shard.gather_rows(t), kept, 0)[shard.start : shard.stop]
    out = torch.zeros_like(t)
    new_pos = (kept >= 0).nonzero().squeeze(1)
    old_pos = kept[new_pos]
    out.index_copy_(dim, new_pos, t.index_select(dim, old_pos))
    return out
