"""The named optimizers: compositions of the engine's parts with their papers' defaults.

Each class only chooses an inner rule and defaults; the loop is :class:`LowRankOptimizer`'s.
Param groups follow galore-torch: a group with ``rank`` is projected (keys ``rank``,
``update_proj_gap``, ``scale``, ``proj_type``), a group without it gets the plain full-rank
rule. Hyperparameter names and defaults follow ``torch.optim.AdamW`` (note: galore-torch's
GaLoreAdamW defaulted to ``weight_decay=0`` and ``eps=1e-6``; ours are torch's ``1e-2`` and
``1e-8``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lowmem_optim.engine import LOWRANK_DEFAULTS, LowRankOptimizer


def _lowrank(rank: int | None, update_proj_gap: int, scale: float, proj_type: str, **more: Any) -> dict[str, Any]:
    return {**LOWRANK_DEFAULTS, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
            "proj_type": proj_type, **more}


class GaLoreAdamW(LowRankOptimizer):
    """GaLore with AdamW in the subspace (Zhao et al., ICML 2024, arXiv 2403.03507).

    For a low-rank group, with P the top-r singular vectors of G refreshed every
    ``update_proj_gap`` steps:  R = P^T G;  N = Adam(R);  W <- W (1 - lr wd) - scale * P N.
    ``rank`` given here applies to every group that does not override it (use it only when
    every parameter is a matrix); normally pass it per group, e.g. via
    :func:`lowmem_optim.lowrank_param_groups`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        proj_method: str = "svd",
        refresh: str = "fixed",
        seed: int = 0,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rule="adam",
                        **_lowrank(rank, update_proj_gap, scale, proj_type, proj_method=proj_method,
                                   refresh=refresh, seed=seed))
        super().__init__(params, defaults)


class GaLoreAdamW8bit(LowRankOptimizer):
    """GaLore with 8-bit AdamW in the subspace: Adam's moments stored blockwise-quantized
    (uint8 codes + one float32 absmax per 256 values, bitsandbytes' dynamic map). CPU and CUDA.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = 4096,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        proj_method: str = "svd",
        refresh: str = "fixed",
        seed: int = 0,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rule="adam8bit",
                        min_8bit_size=min_8bit_size,
                        **_lowrank(rank, update_proj_gap, scale, proj_type, proj_method=proj_method,
                                   refresh=refresh, seed=seed))
        super().__init__(params, defaults)


class GaLoreAdafactor(LowRankOptimizer):
    """GaLore with HF transformers' Adafactor in the subspace (factored second moment,
    relative step size by default: ``lr=None``, ``relative_step=True``)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        proj_method: str = "svd",
        refresh: str = "fixed",
        seed: int = 0,
    ) -> None:
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init, rule="adafactor",
                        **_lowrank(rank, update_proj_gap, scale, proj_type, proj_method=proj_method,
                                   refresh=refresh, seed=seed))
        super().__init__(params, defaults)
