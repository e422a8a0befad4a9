"""One registry of optimizer names, read by every tool (training CLI, sweeps, memory model).

Names are snake_case; the baselines are ``adamw`` (torch.optim.AdamW) and ``adamw8bit``
(bitsandbytes' AdamW8bit). Entries are import paths so a missing optional package fails only
when its optimizer is asked for.
"""

from __future__ import annotations

import importlib

OPTIMIZERS: dict[str, str] = {
    "adamw": "torch.optim:AdamW",
    "adamw8bit": "bitsandbytes.optim:AdamW8bit",
    "galore_adamw": "lowmem_optim.optimizers:GaLoreAdamW",
    "galore_adafactor": "lowmem_optim.optimizers:GaLoreAdafactor",
    "galore_adamw8bit": "lowmem_optim.optimizers:GaLoreAdamW8bit",
}

#: registry names of the optimizers that take low-rank param groups (``rank`` etc.)
LOWRANK_OPTIMIZERS: frozenset[str] = frozenset({"galore_adamw", "galore_adafactor", "galore_adamw8bit"})


def available_optimizers() -> list[str]:
    return sorted(OPTIMIZERS)


def get_optimizer_class(name: str) -> type:
    """The class registered under ``name``; ValueError listing the names otherwise."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer: {name!r} (allowed: {', '.join(available_optimizers())})")
    module, attr = OPTIMIZERS[name].split(":")
    return getattr(importlib.import_module(module), attr)
