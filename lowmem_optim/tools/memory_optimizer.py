"""The optimizer's side of the memory model (:mod:`lowmem_optim.tools.memory`): per parameter, the
bytes of its state, its share of the projections and of the accumulation buffers, and the
workspace of its update (one projected update's phases: refresh, project, error feedback, the
rule, back-project and apply), read from the parts' declarations of the optimizer built on the
model skeleton."""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem_optim.engine import ComposedOptimizer, group_parts, matrix_shape, uses_projection
from lowmem_optim.engine.declarations import Parts
from lowmem_optim.finite import all_finite_bytes
from lowmem_optim.layerwise import (
    accumulation_workspace_bytes,
    buffer_bytes,
    check_lowrank_accumulation,
)
from lowmem_optim.projection.base import projected_shape
from lowmem_optim.projection.feedback import error_dtype, feedback_bytes, feedback_workspace_bytes
from lowmem_optim.quant.int8_linear import UPDATE_CHUNK, Int8Weight
from lowmem_optim.rules.adam8bit import Adam8bitRule


# ---- optimizer state, per parameter: the engine's step counter, and what each part reports ------
def _baseline_state_bytes(name: str, param: torch.Tensor, optimizer: torch.optim.Optimizer) -> int:
    if name == "adamw":  # torch.optim.AdamW: moments like the parameter, float32 step tensor
        return 2 * param.numel() * param.element_size() + 4
    if name == "adamw8bit":  # bitsandbytes: uint8 states + float32 absmax per 256, float32 when small
        group = {"min_8bit_size": optimizer.args.min_8bit_size}
        return Adam8bitRule().state_bytes(tuple(param.shape), param.dtype, group)
    raise ValueError(
        f"Invalid optimizer for the memory model: {name!r} (allowed: adamw, adamw8bit, or an optimizer of lowmem_optim)"
    )


def _int8_chunk_bytes(param: torch.Tensor) -> int:
    # dequantized fp32 weight, update, scaled values, int64 counters, uniform draws and their
    # floor, per chunk: 32 bytes per value at their peak, and the new scale and zero with the
    # groups' float32 min and max (16 bytes per group), as measured by following every storage
    if not isinstance(param, Int8Weight):
        return 0
    chunk = min(param.numel(), UPDATE_CHUNK)
    return 32 * chunk + 16 * math.ceil(chunk / param.group_size)


def _projected_workspace(p: torch.Tensor, group: dict[str, Any], parts: Parts, shape: tuple[int, ...]) -> int:
    """The peak of one projected update's temporaries, the largest of its phases. R = P^T G (in
    the gradient's dtype) stays alive from the projection to the end of the step, N = rule(R)
    from the rule on, and with error feedback A = G + E (float32) and its cast to G's dtype
    from the start (as measured by following every storage, the replaced state's old tensors
    freed as they are replaced: :class:`lowmem_optim.tools.op_count.OpCounter`):

        check           the gradient's finiteness check before a refresh that runs every step
        refresh         (A +) the projector's refresh, where it runs every step (the DCT's spectrum)
        project         the basis the projector regenerates or dequantizes + R
        store E         A + R + P R (float32 or G's dtype) and E_t = A - P R, then E_t and its
                        quantization's temporaries (the previous buffer held until replaced);
                        loading E_{t-1} allocates less
        rule            (A +) R + the rule's temporaries (N among them), or those of its read of
                        the weight (Adafactor's RMS(W) of a bfloat16 weight: a float32 copy)
        back-project    (A +) R + N + U (m x n, in the weight's dtype for bfloat16, else N's) + the
                        form's temporaries (Fira's residual, APOLLO's factors) + while P N is made,
                        the regenerated basis and N's cast to U's dtype (forms that back-project N)
        apply           (A +) R + N + U + an INT8 weight's re-quantization chunk"""
    matrix = matrix_shape(p)
    dtype, numel, low = p.dtype, p.numel(), math.prod(shape)
    projected_grad = low * dtype.itemsize
    regenerated = parts.projector.workspace_bytes(matrix, dtype, group)
    refresh = parts.projector.refresh_workspace_bytes(matrix, dtype, group)
    update_dtype = parts.rule.update_dtype(dtype, group)
    full_dtype = torch.bfloat16 if dtype == torch.bfloat16 else update_dtype  # the engine's back_projection_dtype
    update = parts.rule.update_bytes(shape, dtype, group)
    full = numel * full_dtype.itemsize
    # an INT8 weight's RMS (Adafactor) is read chunk by chunk, below its update's chunk
    weight_read = 0 if isinstance(p, Int8Weight) else parts.rule.weight_workspace_bytes(matrix, shape, dtype, group)
    back = full + parts.form.workspace_bytes(matrix, dtype, group)
    if parts.form.adds_projected:
        back += regenerated + (low * full_dtype.itemsize if full_dtype != update_dtype else 0)
    held, phases = 0, [regenerated + projected_grad]
    feedback = group["error_feedback"]
    if feedback is not None:
        error = numel * error_dtype(dtype).itemsize
        held = error + (numel * dtype.itemsize if error_dtype(dtype) != dtype else 0)
        store = max(
            regenerated + numel * dtype.itemsize,  # P R, in R's dtype
            numel * dtype.itemsize + error,  # E_t = A - P R
            error + feedback_workspace_bytes(feedback, matrix, dtype),
        )
        phases.append(held + projected_grad + store)
    phases += [
        held + refresh,
        # a refresh modelled every step (the DCT's) is preceded by the gradient's finiteness check
        all_finite_bytes(matrix, dtype) if refresh else 0,
        held + projected_grad + max(parts.rule.workspace_bytes(shape, dtype, group), weight_read),
        held + projected_grad + update + back,
        held + projected_grad + update + full + _int8_chunk_bytes(p),
    ]
    return max(phases)


