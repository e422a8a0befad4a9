"""A linear layer whose weight is stored in INT8 and trained through stochastic rounding (Q-GaLore).

Storage (Zhang et al., 2024, arXiv 2407.08296): the weight W (out x in) is kept as uint8 codes
with one float32 scale and zero point per group of ``group_size`` (256) values of the flattened
weight (:mod:`lowmem_optim.quant.groupwise`, min-max with a float zero point):

    W = scale * (q - zero)

1 byte per weight plus 8 bytes per group, against 2 (bf16) or 4 (fp32). No full-precision copy
exists between steps: the forward pass and the backward pass each dequantize the weight
transiently.

Update, in fp32, one layer at a time (done by the optimizer; see the contract below):

    W' = decay * W - alpha * U,    then re-quantized with freshly derived per-group min/max:
    q' = clamp(floor(W' / scale' + zero' + u), 0, 255),   u ~ U[0, 1)

Because the range is re-derived from W', no value is clamped, and stochastic rounding is
unbiased: E[scale' (q' - zero')] = W'. An update far below one quantization step still moves
the weight on average (Q-GaLore's reference does this arithmetic in bf16, where a 0.1-step
update arrives at 64% of its size; here it arrives whole). ``stochastic_round=False`` rounds
to nearest instead: deterministic, but every update smaller than half a step vanishes.
The draw u of value i is a counter-based hash of (seed, i) (:func:`~lowmem_optim.quant.groupwise.counter_uniform`),
the seed being the one the optimizer passes (derived from its ``seed``, the parameter's index
and the step): no generator object, no global RNG, no random tensor.

Kernels: on CUDA, dequantizing (forward, recomputation, backward) and the update above each run
as one fused pass (:func:`~lowmem_optim.quant.groupwise.fused`: ``torch.compile`` of the group
functions), which computes W' and u in registers; elsewhere the same functions run eagerly, in
chunks of whole groups, and are the reference.

The contract with optimizers, layer-wise hooks, DDP and checkpoints
---------------------------------------------------------------------
* ``layer.weight`` is an :class:`Int8Weight`: a parameter of the layer's shape and compute
  dtype that holds no values (one element, expanded with stride 0, so it costs nothing). It is
  what the optimizer sees. The backward pass writes the full-precision weight gradient
  (grad_out^T x, in the compute dtype) into ``layer.weight.grad`` as autograd does for any
  leaf, so ``Tensor.register_post_accumulate_grad_hook`` (layer-wise updates:
  :mod:`lowmem_optim.layerwise`), gradient clipping and ``zero_grad`` work unchanged.
* The optimizer applies an update by calling ``param.apply_update(U, alpha=..., decay=...,
  seed=...)`` instead of writing into the parameter; :class:`lowmem_optim.ComposedOptimizer`
  does this for every parameter that has ``apply_update``. Optimizers that write into their
  parameters (``torch.optim.AdamW``, bitsandbytes') cannot train an INT8 weight: the write
  fails because the parameter holds no values. :func:`lowmem_optim.layerwise.attach` refuses
  that combination up front.
* DDP: the gradient is an ordinary dense gradient, all-reduced like any other. Build the model
  identically on every rank (same seed, then :func:`quantize_linear_layers`) and wrap it with
  ``DistributedDataParallel(model, init_sync=False)``: the initial parameter broadcast cannot
  write into a value-less parameter. ``broadcast_buffers=False`` avoids re-sending the codes
  every step (they stay identical: same gradient, same seeded rounding on every rank).
* ``state_dict``: the layer saves ``weight_codes`` (uint8), ``weight_scale`` and
  ``weight_zero`` (float32) and ``bias``; never a ``weight`` entry. Loading a state dict that
  holds a full-precision ``weight`` instead (a checkpoint of the unquantized model) quantizes
  it (round to nearest). Moving the model (``.to``, ``.cuda``, ``.bfloat16()``) moves the codes,
  keeps scale and zero in float32 and casts only the compute dtype.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import torch
from torch import nn

from lowmem_optim.quant.groupwise import (
    DEFAULT_GROUP_SIZE,
    dequantize_groupwise,
    dequantize_rows,
    fused,
    quantize_groupwise,
    requantize_rows_,
    round_keys,
)
from lowmem_optim.selection import selected_modules

#: values re-quantized per eager pass in :meth:`Int8Weight.apply_update`, bounding its workspace
#: (float32 and int64 temporaries of one chunk) whatever the layer's size
UPDATE_CHUNK = 1 << 18
#: mixed into the optimizer's seed so rounding draws differ from the same step's other draws
_ROUNDING_STREAM = 0x5EED_1A7


class Int8Weight(nn.Parameter):
    """The trainable face of an INT8 weight: see the module docstring's contract.

    Attributes (linked by the owning :class:`Int8Linear`): ``codes`` (uint8, out x in),
    ``scale`` and ``zero`` (float32, one per group), ``group_size``, ``stochastic_round``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    stochastic_round: bool

    def __new__(
        cls,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        requires_grad: bool = True,
    ) -> Int8Weight:
        weight = super().__new__(cls, _valueless(shape, dtype, device), requires_grad)
        if not isinstance(weight, cls):
            # nn.Parameter of a tensor subclass (a FakeTensor, under FakeTensorMode) returns that
            # tensor itself: give it this class's methods too, so a traced step takes INT8's path
            weight.__class__ = _with_int8_methods(type(weight))
        return weight

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """scale * (codes - zero), in ``dtype`` (default: the compute dtype); one fused pass on CUDA."""
        dtype = dtype or self.dtype
        if _fusable(self.codes, self.group_size):
            rows = self.codes.view(-1, self.group_size)
            return fused(dequantize_rows)(rows, self.scale, self.zero, dtype).view(self.shape)
        return dequantize_groupwise(self.codes.view(-1), self.scale, self.zero, self.shape, dtype, self.group_size)

    @torch.no_grad()
    def rms(self) -> torch.Tensor:
        """RMS of the dequantized weight, sqrt(mean(W^2)) (Adafactor's RMS(W)), in fp32 chunks of
        at most ``UPDATE_CHUNK`` values: no full-precision copy of the weight is made. A 0-D
        float64 tensor on the codes' device: no host read."""
        codes, chunk = self.codes.view(-1), UPDATE_CHUNK // self.group_size * self.group_size
        total = torch.zeros((), dtype=torch.float64, device=codes.device)
        for start in range(0, codes.numel(), chunk):
            stop = min(start + chunk, codes.numel())
            groups = slice(start // self.group_size, -(-stop // self.group_size))
            w = dequantize_groupwise(
                codes[start:stop],
                self.scale[groups],
                self.zero[groups],
                (stop - start,),
                torch.float32,
                self.group_size,
            )
            total += w.square().sum()
        return (total / codes.numel()).sqrt_()

    @torch.no_grad()
    def apply_update(
        self, update: torch.Tensor, *, alpha: float = 1.0, decay: float | torch.Tensor = 1.0, seed: int = 0
    ) -> None:
        """W <- decay * W - alpha * update in fp32, re-quantized (stochastically unless
        ``stochastic_round`` is False) with the counter-based draws of ``seed``
        (:func:`lowmem_optim.quant.groupwise.counter_uniform`, counter = the value's index).
        On CUDA one fused pass over the whole weight; elsewhere in chunks of whole groups."""
        keys = round_keys(seed ^ _ROUNDING_STREAM) if self.stochastic_round else None
        size = self.group_size
        codes, upd = self.codes.view(-1), update.reshape(-1)
        whole = codes.numel() // size * size
        fuse = _fusable(self.codes, size)
        requantize = fused(requantize_rows_) if fuse else requantize_rows_
        chunk = whole if fuse else UPDATE_CHUNK // size * size
        for start in range(0, whole, chunk):
            stop = min(start + chunk, whole)
            groups = slice(start // size, stop // size)
            requantize(
                codes[start:stop].view(-1, size),
                self.scale[groups],
                self.zero[groups],
                upd[start:stop].view(-1, size),
                alpha,
                decay,
                8,
                keys,
                start,
            )
        if whole < codes.numel():
            # the last group is partial: padded with its own last value, which keeps its range
            tail = torch.cat([codes[whole:], codes[-1:].expand(whole + size - codes.numel())]).view(1, size)
            tail_update = torch.cat([upd[whole:], upd[-1:].expand(tail.numel() - upd[whole:].numel())]).view(1, size)
            requantize_rows_(tail, self.scale[-1:], self.zero[-1:], tail_update, alpha, decay, 8, keys, whole)
            codes[whole:] = tail.view(-1)[: codes.numel() - whole]

    def __deepcopy__(self, memo: dict[int, Any]) -> Int8Weight:
        if id(self) in memo:
            return memo[id(self)]
        new = Int8Weight(tuple(self.shape), self.dtype, self.device, self.requires_grad)
        memo[id(self)] = new
        # through memo, the copy's codes are the copied layer's buffers, as here
        for key in ("codes", "scale", "zero", "group_size", "stochastic_round"):
            setattr(new, key, copy.deepcopy(getattr(self, key), memo))
        return new

    def __reduce_ex__(self, proto: int) -> tuple[Any, ...]:
        return (
            _rebuild_int8_weight,
            (
                tuple(self.shape),
                self.dtype,
                self.requires_grad,
                self.codes,
                self.scale,
                self.zero,
                self.group_size,
                self.stochastic_round,
            ),
        )


@functools.cache
def _with_int8_methods(tensor_type: type) -> type:
    """A subclass of ``tensor_type`` (a tensor subclass such as FakeTensor) and of :class:`Int8Weight`."""
    return type(f"{tensor_type.__name__}{Int8Weight.__name__}", (tensor_type, Int8Weight), {})


def _rebuild_int8_weight(shape, dtype, requires_grad, codes, scale, zero, group_size, stochastic_round) -> Int8Weight:
    weight = Int8Weight(shape, dtype, codes.device, requires_grad)
    weight.codes, weight.scale, weight.zero = codes, scale, zero
    weight.group_size, weight.stochastic_round = group_size, stochastic_round
    return weight


def _fusable(codes: torch.Tensor, group_size: int) -> bool:
    """Fused (compiled) passes run on CUDA, over whole groups; the eager code is the reference."""
    return codes.is_cuda and codes.numel() % group_size == 0


def _valueless(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


class _Int8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly; nothing of W is saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.weight, ctx.has_bias = weight, bias is not None
        return nn.functional.linear(x, weight.dequantized(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.weight.dequantized(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


class Int8Linear(nn.Linear):
    """``nn.Linear`` with an INT8 weight (group-wise scales), trained by stochastic rounding.

    A subclass of ``nn.Linear`` so that ``target_modules`` selects it as it selected the layer it
    replaced (:func:`lowmem_optim.lowrank_param_groups` puts its weight in the low-rank group).
    Build one with :meth:`from_linear` or :func:`quantize_linear_layers`; see the module
    docstring for the update rule and the contract with optimizers, DDP and checkpoints.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        group_size: int = DEFAULT_GROUP_SIZE,
        stochastic_round: bool = True,
    ) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a full-precision weight
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"Invalid group_size: {group_size!r} (allowed: an int >= 1)")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.stochastic_round = group_size, stochastic_round
        dtype = dtype or torch.get_default_dtype()
        groups = math.ceil(in_features * out_features / group_size)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(groups, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero", torch.zeros(groups, dtype=torch.float32, device=device))
        self.weight = Int8Weight((out_features, in_features), dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._link()

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, *, group_size: int = DEFAULT_GROUP_SIZE, stochastic_round: bool = True
    ) -> Int8Linear:
        """The INT8 version of ``linear`` (weight rounded to nearest; bias kept as is)."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            w.device,
            w.dtype,
            group_size=group_size,
            stochastic_round=stochastic_round,
        )
        layer.load_weight(w)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        layer.weight.requires_grad_(w.requires_grad)
        return layer

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision ``weight`` (out x in) into the codes (round to nearest)."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"Invalid weight shape: {tuple(weight.shape)} (allowed: {tuple(self.weight.shape)})")
        codes, scale, zero = quantize_groupwise(weight.to(self.weight_codes.device), 8, self.group_size)
        self.weight_codes.copy_(codes.view_as(self.weight_codes))
        self.weight_scale.copy_(scale)
        self.weight_zero.copy_(zero)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight in the compute dtype."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight.dequantized())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, self.weight, self.bias)

    def reset_parameters(self) -> None:
        raise RuntimeError(
            "Int8Linear holds no full-precision weight to re-initialize; "
            "use load_weight(tensor) or Int8Linear.from_linear(nn.Linear(...))"
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}, stochastic_round={self.stochastic_round}"
        )

    # ---- keeping the weight's view of the buffers current ---------------------------------
    def _link(self) -> None:
        w = self.weight
        w.codes, w.scale, w.zero = self.weight_codes, self.weight_scale, self.weight_zero
        w.group_size, w.stochastic_round = self.group_size, self.stochastic_round

    def _apply(self, fn, recurse: bool = True):
        # Module._apply would materialize the value-less weight (m x n) and cast scale/zero to
        # the compute dtype: move a one-element stand-in instead and keep scale/zero float32.
        shape = tuple(self.weight.shape)
        scale, zero = self.weight_scale, self.weight_zero
        self.weight.data = self.weight.data[(0,) * len(shape)]
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.expand(shape)
        device = self.weight_codes.device
        self.weight_scale, self.weight_zero = scale.to(device), zero.to(device)
        self._link()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        del destination[prefix + "weight"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        params = self._parameters
        self._parameters = {k: v for k, v in params.items() if k != "weight"}  # never loaded into
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            self._parameters = params
        self._link()
        full = state_dict.get(prefix + "weight")
        if full is None:
            return
        if prefix + "weight" in unexpected_keys:
            unexpected_keys.remove(prefix + "weight")
        if prefix + "weight_codes" not in state_dict:  # an unquantized checkpoint
            for key in ("weight_codes", "weight_scale", "weight_zero"):
                if prefix + key in missing_keys:
                    missing_keys.remove(prefix + key)
            self.load_weight(full)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_linear_layers(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...] = "all-linear",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    stochastic_round: bool = True,
) -> nn.Module:
    """Replace the ``nn.Linear`` layers chosen by ``target_modules`` (the rule of
    :func:`lowmem_optim.lowrank_param_groups`: ``"all-linear"`` spares the output head) by
    :class:`Int8Linear`, in place, one layer at a time; returns ``model``. Build the optimizer
    afterwards, from the converted model."""
    chosen = [(name, module) for name, module in selected_modules(model, target_modules) if type(module) is nn.Linear]
    if not chosen:
        raise ValueError(
            f"Invalid target_modules: {target_modules!r} selects no nn.Linear layer of "
            f"{type(model).__name__} to quantize"
        )
    for name, module in chosen:
        _replace(model, name, Int8Linear.from_linear(module, group_size=group_size, stochastic_round=stochastic_round))
    return model


def dequantize_linear_layers(model: nn.Module) -> nn.Module:
    """Replace every :class:`Int8Linear` of ``model`` by an ``nn.Linear`` with its dequantized
    weight (in the compute dtype), in place; returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Linear):
            _replace(model, name, module.to_linear())
    return model
