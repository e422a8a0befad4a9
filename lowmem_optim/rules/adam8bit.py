"""8-bit AdamW's rule (Dettmers et al., ICLR 2022): Adam with blockwise-quantized moments.

Same equations as :mod:`lowmem_optim.rules.adam`; between steps M and V are stored as uint8
codes of bitsandbytes' dynamic map (signed for M, unsigned for V) with one float32 absmax per
block of 256 values. Each step dequantizes to float32, applies Adam, and re-quantizes. Tensors
with fewer than ``min_8bit_size`` elements keep float32 moments (bitsandbytes' convention:
quantizing them saves little and costs accuracy). Works wherever bitsandbytes' blockwise
kernels do: CPU and CUDA.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem_optim.parts import HParam, Part, SubspaceChange, integer
from lowmem_optim.quant.blockwise import BLOCKSIZE, dequantize_blockwise, quantize_blockwise
from lowmem_optim.rules.adam import AdamRule, adam_update
from lowmem_optim.rules.base import reindex_along
from lowmem_optim.sharding import RowShard, StateLayout, global_numel

_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (key, signed dynamic map)
#: values per pass of an 8-bit step: bounds its float32 workspace (a few copies of one chunk)
#: whatever the tensor's size (a 7B model's embedding has 131M values); a multiple of the
#: block, so codes and absmax come out as from one pass over the whole tensor
_CHUNK = 1 << 22


MIN_8BIT_SIZE = HParam("min_8bit_size", 4096, integer(0), "tensors with fewer values keep float32 moments")


class Adam8bitRule(Part):
    hparams = (*AdamRule.hparams, MIN_8BIT_SIZE)

    def fixed_dtype_keys(self, param_dtype: torch.dtype) -> frozenset[str]:
        # float32 moments of small tensors and the absmax scales; the codes are integers
        return frozenset({"exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"})

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        numel = math.prod(shape)
        if numel < group["min_8bit_size"]:
            return 8 * numel
        return 2 * numel + 8 * math.ceil(numel / BLOCKSIZE)  # uint8 codes, float32 absmax per block

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        numel = math.prod(shape)
        if numel < group["min_8bit_size"]:
            return 8 * numel  # float32 denominator and update
        # the float32 update, and per chunk: g in fp32, both moments dequantized, denominator,
        # the chunk's update, new codes
        return 4 * numel + 22 * min(numel, _CHUNK)

    def _load(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        return tuple(  # type: ignore[return-value]
            dequantize_blockwise(state[f"{key}_codes"], state[f"{key}_absmax"], signed) for key, signed in _MOMENTS
        )

    def _store(self, state: dict[str, Any], moments: tuple[torch.Tensor, torch.Tensor]) -> None:
        if "exp_avg" in state:
            return  # float32 moments were updated in place
        for (key, signed), value in zip(_MOMENTS, moments):
            state[f"{key}_codes"], state[f"{key}_absmax"] = quantize_blockwise(value, signed)

    def sharded_layout(self, dim: int) -> StateLayout:
        """Moments and codes have the rows of g; each absmax covers 256 of this rank's codes
        (blocks are cut on the local rows: :func:`lowmem_optim.sharding.wrap_blocks`)."""
        return StateLayout(
            rows=frozenset({"exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes"}),
            blocks=tuple((f"{key}_absmax", f"{key}_codes", BLOCKSIZE) for key, _ in _MOMENTS),
        )

    def update(
        self,
        g: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        param: torch.Tensor,
        shard: RowShard | None = None,
    ) -> tuple[torch.Tensor, float]:
        fresh = "exp_avg" not in state and "exp_avg_codes" not in state
        if fresh and global_numel(g, shard) < group["min_8bit_size"]:
            zeros = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
        beta1, beta2 = group["betas"]
        args = (int(state["step"]), group["lr"], beta1, beta2, group["eps"])
        if "exp_avg" in state:  # float32 moments, updated in place
            return adam_update(g.float(), state["exp_avg"], state["exp_avg_sq"], *args), group["lr"]
        if fresh:
            for key, _ in _MOMENTS:
                state[f"{key}_codes"] = torch.empty(g.shape, dtype=torch.uint8, device=g.device)
                state[f"{key}_absmax"] = g.new_empty(-(-g.numel() // BLOCKSIZE), dtype=torch.float32)
        update = torch.empty(g.shape, dtype=torch.float32, device=g.device)
        for start in range(0, g.numel(), _CHUNK):
            part, blocks = slice(start, start + _CHUNK), slice(start // BLOCKSIZE, (start + _CHUNK) // BLOCKSIZE)
            codes = [state[f"{key}_codes"].view(-1)[part] for key, _ in _MOMENTS]
            absmax = [state[f"{key}_absmax"][blocks] for key, _ in _MOMENTS]
            moments = [
                torch.zeros(c.shape, dtype=torch.float32, device=g.device)
                if fresh
                else dequantize_blockwise(c, a, signed)
                for c, a, (_, signed) in zip(codes, absmax, _MOMENTS)
            ]
            update.view(-1)[part] = adam_update(g.reshape(-1)[part].float(), *moments, *args)
            for c, a, m, (_, signed) in zip(codes, absmax, moments, _MOMENTS):
                c[:], a[:] = quantize_blockwise(m, signed)
        return update, group["lr"]

    def carry(self, state: dict[str, Any], change: SubspaceChange, dim: int, shard: RowShard | None = None) -> None:
        if change.kept is None or not ("exp_avg" in state or "exp_avg_codes" in state):
            return
        moments = tuple(reindex_along(m, change.kept, dim, shard) for m in self._load(state))
        if "exp_avg" in state:
            state["exp_avg"], state["exp_avg_sq"] = moments
        else:
            self._store(state, moments)
