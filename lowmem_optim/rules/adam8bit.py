"""8-bit AdamW's rule (Dettmers et al., ICLR 2022): Adam with blockwise-quantized moments.

Same equations as :mod:`lowmem_optim.rules.adam`; between steps M and V are stored as uint8
codes of bitsandbytes' dynamic map (signed for M, unsigned for V) with one float32 absmax per
block of 256 values. Each step dequantizes to float32, applies Adam, and re-quantizes, in
chunks of ``_CHUNK`` values. Tensors with fewer than ``min_8bit_size`` elements keep float32
moments (bitsandbytes' convention: quantizing them saves little and costs accuracy). Works
wherever bitsandbytes' blockwise kernels do: CPU and CUDA.

This is bitsandbytes' own 8-bit blockwise state (its ``AdamW8bit``: the same two maps, blocks of
256 values, a float32 absmax each), so on CUDA one call of its fused kernel
(``bitsandbytes.functional.optimizer_update_8bit_blockwise``: dequantize, update, re-quantize in
registers) replaces the eager passes: for a full-rank parameter it also applies the decay and
the update to the weight (no float32 update of the weight's size), for a projected gradient it
writes the update into a zeroed buffer. Elsewhere the eager code runs, the reference: the kernel
agrees with it up to float32 rounding and the codes that rounding moves. Where bitsandbytes
differs by design: it decays after the update, W' = (W - u)(1 - lr wd) (a difference of
lr wd u), and at an entry whose gradient is inf/NaN it leaves the weight and zeroes the moments
(the eager code lets the value through).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem_optim.parts import HParam, Part, SubspaceChange, integer
from lowmem_optim.quant.blockwise import BLOCKSIZE, dequantize_blockwise, dynamic_map, quantize_blockwise
from lowmem_optim.rules.adam import AdamRule, adam_update
from lowmem_optim.rules.base import reindex_along
from lowmem_optim.sharding import RowShard, StateLayout, global_numel, is_dtensor

_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (key, signed dynamic map)
#: values per pass of an 8-bit step: bounds its float32 workspace (a few copies of one chunk)
#: whatever the tensor's size (a 7B model's embedding has 131M values); a multiple of the
#: block, so codes and absmax come out as from one pass over the whole tensor
_CHUNK = 1 << 22


def _chunk_bytes(numel: int, dtype: torch.dtype) -> int:
    """The eager chunks' peak, at the denominator of Adam (:func:`adam_update`): g's float32 copy
    (none when g is float32), g clamped, both moments dequantized, sqrt(V) and the denominator;
    from the second chunk on, the previous chunk's update and last moment too, which the loop's
    names hold until they are rebound (measured: :class:`lowmem_optim.tools.op_count.OpCounter`)."""
    per_value = 20 if dtype == torch.float32 else 24
    first = per_value * min(numel, _CHUNK)
    later = per_value * min(numel - _CHUNK, _CHUNK) + 8 * _CHUNK if numel > _CHUNK else 0
    return max(first, later)


def _apply_(w: torch.Tensor, update: torch.Tensor, decay: float) -> None:
    """w <- w decay - update, as the engine applies a rule's update (the decay skipped at 1)."""
    if decay != 1:
        w.mul_(decay)
    w.sub_(update.view(w.shape))


def _adam_args(state: dict[str, Any], group: dict[str, Any]) -> tuple[int, float, float, float, float]:
    beta1, beta2 = group["betas"]
    return int(state["step"]), group["lr"], beta1, beta2, group["eps"]


def fuses(p: torch.Tensor, g: torch.Tensor, state: dict[str, Any]) -> bool:
    """Whether :func:`fused_adam8bit_` runs for this tensor: on CUDA (elsewhere the eager code is
    the reference), with ``g`` of ``p``'s dtype, one that the kernel reads, and the codes and
    absmax contiguous (the kernel walks them as flat arrays)."""
    return (
        p.is_cuda
        and g.dtype == p.dtype
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and all(state[f"{key}_{part}"].is_contiguous() for key, _ in _MOMENTS for part in ("codes", "absmax"))
    )