def optimizer_memory(
    optimizer_name: str,
    optimizer: torch.optim.Optimizer,
    layer_params: frozenset[int] = frozenset(),
    accumulation: str | None = None,
    early_params: frozenset[int] = frozenset(),
) -> dict[str, int]:
    """Predicted ``optimizer_states``, ``projections``, ``gradients`` (all, and the largest),
    ``workspace`` (the largest update's) and ``step_peak`` / ``layer_step_peak`` (the largest
    gradient + workspace of one update, of a parameter outside / inside the decoder layers
    whose ids are ``layer_params``) bytes for the optimizer's groups (adaptive queues full).

    With layer-wise ``accumulation`` (an ``accumulation_buffer``; None: one micro-batch per
    step): ``held_gradients``, the gradients kept in ``.grad`` across micro-batches (every
    parameter's with "full" or an optimizer that does not project; else the parameters that are
    not projected), ``early_held_gradients``, those of them whose parameters' ids are in
    ``early_params`` (stepped in the last micro-batch before backward reaches the decoder
    layers: the head, the final norm), ``accumulation_buffers``, the projected parameters'
    buffers, and ``layer_write_peak``, the largest gradient + buffer write workspace of a
    decoder layer's parameter. A held gradient is already counted, so its update adds only its
    workspace to a peak."""
    out = {
        "optimizer_states": 0,
        "projections": 0,
        "gradients": 0,
        "largest_gradient": 0,
        "workspace": 0,
        "step_peak": 0,
        "layer_step_peak": 0,
        "held_gradients": 0,
        "early_held_gradients": 0,
        "accumulation_buffers": 0,
        "layer_write_peak": 0,
    }
    if accumulation not in (None, "full") and isinstance(optimizer, ComposedOptimizer):
        # a setup the training loop refuses (error feedback, a scaled update form) has no estimate
        check_lowrank_accumulation(optimizer, [p for group in optimizer.param_groups for p in group["params"]])
    shared: dict[Any, int] = {}  # caches shared between parameters (the DCT basis), counted once
    together: dict[int, tuple[Any, dict[str, Any], list[Any]]] = {}  # per group, its parameters stepped in one call
    for group in optimizer.param_groups:
        parts = group_parts(group) if isinstance(optimizer, ComposedOptimizer) else None
        for p in group["params"]:
            grad = p.numel() * p.element_size()
            out["gradients"] += grad
            out["largest_gradient"] = max(out["largest_gradient"], grad)
            peak = "layer_step_peak" if id(p) in layer_params else "step_peak"
            buffered = accumulation not in (None, "full") and parts is not None and uses_projection(p, group)
            held = accumulation is not None and not buffered
            out["held_gradients"] += grad if held else 0
            out["early_held_gradients"] += grad if held and id(p) in early_params else 0
            if parts is None:
                out["optimizer_states"] += _baseline_state_bytes(optimizer_name, p, optimizer)
                # torch's single-tensor AdamW: denominator and update like the parameter;
                # bitsandbytes' fused 8-bit kernel updates in place
                workspace = 2 * grad if optimizer_name == "adamw" else 0
                out["workspace"] = max(out["workspace"], workspace)
                out[peak] = max(out[peak], (0 if held else grad) + workspace)
                continue
            states = 4  # the step counter
            workspace = _int8_chunk_bytes(p)
            shape = tuple(p.shape)
            if uses_projection(p, group):
                matrix = matrix_shape(p)
                out["projections"] += parts.projector.state_bytes(matrix, p.dtype, group)
                shared.update(parts.projector.shared_bytes(matrix, p.dtype, group))
                states += parts.schedule.state_bytes(matrix, p.dtype, group)
                shape = projected_shape(matrix, group)
                if buffered:
                    low = math.prod(shape)
                    out["accumulation_buffers"] += buffer_bytes(accumulation, low, p.dtype)
                    if id(p) in layer_params:
                        write = grad + accumulation_workspace_bytes(accumulation, low, p.dtype)
                        out["layer_write_peak"] = max(out["layer_write_peak"], write)
                states += parts.form.state_bytes(matrix, p.dtype, group)
                workspace = _projected_workspace(p, group, parts, shape)  # the INT8 chunk among its phases
                if group["error_feedback"] is not None:
                    states += feedback_bytes(group["error_feedback"], matrix, p.dtype)
            states += parts.rule.state_bytes(shape, p.dtype, group)
            if not uses_projection(p, group) and parts.rule.can_step_in_place(p, p):
                workspace += parts.rule.step_in_place_workspace_bytes([(shape, p.dtype)], group)
                together.setdefault(id(group), (parts.rule, group, []))[2].append((shape, p.dtype))
            elif not uses_projection(p, group):
                workspace += parts.rule.workspace_bytes(shape, p.dtype, group)
            out["optimizer_states"] += states
            out["workspace"] = max(out["workspace"], workspace)
            out[peak] = max(out[peak], (0 if held else grad) + workspace)
    out["projections"] += sum(shared.values())
    for rule, group, params in together.values():
        out["workspace"] = max(out["workspace"], rule.step_in_place_workspace_bytes(params, group))
    return out
