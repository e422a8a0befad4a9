"""The engine: one optimizer loop that composes a projector, an inner rule and a refresh schedule.

For a parameter W in a group with ``rank`` (a low-rank group), with gradient G viewed as a
matrix (m x n; N-D weights as (shape[0], -1)), at step t:

    1. schedule:  refresh due at t?  then  projector.refresh(G) -> new subspace in state,
                  schedule.record(...), rule.carry(...) (how moments enter the new subspace)
    2. projector: R = project(G)                  (r x n, m x r or r x r)
    3. rule:      N, lr_t = update(R)             (Adam, Adafactor, 8-bit Adam, ...)
    4. form:      U = back_project(N) by default; Fira's and APOLLO's forms add or use G scaled by
                  statistics of N and R (:mod:`lowmem_optim.update_forms`)
                  (U in the weight's dtype for bfloat16 weights: :func:`.param_step.back_projection_dtype`)
    5. engine:    W <- W (1 - lr_t wd);  W <- W - scale * U

With ``error_feedback`` (:mod:`lowmem_optim.projection.feedback`), steps 1 and 2 see
A = G + E instead of G, and E <- A - back_project(R) is kept for the next step.

Groups without ``rank`` skip 1, 2 and 4: the rule on the full gradient (for
the Adam rule, exactly ``torch.optim.AdamW``). Which parts a group uses is named by its
``rule``, ``proj_method``, ``refresh`` and ``update_form`` keys, looked up in the registries of
:mod:`lowmem_optim.rules`, :mod:`lowmem_optim.projection`, :mod:`lowmem_optim.schedules` and
:mod:`lowmem_optim.update_forms`.
Every other key is declared by the part that reads it (:mod:`lowmem_optim.parts`), and the
engine validates a group and fills its defaults from those declarations; the named
optimizers in :mod:`lowmem_optim.optimizers` only choose parts and defaults.

State is data: every per-parameter entry is a tensor or a plain number, so ``state_dict`` needs
no custom code beyond keeping integer codes and fixed-precision keys out of torch's
cast-to-param-dtype on load.

The rooms: :mod:`.optimizer` (the class: groups, ``step``, ``step_param``), :mod:`.param_step`
(one parameter's step), :mod:`.split_step` (that step in three calls, for low-rank
accumulation), :mod:`.index` (where each parameter sits, in O(1)), :mod:`.declarations` and
:mod:`.validation` (what a group may hold, its checks and the generated docs), :mod:`.state_io`
(loading a state dict), :mod:`.statistics` (what is logged), :mod:`.sharding_policy` (which rows
each rank steps under FSDP2).
"""

from lowmem_optim.engine.declarations import ENGINE_HPARAMS, group_parts, lowrank_hparams
from lowmem_optim.engine.optimizer import ComposedOptimizer
from lowmem_optim.engine.sharding_policy import splits_projected_rows
from lowmem_optim.engine.validation import declared_defaults, hparams_doc
from lowmem_optim.shapes import matrix_shape, uses_projection

__all__ = [
    "ENGINE_HPARAMS",
    "ComposedOptimizer",
    "declared_defaults",
    "group_parts",
    "hparams_doc",
    "lowrank_hparams",
    "matrix_shape",
    "splits_projected_rows",
    "uses_projection",
]