def fused_adam8bit_(
    p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any], lr: float, weight_decay: float
) -> None:
    """bitsandbytes' fused blockwise 8-bit Adam on this rule's state, in place:
    p <- p (1 - lr weight_decay) - lr Adam(g), the codes and absmax of both moments updated
    (``state['step']`` already advanced; ``p`` and ``g`` contiguous, of one dtype)."""
    import bitsandbytes.functional as bnbf  # optional dependency: imported where it is used

    beta1, beta2 = group["betas"]
    bnbf.optimizer_update_8bit_blockwise(
        "adam",
        g,
        p,
        state["exp_avg_codes"],
        state["exp_avg_sq_codes"],
        beta1,
        beta2,
        0.0,
        0.0,
        group["eps"],
        int(state["step"]),
        lr,
        dynamic_map(True, p.device),
        dynamic_map(False, p.device),
        state["exp_avg_absmax"],
        state["exp_avg_sq_absmax"],
        weight_decay=weight_decay,
    )


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
        return 4 * numel + _chunk_bytes(numel, dtype)  # the float32 update, and the chunks'

    def update_dtype(self, dtype: torch.dtype, group: dict[str, Any]) -> torch.dtype:
        return torch.float32  # dequantized moments: the update is float32 whatever g's dtype

    def step_in_place_workspace_bytes(
        self, params: list[tuple[tuple[int, ...], torch.dtype]], group: dict[str, Any]
    ) -> int:
        """One parameter at a time, each chunk's update applied to the weight as it comes (the
        eager code; bitsandbytes' CUDA kernel allocates nothing)."""
        sizes = [(math.prod(shape), dtype) for shape, dtype in params]
        return max((8 * n if n < group["min_8bit_size"] else _chunk_bytes(n, dtype) for n, dtype in sizes), default=0)

    def can_step_in_place(self, param: torch.Tensor, grad: torch.Tensor) -> bool:
        """A plain contiguous dense tensor (not FSDP2-sharded, not one that applies its own
        updates, as an INT8 weight)."""
        return (
            not hasattr(param, "apply_update")
            and not is_dtensor(param)
            and not grad.is_sparse
            and param.is_contiguous()
            and grad.is_floating_point()
        )

    def step_in_place(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        group: dict[str, Any],
    ) -> None:
        """W <- W (1 - lr wd) - Adam8bit(g), one parameter after the other: bitsandbytes' fused
        kernel on CUDA (module docstring), elsewhere the eager chunks, each applied to its slice
        of W as it comes, so no float32 update of W's size exists."""
        for p, g, state in zip(params, grads, states):
            state["step"] += 1
            self._init(g, state, group)
            decay = 1 - group["lr"] * group["weight_decay"]
            if "exp_avg" in state:  # float32 moments of a small tensor
                update = adam_update(g.float(), state["exp_avg"], state["exp_avg_sq"], *_adam_args(state, group))
                _apply_(p, update, decay)
            elif fuses(p, g, state):
                fused_adam8bit_(p, g, state, group, group["lr"], group["weight_decay"])
            else:
                self._chunks(g, state, group, p.view(-1), decay)

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

    def _init(
        self, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any], shard: RowShard | None = None
    ) -> None:
        """First use: float32 moments for a small tensor, else zeroed codes and absmax (which
        dequantize to zero moments)."""
        if "exp_avg" in state or "exp_avg_codes" in state:
            return
        if global_numel(g, shard) < group["min_8bit_size"]:
            zeros = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
            return
        for key, _ in _MOMENTS:
            state[f"{key}_codes"] = torch.zeros(g.shape, dtype=torch.uint8, device=g.device)
            state[f"{key}_absmax"] = g.new_zeros(-(-g.numel() // BLOCKSIZE), dtype=torch.float32)

    def update(
        self,
        g: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        param: torch.Tensor,
        shard: RowShard | None = None,
        seed: int = 0,
    ) -> tuple[torch.Tensor, float]:
        self._init(g, state, group, shard)
        if "exp_avg" in state:  # float32 moments, updated in place
            return adam_update(g.float(), state["exp_avg"], state["exp_avg_sq"], *_adam_args(state, group)), group["lr"]
        update = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
        if fuses(update, update, state):  # the kernel adds lr * Adam(g) to a zeroed "weight": the update
            fused_adam8bit_(update, g.float().contiguous(), state, group, -group["lr"], 0.0)
        else:
            self._chunks(g, state, group, update.view(-1), None)
        return update, group["lr"]

    def _chunks(
        self, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any], target: torch.Tensor, decay: float | None
    ) -> None:
        """The eager step over 8-bit moments, ``_CHUNK`` values at a time: each chunk's update
        is written into the flat ``target`` (``decay`` None) or applied to it (target <- target
        decay - update: the weight itself)."""
        args = _adam_args(state, group)
        fresh = int(state["step"]) == 1  # zero moments: nothing to dequantize
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
            update = adam_update(g.reshape(-1)[part].float(), *moments, *args)
            if decay is None:
                target[part] = update
            else:
                _apply_(target[part], update, decay)
            for c, a, m, (_, signed) in zip(codes, absmax, moments, _MOMENTS):
                c[:], a[:] = quantize_blockwise(m, signed)

    def carry(self, state: dict[str, Any], change: SubspaceChange, dim: int, shard: RowShard | None = None) -> None:
        if change.kept is None or not ("exp_avg" in state or "exp_avg_codes" in state):
            return
        moments = tuple(reindex_along(m, change.kept, dim, shard) for m in self._load(state))
        if "exp_avg" in state:
            state["exp_avg"], state["exp_avg_sq"] = moments
        else:
            self._store(state, moments)
