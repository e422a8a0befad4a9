"""Which modules of a model ``target_modules`` selects: the rule shared by the param-group
builders (:mod:`lowmem_optim.groups`) and INT8 conversion (:mod:`lowmem_optim.quant.int8_linear`).

``target_modules`` selects modules the way HF's ``optim_target_modules`` does: a list of name
fragments (a module matches when a fragment occurs in its name), a regex string (full match of
the module name), or ``"all-linear"`` (every selected module but the output head). A leaf of the
package: it imports no other module of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

#: output heads excluded from "all-linear" (HF excludes the model's output embedding)
_HEAD_NAMES = ("lm_head", "output", "classifier", "score")


def _head_weights(model: nn.Module) -> set[int]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return {id(head.weight)} if head is not None and getattr(head, "weight", None) is not None else set()


def _selector(target_modules: str | list[str] | tuple[str, ...]) -> Callable[[str], bool]:
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


def selected_modules(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...] = "all-linear",
    module_types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each module of ``module_types`` that ``target_modules`` selects
    (``"all-linear"`` spares the output head); also what INT8 conversion replaces."""
    selected = _selector(target_modules)
    heads = _head_weights(model) if target_modules == "all-linear" else set()
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, module_types) and selected(name) and id(module.weight) not in heads
    ]
