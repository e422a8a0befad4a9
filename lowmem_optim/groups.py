"""Param groups from a model: which weights are projected, which get the full-rank rule.

``target_modules`` selects ``nn.Linear`` modules the way HF's ``optim_target_modules`` does
(:mod:`lowmem_optim.selection`): a list of name fragments (a module matches when a fragment
occurs in its name), a regex string (full match of the module name), or ``"all-linear"`` (every
linear layer but the output head). Only the ``weight`` of a selected linear layer is low-rank; embeddings, the
output head, norms and biases land in the full-rank group. The normalized-momentum optimizers
(AuON, Hybrid-AuON, Muon) select linear and convolution weights the same way and send the
rest to their AdamW rule.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lowmem_optim.selection import selected_modules
from lowmem_optim.shapes import matrix_shape

#: the ``--target-modules`` syntax shared by the training and memory command lines
TARGET_MODULES_HELP = (
    "all-linear (every linear layer but the output head); re:<regex> (a full match of module "
    "names, e.g. re:.*self_attn.*); or comma-separated name fragments (a module matches when one "
    "occurs in its name, e.g. q_proj,v_proj or self_attn)"
)
_FRAGMENT = re.compile(r"[A-Za-z0-9_.]+")


def parse_target_modules(spec: str, flag: str = "--target-modules") -> str | list[str]:
    """The ``target_modules`` of a command-line value (:data:`TARGET_MODULES_HELP`); ValueError
    naming ``flag`` for a bad regex, an empty value, or a fragment that is a regex without ``re:``."""
    if spec == "all-linear":
        return spec
    if spec.startswith("re:"):
        try:
            re.compile(spec[3:])
        except re.error as err:
            raise ValueError(
                f"Invalid {flag}: {spec!r} is not a valid regular expression ({err}) (allowed: {TARGET_MODULES_HELP})"
            ) from None
        if not spec[3:]:
            raise ValueError(
                f"Invalid {flag}: {spec!r} is an empty regular expression (allowed: {TARGET_MODULES_HELP})"
            )
        return spec[3:]
    fragments = [fragment.strip() for fragment in spec.split(",") if fragment.strip()]
    bad = [f for f in fragments if not _FRAGMENT.fullmatch(f)]
    if bad or not fragments:
        hint = f"; a regular expression is written re:{spec}" if bad else ""
        raise ValueError(f"Invalid {flag}: {spec!r}{hint} (allowed: {TARGET_MODULES_HELP})")
    return fragments


def check_some_matrix_projected(model: nn.Module, target_modules: str | list[str], rank: int) -> None:
    """ValueError naming ``--rank`` when ``rank`` >= min(rows, cols) of every selected matrix:
    nothing would be projected."""
    min_dims = [min(matrix_shape(module.weight)) for _, module in selected_modules(model, target_modules)]
    if min_dims and not any(rank < d for d in min_dims):
        raise ValueError(
            f"Invalid --rank: {rank} is >= min(rows, cols) of every low-rank matrix (largest: "
            f"{max(min_dims)}), so nothing would be projected (allowed: --rank < {max(min_dims)})"
        )


def matrix_param_groups(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...] = "all-linear",
    *,
    module_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    rest: dict[str, Any] | None = None,
    **matrix_kwargs: Any,
) -> list[dict[str, Any]]:
    """``[{"params": rest..., **rest}, {"params": matrices..., **matrix_kwargs}]`` for ``model``.

    The matrices are the ``weight`` of each module of ``module_types`` selected by
    ``target_modules``; every other trainable parameter lands in the first group (omitted when
    empty). Each group carries ``param_names``. Tied weights appear once. Raises ValueError
    when no module matches.
    """
    matrix_ids = {id(module.weight) for _, module in selected_modules(model, target_modules, module_types)}
    if not matrix_ids:
        candidates = [n for n, m in model.named_modules() if isinstance(m, module_types)]
        kinds = "/".join(f"nn.{t.__name__}" for t in module_types)
        raise ValueError(
            f"target_modules={target_modules!r} matched no {kinds} module of {type(model).__name__}; "
            f"its {kinds} modules are: {', '.join(candidates[:8]) or 'none'}{' ...' if len(candidates) > 8 else ''}"
        )
    other: list[torch.nn.Parameter] = []
    other_names: list[str] = []
    matrices: list[torch.nn.Parameter] = []
    matrix_names: list[str] = []
    for name, param in model.named_parameters():  # named_parameters yields tied weights once
        if not param.requires_grad:
            continue
        params, names = (matrices, matrix_names) if id(param) in matrix_ids else (other, other_names)
        params.append(param)
        names.append(name)
    groups = [{"params": matrices, "param_names": matrix_names, **matrix_kwargs}]
    if other:
        groups.insert(0, {"params": other, "param_names": other_names, **(rest or {})})
    return groups


def lowrank_param_groups(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...] = "all-linear",
    **lowrank_kwargs: Any,
) -> list[dict[str, Any]]:
    """``[{"params": full-rank...}, {"params": low-rank..., "rank": ..., ...}]`` for ``model``.

    ``lowrank_kwargs`` (``rank`` required; ``update_proj_gap``, ``scale``, ``proj_type``, ...)
    go to the low-rank group, made of the selected ``nn.Linear`` weights. Each group carries
    ``param_names``. Tied weights appear once. Raises ValueError when no linear layer matches.
    """
    if lowrank_kwargs.get("rank") is None:
        raise ValueError("lowrank_param_groups: 'rank' is required (an int >= 1)")
    return matrix_param_groups(model, target_modules, **lowrank_kwargs)


#: the hidden weights AuON, Hybrid-AuON and Muon update: linear layers and convolutions
NORMALIZED_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def normalized_param_groups(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...] = "all-linear",
    **matrix_kwargs: Any,
) -> list[dict[str, Any]]:
    """Groups for :class:`~lowmem_optim.AuON`, :class:`~lowmem_optim.HybridAuON` and
    :class:`~lowmem_optim.Muon`: ``[{"params": ..., "rule": "adam"}, {"params": matrices...}]``.

    The matrices are the weights of the selected linear and convolution layers (conv weights
    are updated as (out, -1) matrices); embeddings, the output head (excluded by
    ``"all-linear"``), norms and biases get the optimizer's AdamW rule. ``matrix_kwargs``
    (``lr``, ``rank``, ...) go to the matrix group.
    """
    return matrix_param_groups(
        model, target_modules, module_types=NORMALIZED_MODULE_TYPES, rest={"rule": "adam"}, **matrix_kwargs
    )
