"""Param groups from a model: which weights are projected, which get the full-rank rule.

``target_modules`` selects ``nn.Linear`` modules the way HF's ``optim_target_modules`` does:
a list of name fragments (a module matches when a fragment occurs in its name), a regex
string (full match of the module name), or ``"all-linear"`` (every linear layer but the
output head). Only the ``weight`` of a selected linear layer is low-rank; embeddings, the
output head, norms and biases land in the full-rank group.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

#: output heads excluded from "all-linear" (HF excludes the model's output embedding)
_HEAD_NAMES = ("lm_head", "output", "classifier", "score")


def _head_weights(model: nn.Module) -> set[int]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return {id(head.weight)} if head is not None and getattr(head, "weight", None) is not None else set()


def _selector(target_modules: str | list[str] | tuple[str, ...]):
    if target_modules == "all-linear":
        return lambda name: name.split(".")[-1] not in _HEAD_NAMES
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(target_modules, (list, tuple)) and target_modules and all(isinstance(t, str) for t in target_modules):
        return lambda name: any(fragment in name for fragment in target_modules)
    raise ValueError(
        f"Invalid target_modules: {target_modules!r} (allowed: a non-empty list of name fragments, "
        "a regex string, or 'all-linear')"
    )


def lowrank_param_groups(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...] = "all-linear",
    **lowrank_kwargs: Any,
) -> list[dict[str, Any]]:
    """``[{"params": full-rank...}, {"params": low-rank..., "rank": ..., ...}]`` for ``model``.

    ``lowrank_kwargs`` (``rank`` required; ``update_proj_gap``, ``scale``, ``proj_type``, ...)
    go to the low-rank group. Each group carries ``param_names``. Tied weights appear once.
    Raises ValueError when no linear layer matches.
    """
    if lowrank_kwargs.get("rank") is None:
        raise ValueError("lowrank_param_groups: 'rank' is required (an int >= 1)")
    selected = _selector(target_modules)
    heads = _head_weights(model) if target_modules == "all-linear" else set()
    lowrank_ids: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and selected(module_name) and id(module.weight) not in heads:
            lowrank_ids.add(id(module.weight))
    if not lowrank_ids:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear module of {type(model).__name__}; "
            f"its linear modules are: {', '.join(linear[:8]) or 'none'}{' ...' if len(linear) > 8 else ''}"
        )
    full: list[torch.nn.Parameter] = []
    full_names: list[str] = []
    low: list[torch.nn.Parameter] = []
    low_names: list[str] = []
    for name, param in model.named_parameters():  # named_parameters yields tied weights once
        if not param.requires_grad:
            continue
        params, names = (low, low_names) if id(param) in lowrank_ids else (full, full_names)
        params.append(param)
        names.append(name)
    groups = [{"params": low, "param_names": low_names, **lowrank_kwargs}]
    if full:
        groups.insert(0, {"params": full, "param_names": full_names})
    return groups
