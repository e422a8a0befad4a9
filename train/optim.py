"""The optimizer (from the package registry) and the learning-rate schedule of a run.

Everything about an optimizer comes from :mod:`lowmem_optim.registry`: the names ``--optimizer``
accepts, which of them take low-rank groups, and how groups are built. The loop only knows
``step``, ``zero_grad``, ``param_groups`` and, when the optimizer has them, ``layer_stats`` and
``state_bytes``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lowmem_optim.engine import ComposedOptimizer, lowrank_hparams
from lowmem_optim.groups import check_some_matrix_projected, parse_target_modules
from lowmem_optim.registry import (
    LOWRANK_OPTIMIZERS,
    MATRIX_OPTIMIZERS,
    build_optimizer,
    check_int8_capable,
    get_optimizer_class,
    lowrank_defaults,
    momentum_dtype_optimizers,
)
from lowmem_optim.selection import selected_modules
from train.config import TrainConfig
from train.peers import PEERS, build_peer

#: flags that configure low-rank groups (group key = flag name in snake_case), from the parts' declarations
LOWRANK_FLAGS = tuple(lowrank_hparams())

#: constructor settings a learning-rate schedule needs: GaLore's reference script builds
#: GaLoreAdafactor with a fixed lr and relative_step=False, so the schedule owns the lr
SCHEDULE_COMPATIBLE: dict[str, dict[str, Any]] = {
    "galore_adafactor": {"relative_step": False, "scale_parameter": False, "warmup_init": False},
}


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``model`` with the run's hyperparameters."""
    name = cfg.optimizer
    if name in PEERS:
        return build_peer(cfg, model)
    cls = get_optimizer_class(name)
    hparams: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, **SCHEDULE_COMPATIBLE.get(name, {})}
    if cfg.adam_betas is not None:
        hparams["betas"] = cfg.adam_betas
    if cfg.eps is not None:
        hparams["eps"] = cfg.eps
    if cfg.momentum_dtype is not None:
        if name not in momentum_dtype_optimizers():
            raise ValueError(
                f"--momentum-dtype {cfg.momentum_dtype} with --optimizer {name}, which keeps no normalized momentum "
                f"(allowed: --optimizer {', '.join(momentum_dtype_optimizers())})"
            )
        hparams["momentum_dtype"] = cfg.momentum_dtype
    if issubclass(cls, ComposedOptimizer):
        hparams["seed"] = cfg.seed
    lowrank = cfg.lowrank_flags()
    if name in LOWRANK_OPTIMIZERS and cfg.rank is None and "rank" not in lowrank_defaults(name):
        raise ValueError(f"--rank is required for --optimizer {name} (a low-rank optimizer)")
    if name in LOWRANK_OPTIMIZERS or name in MATRIX_OPTIMIZERS:  # the registry builds their groups
        if cfg.rank is not None:
            check_some_matrix_projected(model, parse_target_modules(cfg.target_modules), cfg.rank)
        hparams.update(lowrank)
        kwargs = {"target_modules": parse_target_modules(cfg.target_modules)}
    else:
        if lowrank:
            # a sweep may grid over optimizers with fixed low-rank flags: say so, but do not fail
            print(
                f"note: --optimizer {name} takes no param groups; ignoring "
                f"{', '.join('--' + k.replace('_', '-') for k in lowrank)}",
                file=sys.stderr,
            )
        kwargs = {}
    if any(hasattr(p, "apply_update") for p in model.parameters()):
        check_int8_capable(name)
    try:
        return build_optimizer(name, model, **kwargs, **hparams)
    except TypeError as err:  # a flag the optimizer's constructor does not take
        raise ValueError(f"--optimizer {name} does not accept one of {sorted(hparams)}: {err}") from err


def lr_lambda(cfg: TrainConfig):
    """Multiplier of --lr after ``done`` completed steps: linear warm-up to 1 over
    ``warmup_steps`` (step 1 already gets lr / warmup), then cosine or linear decay to
    ``min_lr_ratio`` at ``max_steps``, or constant."""
    warmup, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio

    def factor(done: int) -> float:
        if done < warmup:
            return (done + 1) / warmup
        progress = (done - warmup) / max(1, total - warmup)
        if cfg.scheduler == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.scheduler == "linear":
            return floor + (1 - floor) * (1 - progress)
        return 1.0

    return factor


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def state_tensors(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None
) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``optimizer.state`` (of ``params`` only, when given), each once:
    values, nested containers, tensors held as attributes of objects (galore-torch and
    apollo-torch keep projectors so), the inner tensors of tensor subclasses (torchao's codes and
    scales; a DTensor's local shard)."""
    seen: set[int] = set()

    def walk(value: Any) -> Iterator[torch.Tensor]:
        if id(value) in seen:
            return
        seen.add(id(value))
        if torch.is_tensor(value) and hasattr(value, "__tensor_flatten__"):
            for inner in value.__tensor_flatten__()[0]:
                yield from walk(getattr(value, inner))
        elif torch.is_tensor(value):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from walk(v)
        elif hasattr(value, "__dict__"):
            for v in vars(value).values():
                yield from walk(v)

    states = optimizer.state.values() if params is None else (optimizer.state.get(p, {}) for p in params)
    for state in states:
        yield from walk(state)


def state_bytes(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None) -> int:
    """numel x element size of every state tensor (of ``params`` only, when given; on this rank)."""
    return sum(t.numel() * t.element_size() for t in state_tensors(optimizer, params))


def matrix_weights(model: nn.Module, cfg: TrainConfig) -> list[torch.Tensor]:
    """The weight matrices ``--target-modules`` selects, whatever the optimizer: the parameters
    whose state the low-rank and matrix optimizers shrink, so a comparison can count bytes per
    matrix parameter for every optimizer alike."""
    modules = selected_modules(model, parse_target_modules(cfg.target_modules))
    return [m.weight for _, m in modules]


def retained_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind the state tensors: what the state keeps alive (a
    view of a larger tensor keeps all of it)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state_tensors(optimizer)}
    return sum(storages.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state on this process: ``state_bytes()`` where the optimizer
    has it, else the storages its state keeps alive (:func:`retained_bytes`; local shards under
    FSDP2, a peer's projector objects included)."""
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    return retained_bytes(optimizer)
