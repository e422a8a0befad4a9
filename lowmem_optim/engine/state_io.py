"""Loading a state dict: only one of this optimizer's layout, and with the dtypes and devices
the parts declare (torch's ``load_state_dict`` casts every floating tensor to the parameter's)."""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch

from lowmem_optim.engine.declarations import SELECTORS, group_parts
from lowmem_optim.parts import declared
from lowmem_optim.projection.feedback import FEEDBACK_KEYS


def check_same_layout(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """ValueError naming the group and key unless ``state_dict`` has ``optimizer``'s groups and,
    per group, the same part choices, ``rank`` and projector, storage, schedule and update form keys."""
    saved_groups = state_dict.get("param_groups", [])
    where = f"{type(optimizer).__name__}.load_state_dict"
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{where}: the state dict has {len(saved_groups)} param groups, this optimizer "
            f"{len(optimizer.param_groups)} (allowed: a state dict of this optimizer's param groups)"
        )
    for i, (ours, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if not any(key in saved for key in SELECTORS):
            raise ValueError(
                f"{where}: param group {i} of the state dict names no {', '.join(SELECTORS)}: it was "
                "not saved by a lowmem_optim optimizer (allowed: a state dict of this optimizer)"
            )
        parts = group_parts(ours)
        declarations = parts.hparams()
        for key in (*SELECTORS, "rank", *declared(parts.all()[1:])):  # projector, storage, schedule, form
            theirs = saved.get(key, declarations[key].default)
            if _comparable(theirs) != _comparable(ours[key]):
                raise ValueError(
                    f"{where}: param group {i} has {key}={theirs!r} in the state dict but "
                    f"{key}={ours[key]!r} here: its state belongs to another algorithm or layout "
                    "(allowed to differ, following the state dict as in torch: the rule's keys "
                    "such as lr, betas, weight_decay, and scale)"
                )


def restore_declared_placement(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """After torch's load: fill each group's missing declared keys with their defaults; give back
    integer codes and the parts' fixed-dtype keys their saved dtype (on the parameter's device),
    and move the parts' host keys to the CPU."""
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    for group in optimizer.param_groups:
        parts = group_parts(group)
        for name, hp in parts.hparams().items():
            group.setdefault(name, hp.default)
        for p, saved_id in zip(group["params"], saved_ids):
            fixed = frozenset().union(FEEDBACK_KEYS, *(part.fixed_dtype_keys(p.dtype) for part in parts.all()))
            host = frozenset().union(*(part.host_keys() for part in parts.all()))
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and key in host:
                    optimizer.state[p][key] = value.to(device="cpu")
                elif torch.is_tensor(value) and key != "step" and (not value.is_floating_point() or key in fixed):
                    optimizer.state[p][key] = value.to(device=p.device)


def _comparable(value: Any) -> Any:
    """A group value as saved and as given compare equal (a saved tuple may come back a list)."""
    return tuple(value) if isinstance(value, list) else value
