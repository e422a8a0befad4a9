"""FSDP2-sharded parameters: each rank's rows of a matrix, the few collectives the step needs,
and how sharded optimizer state is kept.

FSDP2 (``torch.distributed.fsdp.fully_shard``) hands the optimizer each weight W (m x n, N-D
weights viewed as (shape[0], -1)) as a DTensor with placement ``Shard(0)`` on a 1-D device
mesh: rank i holds the rows W_i of a block of ``ceil(m / world)`` rows (torch.chunk's split;
the last ranks may hold fewer, or none) and receives the matching rows G_i of the gradient.
The step runs on these local blocks; a reduction over rows becomes a local reduction plus one
all-reduce, and a step that needs the whole matrix gathers it:

    sum over rows of f(G)   =  all_reduce_i( sum over rows of f(G_i) )
    P^T G                   =  all_reduce_i( P_i^T G_i )        (r x n)
    G                       =  all_gather_i( G_i )              (m x n)

Other placements (``Replicate``, ``Shard(d)`` for d > 0, ``Partial``, meshes of more than one
dimension as in HSDP or FSDP with tensor parallelism) are refused with a ValueError naming them.

A tensor every rank holds whole (the all-reduced P^T G, r x n) can be divided the same way
for work and state (:meth:`RowShard.split`): each rank steps a block of its rows and the
results are gathered.

State of a sharded parameter is kept as data that torch.distributed.checkpoint understands:
an entry indexed by the rows of a sharded tensor (moments of the weight's rows or of the split
P^T G, a left basis P, an error-feedback buffer) is a ``Shard(0)`` DTensor over the local rows,
with the whole tensor's shape, so DCP saves each rank's rows once, ``full_tensor()`` gathers
them, and a load on another world size reshards them; every other entry (the right basis Q,
quantized bases, indices, schedule numbers) is the same on every rank and kept as a plain
tensor or number. Entries of values quantized in blocks along a row-sharded tensor (8-bit
moments' absmax) cut their blocks on each rank's local values and are padded to a common
length per rank, so they too are ``Shard(0)`` DTensors (:func:`wrap_blocks`).

During a step the parts see :func:`local_view` of the state (DTensors replaced by their local
tensors, which alias them: in-place updates land in the DTensor) and :func:`store` writes back
what they replaced or added.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


def _dtensor_types() -> tuple[type, type] | None:
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch built without distributed
        return None
    return DTensor, Shard


def is_dtensor(t: Any) -> bool:
    types = _dtensor_types()
    return types is not None and isinstance(t, types[0])


@dataclass
class Traffic:
    """Bytes this rank sends through the sharding layer's collectives, counted with ring
    algorithms' costs: an all-reduce of B bytes sends 2 (w - 1) / w B, an all-gather whose
    result holds B bytes sends (w - 1) / w B."""

    sent: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, nbytes: int, world: int) -> None:
        factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
        self.sent += factor * nbytes
        self.calls[op] = self.calls.get(op, 0) + 1


_counters: list[Traffic] = []


@contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count the bytes the sharding layer's collectives send while the block runs."""
    traffic = Traffic()
    _counters.append(traffic)
    try:
        yield traffic
    finally:
        _counters.remove(traffic)


@dataclass(frozen=True)
class RowShard:
    """This rank's block of rows ``[start, stop)`` of a matrix of ``rows`` rows sharded by rows
    over a 1-D device mesh."""

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    rows: int
    start: int
    stop: int

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    @property
    def world(self) -> int:
        return self.mesh.size()

    @property
    def chunk(self) -> int:
        """Rows of the largest block (torch.chunk's split)."""
        return -(-self.rows // self.world)

    def global_shape(self, local: torch.Tensor) -> torch.Size:
        """Shape of the whole tensor whose dim-0 block ``local`` is."""
        return torch.Size((self.rows, *local.shape[1:]))

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns it."""
        for traffic in _counters:
            traffic.add("all_reduce", t.numel() * t.element_size(), self.world)
        dist.all_reduce(t, group=self.group)
        return t

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's dim-0 block (every rank gets it)."""
        pad = self.chunk - local.shape[0]
        padded = torch.cat([local, local.new_zeros(pad, *local.shape[1:])]) if pad else local.contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        for traffic in _counters:
            traffic.add("all_gather", self.rows * math.prod(local.shape[1:]) * local.element_size(), self.world)
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[: self.rows]

    def split(self, rows: int) -> RowShard:
        """This rank's block of a tensor of ``rows`` rows split over the same ranks (torch.chunk's
        split): how a whole tensor every rank holds is divided for work and state."""
        start, stop = _chunk_bounds(rows, self.world, self.mesh.get_local_rank())
        return RowShard(self.mesh, rows, start, stop)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank."""
        t = torch.tensor([float(flag)])
        return bool(self.all_reduce_(t) > 0)


def row_shard(p: torch.Tensor, label: str) -> RowShard | None:
    """The rows this rank holds of the FSDP2-sharded parameter ``p``; None for a plain tensor.

    Raises ValueError, naming ``label`` and the placement, for a DTensor that is not
    ``Shard(0)`` on a 1-D mesh or whose local rows are not torch.chunk's split."""
    types = _dtensor_types()
    if types is None or not isinstance(p, types[0]):
        return None
    dtensor, shard_type = types
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], shard_type) and placements[0].dim == 0):
        raise ValueError(
            f"{label} is a DTensor with placements {placements} on a {mesh.ndim}-D device mesh "
            "(allowed: Shard(0) on a 1-D mesh, as FSDP2's fully_shard places parameters)"
        )
    rows, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
    start, stop = _chunk_bounds(rows, world, rank)
    local_rows = p.to_local().shape[0]
    if local_rows != stop - start:
        raise ValueError(
            f"{label} is sharded with {local_rows} rows on rank {rank}; torch.chunk's split gives {stop - start} "
            f"of {rows} over {world} ranks (allowed: Shard(0) on a 1-D mesh with torch.chunk's split, as FSDP2's "
            "fully_shard places parameters)"
        )
    return RowShard(mesh, rows, start, stop)


