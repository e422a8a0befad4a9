"""One registry of optimizer names, read by every tool (training CLI, sweeps, memory model).

Names are snake_case; the baselines are ``adamw`` (torch.optim.AdamW) and ``adamw8bit``
(bitsandbytes' AdamW8bit). Entries are import paths so a missing optional package fails only
when its optimizer is asked for. :func:`build_optimizer` turns a name, a model and flat
hyperparameters into an optimizer with the right param groups.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from lowmem_optim.engine import ComposedOptimizer, declared_defaults, lowrank_hparams
from lowmem_optim.groups import lowrank_param_groups, normalized_param_groups
from lowmem_optim.optimizers import NamedOptimizer

OPTIMIZERS: dict[str, str] = {
    "adamw": "torch.optim:AdamW",
    "adamw8bit": "bitsandbytes.optim:AdamW8bit",
    "galore_adamw": "lowmem_optim.optimizers:GaLoreAdamW",
    "galore_adafactor": "lowmem_optim.optimizers:GaLoreAdafactor",
    "galore_adamw8bit": "lowmem_optim.optimizers:GaLoreAdamW8bit",
    "q_galore_adamw8bit": "lowmem_optim.optimizers:QGaLoreAdamW8bit",
    "dct_adamw": "lowmem_optim.optimizers:DCTAdamW",
    "apollo": "lowmem_optim.optimizers:APOLLO",
    "apollo_mini": "lowmem_optim.optimizers:APOLLOMini",
    "fira": "lowmem_optim.optimizers:Fira",
    "auon": "lowmem_optim.optimizers:AuON",
    "hybrid_auon": "lowmem_optim.optimizers:HybridAuON",
    "muon": "lowmem_optim.optimizers:Muon",
    "sinkgd": "lowmem_optim.optimizers:SinkGD",
    "scale_sgd": "lowmem_optim.optimizers:SCALE",
}

#: registry names of the optimizers that take low-rank param groups (``rank`` etc.)
LOWRANK_OPTIMIZERS: frozenset[str] = frozenset(
    {
        "galore_adamw",
        "galore_adafactor",
        "galore_adamw8bit",
        "dct_adamw",
        "q_galore_adamw8bit",
        "fira",
        "apollo",
        "apollo_mini",
    }
)

#: registry names of the optimizers whose matrix group gets a normalized rule and whose other
#: parameters get AdamW (groups from :func:`lowmem_optim.normalized_param_groups`)
MATRIX_OPTIMIZERS: frozenset[str] = frozenset({"auon", "hybrid_auon", "muon", "sinkgd", "scale_sgd"})


def available_optimizers() -> list[str]:
    return sorted(OPTIMIZERS)


def get_optimizer_class(name: str) -> type:
    """The class registered under ``name``; ValueError listing the names otherwise."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer: {name!r} (allowed: {', '.join(available_optimizers())})")
    module, attr = OPTIMIZERS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def package_optimizers() -> list[str]:
    """The names of this package's optimizers (not the torch and bitsandbytes baselines), sorted."""
    return sorted(name for name, path in OPTIMIZERS.items() if path.startswith("lowmem_optim."))


def lowrank_defaults(name: str) -> dict[str, Any]:
    """The low-rank group keys optimizer ``name`` fills where the caller gives none (APOLLO-Mini's
    ``rank``: 1); empty for most."""
    cls = get_optimizer_class(name)
    return dict(cls.lowrank_defaults) if issubclass(cls, NamedOptimizer) else {}


def momentum_dtype_optimizers() -> list[str]:
    """The registry names whose matrix rule stores a momentum in ``momentum_dtype`` (Muon, AuON,
    Hybrid-AuON; not the stateless SinkGD, nor SCALE)."""
    return sorted(n for n in MATRIX_OPTIMIZERS if "momentum_dtype" in declared_defaults(get_optimizer_class(n)))


def check_int8_capable(name: str) -> None:
    """ValueError unless optimizer ``name`` can train INT8 weights (:mod:`lowmem_optim.quant.int8_linear`):
    only this package's optimizers apply their updates through ``apply_update``."""
    if not issubclass(get_optimizer_class(name), ComposedOptimizer):
        raise ValueError(
            f"--weight-bits 8: --optimizer {name} writes into its parameters and cannot update INT8 "
            f"weights (allowed: an optimizer of this package, e.g. {', '.join(sorted(LOWRANK_OPTIMIZERS))})"
        )


def build_optimizer(
    name: str, model: nn.Module, *, target_modules: str | list[str] = "all-linear", **hparams: Any
) -> Any:
    """The optimizer ``name`` over ``model``'s parameters, with its param groups built.

    For low-rank optimizers the keys of a low-rank setup (``rank``, required unless the class
    defaults it, as APOLLO-Mini's 1 in ``lowrank_defaults``, and every key a
    projector, basis storage or refresh schedule declares: :func:`lowmem_optim.engine.lowrank_hparams`)
    go to the group of the linear layers selected by ``target_modules``; every other
    hyperparameter goes to the constructor. For :data:`MATRIX_OPTIMIZERS` the selected linear and conv weights
    form the matrix group (with the low-rank keys, if given: the rule then runs in a subspace)
    and the rest gets AdamW. A key whose value is None is dropped (the class default applies),
    unless the class's default is another value: there None is a choice of its own
    (``error_feedback=None`` turns DCTAdamW's NF4 feedback off; ``norm_growth_limit=None`` turns
    APOLLO's and Fira's limiter off; ``proj_bits=None`` keeps Q-GaLore's projections unquantized).
    """
    cls = get_optimizer_class(name)
    chosen = declared_defaults(cls) if issubclass(cls, ComposedOptimizer) else {}
    hparams = {k: v for k, v in hparams.items() if v is not None or chosen.get(k) is not None}
    lowrank_keys = lowrank_hparams()
    if name in LOWRANK_OPTIMIZERS or name in MATRIX_OPTIMIZERS:
        lowrank = {**lowrank_defaults(name), **{k: hparams.pop(k) for k in lowrank_keys if k in hparams}}
        make_groups = normalized_param_groups if name in MATRIX_OPTIMIZERS else lowrank_param_groups
        return cls(make_groups(model, target_modules, **lowrank), **hparams)
    unused = [k for k in lowrank_keys if k in hparams]
    if unused:
        raise ValueError(
            f"{', '.join(unused)} given for optimizer {name!r}, which takes no low-rank groups "
            f"(low-rank optimizers: {', '.join(sorted(LOWRANK_OPTIMIZERS))})"
        )
    return cls(model.parameters(), **hparams)
