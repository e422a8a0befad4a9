"""Tracing a training step's memory: the bytes of every live tensor storage, its peak, and what holds it.

:class:`StorageTrace` is a ``TorchDispatchMode`` that follows every tensor storage an op
returns, as :class:`lowmem_optim.tools.op_count.OpCounter` follows temporaries: each storage is
counted once (views share it) from its first appearance until it is freed (weak references:
Python frees it, its callback uncounts it). Storages made before the mode was entered (the
model's parameters and buffers) are followed with :meth:`StorageTrace.follow`. Run under
``FakeTensorMode`` (valueless tensors that still have shapes, dtypes and storages of the real
size) it traces a LLaMA-7B step on a CPU in minutes with no memory: the bytes are those the
code path would allocate, before any allocator rounding.

What holds each byte, at the peak:

* ``parameters`` and ``buffers``: the model's, given to :meth:`StorageTrace.watch` (an INT8
  layer's codes, scales and zero points are buffers; its weight parameter holds one element);
* ``gradients``: each storage that became a parameter's ``.grad`` (seen by a
  post-accumulate-grad hook that runs before any other);
* ``optimizer_states``: the tensors of ``optimizer.state`` (moments, projections, counters),
  ``accumulation_buffers``: the tensors of a layer-wise handle's buffers (both given to
  :meth:`StorageTrace.collect_state`, collected at each :meth:`StorageTrace.phase`);
* ``activations``: what the modules' forward passes made (the first forward and the rebuilding of
  checkpointed layers), still alive;
* ``temporaries``: everything else (backward's intermediates, the update's workspace).

Peaks are kept per phase (a name such as "step 1, micro-batch 1"): a phase's peak is the largest
sum of live bytes between :meth:`StorageTrace.phase` calls, split as above at the moment it was
reached (the state is recorded lazily: on the first free after the peak, when it is still exact).

Host reads (``.item()``, ``bool(t)``, ``nonzero``) cannot be answered by valueless tensors
(FakeTensorMode raises ``DataDependentOutputException``): :class:`StorageTrace` answers the scalar ones with a
stand-in (True, 1, 1.0: "finite", "not all zero") and counts them in ``host_reads``;
``nonzero`` is refused. Small tensors made from host data under :func:`fake_tensors` keep
their values and answer for themselves.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lowmem_optim.tools.op_count import SYNC_OPS

#: the categories a traced peak is split into
CATEGORIES = (
    "parameters",
    "buffers",
    "gradients",
    "optimizer_states",
    "accumulation_buffers",
    "activations",
    "temporaries",
)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _state_tensors(value: Any) -> Iterable[torch.Tensor]:
    """Tensors in a state value: a tensor, containers of them, or an object's attributes."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _state_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _state_tensors(v)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from _state_tensors(vars(value))


@dataclass
class Peak:
    """A phase's peak: its bytes and their split over :data:`CATEGORIES`."""

    bytes: int = 0
    split: dict[str, int] = field(default_factory=dict)


