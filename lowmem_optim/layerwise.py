"""Layer-wise updates: each parameter is stepped inside backward, then its gradient is freed.

GaLore's per-layer weight update (Zhao et al., 2024, section 4.3; also Lv et al.'s LOMO): a
hook registered with ``Tensor.register_post_accumulate_grad_hook`` runs as soon as a
parameter's gradient is complete, applies that parameter's share of the optimizer step and
sets ``param.grad = None``, so the gradients of the whole model never exist at once (peak
gradient memory: the largest few parameters, not all of them).

Usage (one optimizer holds all state, so its ``state_dict()`` is the real one and an LR
scheduler on it works unchanged)::

    optimizer = GaLoreAdamW(lowrank_param_groups(model, rank=128), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    handle = layerwise.attach(optimizer, accumulation_steps=4, accumulation_buffer="float32")
    for batch in loader:                       # one training step = accumulation_steps micro-batches
        for micro in split(batch, 4):
            (model(micro).loss / 4).backward()  # the last backward of a step updates every parameter
        scheduler.step()                       # once per training step, as without layer-wise
    handle.remove()                            # back to ordinary optimizer.step()

An optimizer is attached once (a second :func:`attach` is refused until ``handle.remove()``);
a param group added with ``optimizer.add_param_group`` while attached is hooked like the others.
Until ``handle.remove()``, the hooks keep the optimizer, its parameters and ``process_group``
alive even when nothing else refers to them: PyTorch holds a post-accumulate-grad hook where the
garbage collector cannot see it. Remove the handle before dropping them (between trials run in
one process, before ``destroy_process_group``); the training loop in ``train/`` does.

Never call ``optimizer.step()`` while attached: the hooks step and free each gradient
themselves, so a training stack that calls ``step()`` (HF ``Trainer``, accelerate, a loop with
``clip_grad_norm_`` or gradient accumulation of its own) would clip nothing and ignore its
accumulation. Such a call raises ``RuntimeError`` naming the reason; ``handle.remove()`` first,
or let the handle do accumulation and clipping.

Optimizers. Ours (:class:`~lowmem_optim.engine.ComposedOptimizer`) step one parameter with
``step_param``; its random draws (randomized SVD, stochastic rounding) are seeded per
parameter and step, so hook order does not matter and layer-wise and ordinary stepping give
the same parameters. Any other ``torch.optim.Optimizer`` (``torch.optim.AdamW``,
bitsandbytes' ``AdamW8bit``) is stepped for one parameter by calling its ``step()`` with its
param groups narrowed to that parameter for the call (per-parameter overrides registered with
bitsandbytes' ``GlobalOptimManager`` are looked up by position and are not supported).

Gradient accumulation (``accumulation_steps=k``), as ``accumulation_buffer`` chooses:

* ``"full"`` (the default): the hooks leave the gradient of the first k - 1 backward passes
  accumulating in ``param.grad`` (as ordinary training does) and step and free it in the k-th,
  so the result equals ordinary accumulation exactly; but during a step's first k - 1
  micro-batches every gradient exists, so the peak gradient memory is that of ordinary training.
* ``"float32"``, ``"bfloat16"`` or ``"8bit"`` (low-rank accumulation, with a
  :class:`~lowmem_optim.engine.ComposedOptimizer`): a projected parameter's hook projects its
  micro-batch gradient, R_j = project(G_j), adds it to a buffer of R's shape (r x n, m x r) and
  frees G_j; the k-th steps from sum_j R_j = project(sum_j G_j) (projection is linear). No full
  gradient of a projected parameter outlives its micro-batch. On a step where the subspace is
  refreshed, the first micro-batch's gradient G_1 chooses it (ordinary accumulation chooses it
  from the sum), and every micro-batch of the step is projected on that new subspace.
  Parameters that are not projected (embeddings, head, norms) accumulate in ``param.grad`` as
  with ``"full"``. ``"float32"`` buffers (the gradient's dtype when wider) give ordinary
  accumulation's result up to float rounding on steps without a refresh; ``"bfloat16"`` (2 bytes
  per value) and ``"8bit"`` (1 byte + a float32 scale per 256 values) round each partial sum
  stochastically, so the sum stays unbiased (:mod:`lowmem_optim.quant.stochastic`; seeded per
  parameter, step and micro-batch). The buffers live in the handle (``handle.buffers``), not in
  the optimizer state: they are allocated on a parameter's first micro-batch and reused, and hold
  nothing between steps, where checkpoints are taken. Refused (ValueError): groups with
  ``error_feedback`` or an ``update_form`` other than "projected" (both need the step's full
  gradient) and FSDP2-sharded parameters.
  With ``max_grad_norm`` a projected parameter's sum R is clipped by its own norm (the full
  gradient's norm is never known). With ``process_group``, the sum R is averaged over the ranks
  at the k-th micro-batch, and on a refresh step G_1 is averaged first, so every rank chooses
  the same subspace.

Micro-batches are counted per parameter: every parameter must receive a gradient in every
backward pass (true of a language model's forward).

Gradient clipping (``max_grad_norm``): per parameter, not global. Each gradient is scaled by
``min(1, max_grad_norm / (||g|| + 1e-6))`` with its own norm, i.e. what
``torch.nn.utils.clip_grad_norm_([p], max_grad_norm)`` does for that one parameter. A global
norm needs every gradient before the first update, which layer-wise stepping exists to avoid.

Data parallel: DDP all-reduces its gradient buckets after the hooks have run, so a
DDP-wrapped model would be stepped with each rank's local gradient and the ranks would drift.
Instead, do not wrap the model in DDP and pass ``process_group`` (e.g.
``torch.distributed.group.WORLD``): each hook then averages its gradient over the group with
a blocking all-reduce before stepping (one collective per parameter, no bucketing). Attaching
while torch.distributed is initialized with more than one rank and no ``process_group`` is an
error.

Handles also work with the INT8 weights of :mod:`lowmem_optim.quant.int8_linear`: their
gradient arrives in the proxy parameter like any other and ``step_param`` applies it to the
INT8 codes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from lowmem_optim.quant.blockwise import BLOCKSIZE, dequantize_blockwise
from lowmem_optim.quant.groupwise import round_keys
from lowmem_optim.quant.stochastic import CHUNK, ROUNDING_BYTES, quantize_blockwise_stochastic, round_bfloat16
from lowmem_optim.sharding import is_dtensor

#: values of ``accumulation_buffer``: "full" keeps full gradients in ``param.grad``; the others
#: accumulate projected gradients in buffers of that precision
ACCUMULATION_BUFFERS = ("full", "float32", "bfloat16", "8bit")


def exact_buffer_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """The "float32" buffer's dtype: float32, or the gradient's when wider (float64)."""
    return torch.promote_types(grad_dtype, torch.float32)


def buffer_bytes(kind: str, numel: int, grad_dtype: torch.dtype) -> int:
    """Bytes of one accumulation buffer of ``numel`` projected values (0 for "full")."""
    if kind == "float32":
        return numel * exact_buffer_dtype(grad_dtype).itemsize
    if kind == "bfloat16":
        return 2 * numel
    if kind == "8bit":
        return numel + 4 * -(-numel // BLOCKSIZE)
    return 0


def accumulation_workspace_bytes(kind: str, numel: int, grad_dtype: torch.dtype) -> int:
    """Transient bytes of one buffer write beyond the projection R itself: none for "float32"
    (added in place); the float32 sum and the stochastic rounding's per-pass temporaries
    (:data:`lowmem_optim.quant.stochastic.ROUNDING_BYTES`) otherwise."""
    if kind in ("full", "float32"):
        return 0
    return 4 * numel + ROUNDING_BYTES * min(numel, CHUNK)


class AccumulationBuffer:
    """The sum of one parameter's projected micro-batch gradients (r x n, m x r or r x r),
    allocated once and overwritten by each step's first micro-batch. ``kind``: "float32"
    (exact: float32 or the gradient's dtype when wider), "bfloat16", or "8bit" (signed blockwise
    codes with a float32 scale per 256 values); the last two round each partial sum
    stochastically (:mod:`lowmem_optim.quant.stochastic`), so the sum is unbiased."""

    def __init__(self, kind: str, like: torch.Tensor) -> None:
        self.kind = kind
        if kind == "8bit":
            blocks = -(-like.numel() // BLOCKSIZE)
            self.tensors = (
                torch.empty(like.shape, dtype=torch.uint8, device=like.device),
                torch.empty(blocks, dtype=torch.float32, device=like.device),
            )
        else:
            dtype = exact_buffer_dtype(like.dtype) if kind == "float32" else torch.bfloat16
            self.tensors = (torch.empty(like.shape, dtype=dtype, device=like.device),)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def _value(self, dtype: torch.dtype) -> torch.Tensor:
        if self.kind == "8bit":
            return dequantize_blockwise(*self.tensors, signed=True, dtype=dtype)
        return self.tensors[0].to(dtype)

    def write(self, low: torch.Tensor, first: bool, seed: int) -> None:
        """buffer <- low (``first``) or buffer + low, rounded with the draws of ``seed``."""
        if self.kind == "float32":
            self.tensors[0].copy_(low) if first else self.tensors[0].add_(low)
            return
        total = low.float() if first else self._value(torch.float32).add_(low)
        if self.kind == "bfloat16":
            self.tensors[0].copy_(round_bfloat16(total, round_keys(seed)))
        else:
            quantize_blockwise_stochastic(total, round_keys(seed), self.tensors)

    def total(self, low: torch.Tensor) -> torch.Tensor:
        """buffer + low, in the exact buffer's dtype (the step's projected gradient)."""
        if self.kind == "float32":
            return self.tensors[0].add_(low)
        return self._value(exact_buffer_dtype(low.dtype)).add_(low)


class LayerwiseHandle:
    """The hooks of one attached optimizer; :func:`attach` builds it."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        accumulation_steps: int,
        max_grad_norm: float | None,
        process_group: Any,
        accumulation_buffer: str = "full",
    ) -> None:
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.process_group = process_group
        self.accumulation_buffer = accumulation_buffer
        self._micro: dict[torch.Tensor, int] = {}
        #: per projected parameter, its accumulation buffer (low-rank accumulation only)
        self.buffers: dict[torch.Tensor, AccumulationBuffer] = {}
        self._stepping_one = False
        self._step_guard = optimizer.register_step_pre_hook(self._refuse_outside_step)
        self._hooks = []
        for group in optimizer.param_groups:
            self._hook_params(group["params"])
        # a param group added while attached is hooked too (else its parameters would never be
        # stepped and their gradients would accumulate silently)
        self._add_param_group = optimizer.add_param_group
        optimizer.add_param_group = self._add_and_hook  # type: ignore[method-assign]
        optimizer._layerwise_handle = self  # type: ignore[attr-defined]

    @property
    def lowrank(self) -> bool:
        """Whether projected gradients are accumulated in buffers (``accumulation_buffer``)."""
        return self.accumulation_buffer != "full" and self.accumulation_steps > 1

    def _hook_params(self, params: list[torch.Tensor]) -> None:
        if self.lowrank:
            check_lowrank_accumulation(self.optimizer, params)
        self._hooks += [p.register_post_accumulate_grad_hook(self._hook) for p in params if p.requires_grad]

    def _add_and_hook(self, param_group: dict[str, Any]) -> None:
        self._add_param_group(param_group)
        try:
            self._hook_params(self.optimizer.param_groups[-1]["params"])
        except ValueError:
            self.optimizer.param_groups.pop()
            raise

    def buffer_bytes(self) -> int:
        """Bytes of the accumulation buffers (allocated on a parameter's first micro-batch, kept)."""
        return sum(b.nbytes for b in self.buffers.values())

    def remove(self) -> None:
        """Detach the hooks: the optimizer is stepped with ``optimizer.step()`` again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._micro.clear()
        self.buffers.clear()
        self._step_guard.remove()
        if getattr(self.optimizer, "_layerwise_handle", None) is self:
            del self.optimizer.add_param_group  # the class's method again
            del self.optimizer._layerwise_handle

    def _refuse_outside_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._stepping_one:
            raise RuntimeError(
                f"{type(optimizer).__name__}.step() was called while layer-wise updates are attached "
                "(lowmem_optim.layerwise): every parameter is already stepped inside backward and its "
                "gradient freed, so this call would step nothing, and a stack calling it (HF Trainer, "
                "accelerate, a loop with gradient clipping or accumulation) would silently clip nothing "
                "and ignore its accumulation. Drive training with backward() alone and pass "
                "accumulation_steps / max_grad_norm to layerwise.attach, or call handle.remove() first"
            )

    @torch.no_grad()
    def _hook(self, param: torch.Tensor) -> None:
        if self.lowrank and self.optimizer.is_projected(param):
            self._accumulate_projected(param)
            return
        seen = self._micro.get(param, 0) + 1
        if seen < self.accumulation_steps:
            self._micro[param] = seen
            return
        self._micro[param] = 0
        grad = param.grad
        if self.process_group is not None:
            dist.all_reduce(grad, group=self.process_group)
            grad.div_(dist.get_world_size(self.process_group))
        if self.max_grad_norm is not None:
            # torch.nn.utils.clip_grad_norm_'s coefficient, for this parameter alone
            grad.mul_((self.max_grad_norm / (grad.norm() + 1e-6)).clamp(max=1.0))
        step_param = getattr(self.optimizer, "step_param", None)
        if step_param is not None:
            step_param(param, grad)
        else:
            self._step_one(param)
        param.grad = None
        # LR schedulers warn when they step before the optimizer; this optimizer did step
        self.optimizer._opt_called = True  # type: ignore[attr-defined]

    def _average(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.process_group)
        tensor.div_(dist.get_world_size(self.process_group))

    def _accumulate_projected(self, param: torch.Tensor) -> None:
        """Low-rank accumulation: micro-batch 1 starts the step (a due refresh chooses the
        subspace from its gradient, averaged over the ranks first so that every rank chooses the
        same), each micro-batch adds its projection to the buffer and frees its gradient, the
        last steps from the sum (averaged over the ranks, then clipped by its own norm)."""
        optimizer, k = self.optimizer, self.accumulation_steps
        seen = self._micro.get(param, 0) + 1
        self._micro[param] = seen % k
        grad = param.grad
        if seen == 1:
            if self.process_group is not None and optimizer.refresh_due(param):
                self._average(grad)  # the same on every rank, so averaging it again below changes nothing
            optimizer.begin_step(param, grad)
        low = optimizer.project_gradient(param, grad)
        param.grad = None
        buffer = self.buffers.get(param)
        if buffer is None:
            buffer = self.buffers[param] = AccumulationBuffer(self.accumulation_buffer, low)
        if seen < k:
            buffer.write(low, first=seen == 1, seed=optimizer.draw_seed(param, seen))
            return
        total = buffer.total(low)
        if self.process_group is not None:
            self._average(total)
        if self.max_grad_norm is not None:
            total.mul_((self.max_grad_norm / (total.norm() + 1e-6)).clamp(max=1.0))
        optimizer.finish_step(param, total.to(low.dtype))
        self.optimizer._opt_called = True  # type: ignore[attr-defined]

    def _step_one(self, param: torch.Tensor) -> None:
        """``optimizer.step()`` over ``param`` alone: its param groups are narrowed for the call."""
        groups = self.optimizer.param_groups
        saved = [group["params"] for group in groups]
        self._stepping_one = True
        try:
            for group, params in zip(groups, saved):
                group["params"] = [p for p in params if p is param]
            self.optimizer.step()
        finally:
            self._stepping_one = False
            for group, params in zip(groups, saved):
                group["params"] = params


def attach(
    optimizer: torch.optim.Optimizer,
    *,
    accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    process_group: Any = None,
    accumulation_buffer: str = "full",
) -> LayerwiseHandle:
    """Step ``optimizer`` layer-wise: each parameter inside backward, its gradient freed after.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (see the module docstring for how ours and
            others are stepped).
        accumulation_steps: backward passes per training step (k >= 1); the k-th steps.
        max_grad_norm: per-parameter gradient clipping threshold (> 0), or None.
        process_group: a torch.distributed group to average each gradient over (data
            parallel without DDP); required when torch.distributed runs with several ranks.
        accumulation_buffer: with ``accumulation_steps > 1``, where a step's micro-batch
            gradients are summed: ``"full"`` (default) in ``param.grad``, as ordinary
            training; ``"float32"``, ``"bfloat16"`` or ``"8bit"``: the projected parameters of a
            ``ComposedOptimizer`` sum their projections in buffers of that precision and free
            each full gradient (low-rank accumulation, module docstring).

    Returns the handle; ``handle.remove()`` detaches the hooks.
    """
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r} (allowed: an int >= 1)")
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, (int, float))
        or not (math.isfinite(max_grad_norm) and max_grad_norm > 0)
    ):
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (allowed: a finite number > 0, or None)")
    if process_group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            "Invalid process_group: None while torch.distributed runs with "
            f"{dist.get_world_size()} ranks (allowed: a process group, e.g. torch.distributed.group.WORLD). "
            "Layer-wise steps run inside backward, before DDP's bucketed all-reduce: do not wrap the "
            "model in DDP, and pass process_group so each gradient is averaged in its hook"
        )
    if getattr(optimizer, "_layerwise_handle", None) is not None:
        raise ValueError(
            f"Invalid optimizer: this {type(optimizer).__name__} is already attached (lowmem_optim.layerwise); "
            "a second set of hooks would step every parameter twice (allowed: an optimizer not attached, "
            "or call handle.remove() on the first handle before attaching again)"
        )
    if not hasattr(optimizer, "step_param") and any(
        hasattr(p, "apply_update") for group in optimizer.param_groups for p in group["params"]
    ):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} writes into its parameters, but some are INT8 "
            "weights that hold no values (lowmem_optim.quant.int8_linear); use an optimizer of lowmem_optim "
            "(allowed: any lowmem_optim.ComposedOptimizer) or dequantize_linear_layers(model) first"
        )
    if accumulation_buffer not in ACCUMULATION_BUFFERS:
        raise ValueError(
            f"Invalid accumulation_buffer: {accumulation_buffer!r} (allowed: {', '.join(ACCUMULATION_BUFFERS)})"
        )
    return LayerwiseHandle(optimizer, accumulation_steps, max_grad_norm, process_group, accumulation_buffer)


def check_lowrank_accumulation(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """ValueError unless low-rank accumulation can serve ``params``: an optimizer that steps in
    parts (``ComposedOptimizer``), no error feedback, the "projected" update form, no sharded parameter."""
    if not hasattr(optimizer, "finish_step"):
        raise ValueError(
            f"Invalid accumulation_buffer for {type(optimizer).__name__}: low-rank accumulation needs an "
            "optimizer that projects its gradients (allowed: accumulation_buffer='full', or any "
            "lowmem_optim.ComposedOptimizer)"
        )
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in ids or not optimizer.is_projected(p):
                continue
            if group.get("error_feedback") is not None:
                raise ValueError(
                    f"Invalid accumulation_buffer with error_feedback={group['error_feedback']!r}: the error "
                    "feedback needs each step's full gradient, which low-rank accumulation never holds "
                    "(allowed: accumulation_buffer='full', or a group with error_feedback=None)"
                )
            if group.get("update_form", "projected") != "projected":
                raise ValueError(
                    f"Invalid accumulation_buffer with update_form={group['update_form']!r}: the update form "
                    "scales each step's full gradient, which low-rank accumulation never holds "
                    "(allowed: accumulation_buffer='full', or a group with update_form='projected')"
                )
            if is_dtensor(p):
                raise ValueError(
                    "Invalid accumulation_buffer for an FSDP2-sharded parameter: layer-wise updates take "
                    "whole parameters (allowed: parameters that are not DTensors)"
                )
