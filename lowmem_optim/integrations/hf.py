"""HF transformers ``Trainer``: any optimizer of the registry, with our param groups.

``Trainer(optimizer_cls_and_kwargs=(cls, kwargs))`` instantiates a class that is not a
``torch.optim.Optimizer`` with no arguments and calls it with ``(model, **kwargs)``; that is
the hook used here, so the Trainer builds the optimizer from its own (possibly re-created)
model. Selection of the low-rank matrices follows HF's ``optim_target_modules`` (a list of
name fragments, a regex, or ``"all-linear"``), via :func:`lowmem_optim.build_optimizer`::

    from lowmem_optim.integrations.hf import trainer_optimizer

    trainer = Trainer(model, args, train_dataset=data,
                      optimizer_cls_and_kwargs=trainer_optimizer(
                          "galore_adamw", rank=128, update_proj_gap=200, lr=args.learning_rate,
                          target_modules=args.optim_target_modules or "all-linear"))

An optimizer built beforehand works too: ``Trainer(optimizers=(optimizer, scheduler))``.
Checkpoints need nothing more: the Trainer saves ``optimizer.state_dict()`` to
``optimizer.pt`` and loads it with ``weights_only=True`` (our state is tensors and numbers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowmem_optim.registry import build_optimizer


class TrainerOptimizerFactory:
    """What ``optimizer_cls_and_kwargs`` names: called by the Trainer as ``factory()(model, **kwargs)``."""

    def __call__(self, model: nn.Module, *, name: str, **hparams: Any) -> torch.optim.Optimizer:
        optimizer = build_optimizer(name, model, **hparams)
        relative = [i for i, group in enumerate(optimizer.param_groups) if group.get("lr") is None]
        if relative:
            raise ValueError(
                f"HF Trainer: optimizer {name!r} has lr=None in param groups {relative} (a relative step "
                "size, as Adafactor's relative_step=True), but the Trainer always builds an LR scheduler, "
                "which multiplies group['lr']; pass a number as lr (with relative_step=False)"
            )
        return optimizer


def trainer_optimizer(name: str, **hparams: Any) -> tuple[type, dict[str, Any]]:
    """``optimizer_cls_and_kwargs`` for ``transformers.Trainer``: the registry's optimizer
    ``name`` built by :func:`lowmem_optim.build_optimizer` with ``hparams`` (``rank``,
    ``update_proj_gap``, ``scale``, ``target_modules``, ``lr``, ...)."""
    return TrainerOptimizerFactory, {"name": name, **hparams}
