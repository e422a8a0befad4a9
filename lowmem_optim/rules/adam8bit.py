"""8-bit AdamW's rule (Dettmers et al., ICLR 2022): Adam with blockwise-quantized moments.

Same equations as :mod:`lowmem_optim.rules.adam`; between steps M and V are stored as uint8
codes of bitsandbytes' dynamic map (signed for M, unsigned for V) with one float32 absmax per
block of 256 values. Each step dequantizes to float32, applies Adam, and re-quantizes. Tensors
with fewer than ``min_8bit_size`` elements keep float32 moments (bitsandbytes' convention:
quantizing them saves little and costs accuracy). Works wherever bitsandbytes' blockwise
kernels do: CPU and CUDA.
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem_optim.quant.blockwise import dequantize_blockwise, quantize_blockwise
from lowmem_optim.rules.adam import adam_update
from lowmem_optim.rules.base import SubspaceChange, check_betas, check_nonnegative, reindex_along

_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (key, signed dynamic map)


class Adam8bitRule:
    fixed_dtype_keys: frozenset[str] = frozenset(
        {"exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"}
    )

    def validate(self, group: dict[str, Any]) -> None:
        check_betas(group)
        check_nonnegative(group, "lr", "eps", "weight_decay")
        size = group.get("min_8bit_size", 4096)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"Invalid min_8bit_size: {size!r} (allowed: an int >= 0)")

    def _load(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        return tuple(  # type: ignore[return-value]
            dequantize_blockwise(state[f"{key}_codes"], state[f"{key}_absmax"], signed)
            for key, signed in _MOMENTS
        )

    def _store(self, state: dict[str, Any], moments: tuple[torch.Tensor, torch.Tensor]) -> None:
        if "exp_avg" in state:
            return  # float32 moments were updated in place
        for (key, signed), value in zip(_MOMENTS, moments):
            state[f"{key}_codes"], state[f"{key}_absmax"] = quantize_blockwise(value, signed)

    def update(
        self, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any], param: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        if "exp_avg" not in state and "exp_avg_codes" not in state:
            zeros = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            if g.numel() < group.get("min_8bit_size", 4096):
                state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
            else:
                self._store(state, (zeros, zeros))
        exp_avg, exp_avg_sq = self._load(state)
        beta1, beta2 = group["betas"]
        update = adam_update(
            g.float(), exp_avg, exp_avg_sq, int(state["step"]), group["lr"], beta1, beta2, group["eps"]
        )
        self._store(state, (exp_avg, exp_avg_sq))
        return update, group["lr"]

    def carry(self, state: dict[str, Any], change: SubspaceChange, dim: int) -> None:
        if change.kept is None or not ("exp_avg" in state or "exp_avg_codes" in state):
            return
        moments = tuple(reindex_along(m, change.kept, dim) for m in self._load(state))
        if "exp_avg" in state:
            state["exp_avg"], state["exp_avg_sq"] = moments
        else:
            self._store(state, moments)