def _chunk_bounds(rows: int, world: int, rank: int) -> tuple[int, int]:
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


# ---- reductions over a tensor whose dim 0 may be row-sharded -------------------------------------
def global_sum(t: torch.Tensor, shard: RowShard | None) -> torch.Tensor:
    """sum(t) over the whole tensor (a 0-D tensor), ``t`` being this rank's dim-0 block."""
    total = t.sum()
    return total if shard is None else shard.all_reduce_(total.reshape(1)).reshape(())


def global_mean(
    t: torch.Tensor, dim: int, shard: RowShard | None, keepdim: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """mean(t, dim) of the whole tensor, accumulated in ``dtype`` (default t's); a mean over the
    sharded dim 0 is summed over ranks."""
    if shard is None or dim % t.dim() != 0:
        return t.mean(dim=dim, keepdim=keepdim, dtype=dtype)
    return shard.all_reduce_(t.sum(dim=dim, keepdim=keepdim, dtype=dtype)) / shard.rows


def global_numel(t: torch.Tensor, shard: RowShard | None) -> int:
    return t.numel() if shard is None else shard.rows * math.prod(t.shape[1:])


def norm_exponent(t: torch.Tensor) -> torch.Tensor:
    """The exponent e (0-D int) with max|t| 2^-e in [0.5, 1): the scaling that keeps every square
    of t finite, clamped to float32's normal range."""
    return torch.frexp(torch.linalg.vector_norm(t, ord=math.inf)).exponent.clamp_(-126, 126)


def scaled_norm(t: torch.Tensor) -> torch.Tensor:
    """||t||_F (0-D, in t's dtype) with no square overflowing or underflowing: t is scaled by the
    power of two that brings max|t| into [0.5, 1) (as LAPACK's nrm2 scales), so the norm of
    entries up to the dtype's largest is finite. Scaling by a power of two is exact: wherever the
    plain ``t.norm()`` is finite and normal, this is the same number, bit for bit."""
    if t.numel() == 0:
        return t.new_zeros(())
    scale = torch.ldexp(torch.ones((), dtype=t.dtype, device=t.device), -norm_exponent(t))
    return torch.mul(t, scale).norm().div_(scale)


def global_norm(t: torch.Tensor, shard: RowShard | None) -> torch.Tensor:
    """||t||_F of the whole tensor (0-D), finite for any finite entries: :func:`scaled_norm`; a
    sharded tensor's squares are summed in float64 (no float32 square overflows there)."""
    if shard is None:
        return scaled_norm(t)
    local = torch.linalg.vector_norm(t, dtype=torch.float64).square()
    return global_sum(local, shard).sqrt().to(t.dtype)


def param_rms(param: torch.Tensor) -> torch.Tensor:
    """RMS of a parameter's values over the whole parameter, also when it is a sharded DTensor:
    a 0-D float64 tensor on the parameter's device (its float32 value; no host read)."""
    if not is_dtensor(param):
        return (param.detach().float().norm(2) / math.sqrt(param.numel())).double()
    shard = row_shard(param, "parameter")
    return (global_norm(param.to_local().detach().float(), shard) / math.sqrt(param.numel())).double()


# ---- sharded state -----------------------------------------------------------------------------
def _block_count(local: torch.Tensor, block: int) -> int:
    return -(-local.numel() // block)


def wrap_rows(local: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """A ``Shard(0)`` DTensor of the whole tensor whose dim-0 block on this rank is ``local``."""
    from torch.distributed.tensor import DTensor, Shard  # absent from torch builds without distributed

    shape = shard.global_shape(local)
    return DTensor.from_local(local, shard.mesh, (Shard(0),), shape=shape, stride=_contiguous_stride(shape))


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def blocks_per_rank(values_per_row: int, shard: RowShard, block: int) -> int:
    """Block-statistic entries each rank keeps for a row-sharded tensor of ``values_per_row``
    values per row: the blocks of the largest local block of rows."""
    return -(-shard.chunk * values_per_row // block)


def wrap_blocks(local: torch.Tensor, values: torch.Tensor, shard: RowShard, block: int) -> torch.Tensor:
    """A ``Shard(0)`` DTensor of the per-block statistics ``local`` (1-D, one per ``block``
    values of this rank's flattened ``values``), padded to :func:`blocks_per_rank`.

    When every rank's values fill whole blocks (``chunk * values_per_row`` a multiple of
    ``block`` and the rows split evenly) the padding is empty, the blocks are those of the
    whole tensor, and the DTensor equals the unsharded statistic: it loads on any world size."""
    from torch.distributed.tensor import DTensor, Shard  # absent from torch builds without distributed

    per_rank = blocks_per_rank(math.prod(values.shape[1:]), shard, block)
    padded = torch.cat([local, local.new_zeros(per_rank - local.numel())]) if local.numel() < per_rank else local
    shape = torch.Size((per_rank * shard.world,))
    return DTensor.from_local(padded, shard.mesh, (Shard(0),), shape=shape, stride=(1,))


@dataclass(frozen=True)
class StateLayout:
    """Which entries of a parameter's state follow the rows of a row-sharded tensor.

    rows: keys whose dim 0 is the sharded dim 0;  blocks: key -> (the row-sharded key whose
    values it summarizes, block size)."""

    rows: frozenset[str] = frozenset()
    blocks: tuple[tuple[str, str, int], ...] = ()

    def __or__(self, other: StateLayout) -> StateLayout:
        return StateLayout(self.rows | other.rows, self.blocks + other.blocks)


#: state entries of one parameter sharded with one shard (several: the weight's rows for some
#: entries, the rows of its low-rank gradient for others)
Placed = tuple[RowShard | None, StateLayout]


def local_view(state: dict[str, Any], *placed: Placed) -> dict[str, Any]:
    """The state as the parts see it on this rank: every DTensor as its local tensor, and a plain
    whole tensor of a sharded entry (loaded from an unsharded checkpoint) sliced to this rank's
    rows; ``placed``: (shard, layout) pairs, a pair without a shard ignored."""
    placed = tuple((shard, layout) for shard, layout in placed if shard is not None)
    if not placed:
        return state
    view = {key: value.to_local() if is_dtensor(value) else value for key, value in state.items()}
    for shard, layout in placed:
        for key in layout.rows:
            value = state.get(key)
            if torch.is_tensor(value) and not is_dtensor(value) and value.dim() > 0 and value.shape[0] == shard.rows:
                view[key] = value[shard.start : shard.stop]
        for key, values_key, block in layout.blocks:
            if key in view and values_key in view:
                used = _block_count(view[values_key], block)
                if view[key].numel() < used:
                    raise ValueError(
                        f"optimizer state {key!r} holds {view[key].numel()} block statistics on this rank, its "
                        f"{values_key!r} needs {used}: it was saved with its blocks cut on another world size, "
                        "which cannot be resharded (load it on the world size that saved it)"
                    )
                view[key] = view[key][:used]
    return view


def store(state: dict[str, Any], view: dict[str, Any], *placed: Placed) -> None:
    """Write back what the parts replaced, added or removed in ``view`` (from :func:`local_view`
    with the same ``placed``)."""
    placed = tuple((shard, layout) for shard, layout in placed if shard is not None)
    if not placed:
        return
    before = local_view(state, *placed)
    for key in [k for k in state if k not in view]:
        del state[key]
    for key, value in view.items():
        if key in state and value is before.get(key) and is_dtensor(state[key]):
            continue  # updated in place through the alias
        state[key] = _wrapped(key, value, view, placed)


def _wrapped(key: str, value: Any, view: dict[str, Any], placed: tuple[Placed, ...]) -> Any:
    """``value`` as kept in the state: a sharded entry's local part as a DTensor."""
    if not torch.is_tensor(value):
        return value
    for shard, layout in placed:
        if key in layout.rows:
            return wrap_rows(value, shard)
        for block_key, values_key, block in layout.blocks:
            if key == block_key:
                return wrap_blocks(value, view[values_key], shard, block)
    return value


def local_bytes(value: Any) -> int:
    """Bytes a state entry takes on this rank (a DTensor: its local shard)."""
    if not torch.is_tensor(value):
        return 0
    local = value.to_local() if is_dtensor(value) else value
    return local.numel() * local.element_size()
