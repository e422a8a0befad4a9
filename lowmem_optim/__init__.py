"""Memory-efficient optimizers for training large language models.

Drop-in replacements for ``torch.optim.AdamW``: GaLore-family optimizers that keep Adam's
state in a low-rank subspace of each weight matrix's gradient.
"""

from lowmem_optim.engine import ComposedOptimizer
from lowmem_optim.groups import lowrank_param_groups, normalized_param_groups
from lowmem_optim.optimizers import (
    APOLLO,
    SCALE,
    APOLLOMini,
    AuON,
    DCTAdamW,
    Fira,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    HybridAuON,
    Muon,
    QGaLoreAdamW8bit,
    SinkGD,
)
from lowmem_optim.registry import available_optimizers, build_optimizer, get_optimizer_class

__version__ = "0.1.0"

__all__ = [
    "ComposedOptimizer",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreAdafactor",
    "QGaLoreAdamW8bit",
    "DCTAdamW",
    "APOLLO",
    "APOLLOMini",
    "Fira",
    "AuON",
    "HybridAuON",
    "Muon",
    "SinkGD",
    "SCALE",
    "lowrank_param_groups",
    "normalized_param_groups",
    "available_optimizers",
    "get_optimizer_class",
    "build_optimizer",
]