class StorageTrace(TorchDispatchMode):
    """Live storage bytes (``live_bytes``), the peak (``peak_bytes``) and the peak of each phase
    with its split (``peaks``); see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peaks: dict[str, Peak] = {}
        self.host_reads: Counter[str] = Counter()
        self._phase = "setup"
        self._phase_peak = 0
        self._at_peak = False
        self._serials = 0
        self._live: dict[int, tuple[int, int, str, weakref.ref]] = {}  # storage key -> serial, bytes, tag, ref
        self._roles: dict[int, str] = {}  # serial -> category, for storages whose role is known (kept once freed)
        self._snapshot: list[tuple[int, int, str]] = []  # (serial, bytes, tag) at the phase's peak
        self._forward_depth = 0
        self._watched: list[Any] = []  # optimizer and handle whose state is collected at each phase
        self._hooks: list[Any] = []

    # ---- what the driver calls -------------------------------------------------------------
    def follow(self, tensors: Iterable[torch.Tensor], role: str | None = None) -> None:
        """Count the storages of ``tensors`` (made before the mode, or outside it) from now on;
        ``role``: their category."""
        for t in tensors:
            serial = self._follow(t)
            if role is not None:
                self._roles[serial] = role

    def watch(self, model: nn.Module) -> None:
        """Follow ``model``'s parameters and buffers and mark each gradient as it is accumulated
        (call before anything else registers post-accumulate-grad hooks, e.g. layer-wise
        updates, which free the gradient)."""
        self.follow(model.parameters(), "parameters")
        self.follow(model.buffers(), "buffers")
        for p in model.parameters():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._gradient_arrived))

    def collect_state(self, optimizer: Any, handle: Any = None) -> None:
        """At each phase, mark ``optimizer.state``'s tensors as optimizer states and those of
        ``handle.buffers`` (a layer-wise handle's) as accumulation buffers."""
        self._watched = [w for w in (optimizer, handle) if w is not None]

    def phase(self, name: str) -> None:
        """Start phase ``name``: record the previous one's peak, collect the optimizer's state and
        the accumulation buffers as they are now."""
        self._close_phase()
        self._collect_state()
        self._phase, self._phase_peak, self._at_peak = name, self.live_bytes, True

    def finish(self) -> dict[str, Peak]:
        """Close the last phase; the peaks of every phase."""
        self._close_phase()
        self._collect_state()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return self.peaks

    # ---- the mode ---------------------------------------------------------------------------
    def __enter__(self):
        self._module_hooks = [
            nn.modules.module.register_module_forward_pre_hook(self._forward_entered),
            nn.modules.module.register_module_forward_hook(self._forward_left, always_call=True),
        ]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for hook in self._module_hooks:
            hook.remove()
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            t = _tensors((args, kwargs))[0]
            if isinstance(t, FakeTensor) and t.constant is None:  # no values (see fake_tensors)
                return self._stand_in(func, t)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            self._follow(t)
        return out

    def _stand_in(self, func, t: torch.Tensor) -> Any:
        name = str(func.overloadpacket.__name__)
        if func is torch.ops.aten.nonzero.default:
            raise RuntimeError("StorageTrace: nonzero on a valueless tensor has no stand-in (its shape is its values)")
        self.host_reads[name] += 1
        if t.dtype == torch.bool or func is torch.ops.aten.is_nonzero.default:
            return True
        return 1.0 if t.is_floating_point() else 1

    # ---- bookkeeping ------------------------------------------------------------------------
    def _follow(self, t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        key = storage._cdata
        known = self._live.get(key)
        if known is not None and known[3]() is not None:
            return known[0]
        self._serials += 1
        serial, nbytes = self._serials, storage.nbytes()
        tag = "activations" if self._forward_depth > 0 else "temporaries"
        self._live[key] = (serial, nbytes, tag, weakref.ref(storage, lambda _: self._freed(key, serial)))
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self.live_bytes >= self._phase_peak:
            self._phase_peak, self._at_peak = self.live_bytes, True
        return serial

    def _freed(self, key: int, serial: int) -> None:
        if key not in self._live or self._live[key][0] != serial:
            return
        if self._at_peak:  # the first free after the phase's peak: the live set is the peak's
            self._record_snapshot()
        self.live_bytes -= self._live.pop(key)[1]

    def _record_snapshot(self) -> None:
        self._snapshot = [(serial, nbytes, tag) for serial, nbytes, tag, _ in self._live.values()]
        self._at_peak = False

    def _close_phase(self) -> None:
        if self._at_peak:
            self._record_snapshot()
        split = dict.fromkeys(CATEGORIES, 0)
        for serial, nbytes, tag in self._snapshot:
            # a role learnt after the peak counts too: a gradient marked once accumulated, state
            # collected at the next phase
            split[self._roles.get(serial, tag)] += nbytes
        self.peaks[self._phase] = Peak(self._phase_peak, split)
        self._snapshot = []

    def _collect_state(self) -> None:
        for watched in self._watched:
            buffers = getattr(watched, "buffers", None)
            if isinstance(buffers, dict):
                self.follow(_state_tensors(list(buffers.values())), "accumulation_buffers")
            state = getattr(watched, "state", None)
            if isinstance(state, dict):
                self.follow(_state_tensors(list(state.values())), "optimizer_states")

    def _gradient_arrived(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self.follow([p.grad], "gradients")

    def _forward_entered(self, module: nn.Module, args: Any) -> None:
        self._forward_depth += 1

    def _forward_left(self, module: nn.Module, args: Any, output: Any) -> None:
        self._forward_depth -= 1


#: values a fake tensor made from host data keeps (torch keeps those of one value): a quantized
#: basis's metadata (its shape, bits and group size, read on the host) has 4
KEPT_VALUES = 16


@contextlib.contextmanager
def fake_tensors() -> Iterator[FakeTensorMode]:
    """``FakeTensorMode`` (tensors with shapes, dtypes and storages but no values), in which
    tensors of at most :data:`KEPT_VALUES` values made from host data keep them, so host reads
    of such metadata return its values, not a stand-in."""
    kept = fake_tensor.CONSTANT_NUMEL_LIMIT
    fake_tensor.CONSTANT_NUMEL_LIMIT = max(kept, KEPT_VALUES)
    try:
        # cached host constants (8-bit maps) are real tensors: taken in as constants
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = kept
