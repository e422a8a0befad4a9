"""Other packages' optimizers as training baselines: ``--optimizer peer_<name>``.

Each is built only where its package is installed (``pip install -e ".[bench]"``: galore-torch,
apollo-torch, torchao; bitsandbytes' AdamW8bit and torch's AdamW are already registry names,
``adamw8bit`` and ``adamw``). They are benchmark baselines, never part of ``lowmem_optim``.
Every peer takes the run's ``--lr``, ``--weight-decay``, ``--betas`` and ``--eps`` (unset: its
own default, but 1e-8 for the AdamW-based low-rank peers, as torch's AdamW and ours);
the low-rank ones group the ``--target-modules`` weights as ``python -m train`` does, with
``--rank``, ``--update-proj-gap`` and ``--scale`` (GaLore's projection type ``std``), except:
- ``peer_galore_adafactor``: a fixed lr under the run's schedule (``relative_step=False``, no
  parameter scaling, no warm-up init), as GaLore's script builds it;
- ``peer_apollo``: random projection and channel-wise scaling with scale 1 (APOLLO's README);
- ``peer_apollo_mini``: rank 1, tensor-wise scaling, scale 128 (APOLLO-Mini), whatever
  ``--rank`` and ``--scale`` say.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowmem_optim.groups import lowrank_param_groups, parse_target_modules

if TYPE_CHECKING:
    from train.config import TrainConfig

#: ``--optimizer`` name -> (module to import, its pip package)
PEERS: dict[str, tuple[str, str]] = {
    "peer_torchao_adamw8bit": ("torchao.optim", "torchao"),
    "peer_torchao_adamw4bit": ("torchao.optim", "torchao"),
    "peer_galore_adamw": ("galore_torch", "galore-torch"),
    "peer_galore_adafactor": ("galore_torch", "galore-torch"),
    "peer_galore_adamw8bit": ("galore_torch", "galore-torch"),
    "peer_apollo": ("apollo_torch", "apollo-torch"),
    "peer_apollo_mini": ("apollo_torch", "apollo-torch"),
}


def _module(name: str) -> ModuleType:
    module, package = PEERS[name]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"--optimizer {name} needs the package {package} (pip install -e '.[bench]'): {err}") from err


def _groups(cfg: TrainConfig, model: nn.Module, **override: Any) -> list[dict[str, Any]]:
    keys = {"rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap, "scale": cfg.scale, **override}
    keys = {k: v for k, v in keys.items() if v is not None}
    if "rank" not in keys:
        raise ValueError("--rank is required for a low-rank peer optimizer")
    groups = lowrank_param_groups(model, parse_target_modules(cfg.target_modules), proj_type="std", **keys)
    return [{k: v for k, v in g.items() if k != "param_names"} for g in groups]


def _hparams(cfg: TrainConfig, eps: float | None = None) -> dict[str, Any]:
    hp: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    eps = cfg.eps if cfg.eps is not None else eps
    if eps is not None:
        hp["eps"] = eps
    if cfg.adam_betas is not None:
        hp["betas"] = cfg.adam_betas
    return hp


def _builders() -> dict[str, Callable[[ModuleType, TrainConfig, nn.Module], torch.optim.Optimizer]]:
    def apollo(m: ModuleType, cfg: TrainConfig, model: nn.Module, **group: Any) -> torch.optim.Optimizer:
        return m.APOLLOAdamW(_groups(cfg, model, proj="random", **group), **_hparams(cfg, eps=1e-8))

    return {
        "peer_torchao_adamw8bit": lambda m, cfg, model: m.AdamW8bit(model.parameters(), **_hparams(cfg)),
        "peer_torchao_adamw4bit": lambda m, cfg, model: m.AdamW4bit(model.parameters(), **_hparams(cfg)),
        "peer_galore_adamw": lambda m, cfg, model: m.GaLoreAdamW(
            _groups(cfg, model), no_deprecation_warning=True, **_hparams(cfg, eps=1e-8)
        ),
        "peer_galore_adamw8bit": lambda m, cfg, model: m.GaLoreAdamW8bit(
            _groups(cfg, model), **_hparams(cfg, eps=1e-8)
        ),
        "peer_galore_adafactor": lambda m, cfg, model: m.GaLoreAdafactor(
            _groups(cfg, model),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        ),
        "peer_apollo": lambda m, cfg, model: apollo(m, cfg, model, scale_type="channel", scale=1.0),
        "peer_apollo_mini": lambda m, cfg, model: apollo(m, cfg, model, rank=1, scale_type="tensor", scale=128.0),
    }


def build_peer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The peer ``cfg.optimizer`` over ``model``; ValueError naming the package when it is not installed."""
    return _builders()[cfg.optimizer](_module(cfg.optimizer), cfg, model)
