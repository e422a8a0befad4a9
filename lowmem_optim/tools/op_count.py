"""Counting what an optimizer step costs at the dispatcher: aten ops, host-device syncs, temporaries.

:class:`OpCounter` is a ``TorchDispatchMode``: every aten op that runs under it is counted by
name. Among them, the ops that need a tensor's value on the host (``_local_scalar_dense``, behind
``.item()``, ``int(t)``, ``float(t)`` and ``bool(t)``, and ``nonzero``, whose output shape depends
on the values) are *syncs* when their input lives on another device than the CPU: on a GPU each
one stalls the host until every queued kernel has run. Ops on CPU tensors (the step counter
torch keeps on the CPU) are not syncs.

Parameters on the ``meta`` device make the count device-independent and free: every op runs
shape-only, and a sync on a meta tensor, which holds no value, is answered with a stand-in (1
for ``_local_scalar_dense``, every index for ``nonzero``) so the step runs to its end. A test can
then assert "no sync on a step without a refresh" without a GPU.

Temporaries: each output of a non-view op that brings a new storage is an allocation;
``allocated_bytes`` sums them and ``peak_bytes`` is the largest sum of those still alive at one
time (storages are followed with weak references, so a freed temporary stops counting). Bytes
of in-place ops and views are not allocations.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_flatten

#: ops that read a tensor's value on the host (a device-to-host copy and a wait on the device)
SYNC_OPS = frozenset(
    {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.item.default,
    }
)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class OpCounter(TorchDispatchMode):
    """Counts ops (``ops``, ``by_op``; ``host_ops``: those on CPU tensors only), syncs (``syncs``,
    ``sync_ops``) and temporaries (``allocated_bytes``, ``peak_bytes``, ``largest_numel`` per
    dtype) of the code run under it; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_ops = 0  # ops whose tensors are all on the CPU (a step counter's): no device kernel
        self.by_op: Counter[str] = Counter()
        self.syncs = 0
        self.sync_ops: Counter[str] = Counter()
        self.allocated_bytes = 0
        self.peak_bytes = 0
        self.largest_numel: dict[torch.dtype, int] = {}  # the largest allocation of each dtype
        self._live_bytes = 0
        self._live: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        self.by_op[str(func.overloadpacket.__name__)] += 1
        inputs = _tensors((args, kwargs))
        self.host_ops += bool(inputs) and all(t.device.type == "cpu" for t in inputs)
        if func in SYNC_OPS and any(t.device.type != "cpu" for t in inputs):
            self.syncs += 1
            self.sync_ops[str(func.overloadpacket.__name__)] += 1
            if inputs[0].device.type == "meta":
                return self._stand_in(func, inputs[0])
        out = func(*args, **kwargs)
        if not func._schema.is_mutable and not func.is_view:
            for t in _tensors(out):
                self._allocated(t)
        return out

    @staticmethod
    def _stand_in(func, t: torch.Tensor) -> Any:
        if func is torch.ops.aten.nonzero.default:
            return torch.ones(t.shape, dtype=torch.bool).nonzero().to(t.device)
        return 1.0 if t.is_floating_point() else 1

    def _allocated(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live and self._live[key]() is not None:
            return
        nbytes = storage.nbytes()
        self.largest_numel[t.dtype] = max(self.largest_numel.get(t.dtype, 0), t.numel())
        self.allocated_bytes += nbytes
        self._live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self._live_bytes)

        def freed(_: Any, key: int = key, nbytes: int = nbytes) -> None:
            self._live_bytes -= nbytes
            self._live.pop(key, None)

        self._live[key] = weakref.ref(storage, freed)


def as_one_op(fn: Callable, name: str) -> Callable:
    """``fn``, counted by an active :class:`OpCounter` as the one op ``name`` (its own ops are
    run outside the counter; its outputs' new storages count as allocations)."""

    @functools.wraps(fn)
    def counted(*args: Any, **kwargs: Any) -> Any:
        counters = [m for m in _get_current_dispatch_mode_stack() if isinstance(m, OpCounter)]
        if not counters:
            return fn(*args, **kwargs)
        with _disable_current_modes():
            out = fn(*args, **kwargs)
        counter = counters[-1]
        counter.ops += 1
        counter.by_op[name] += 1
        for t in _tensors(out):
            counter._allocated(t)
        return out

    return counted
