"""The parts an optimizer is composed of, and how each declares its hyperparameters.

An optimizer of this package (:class:`lowmem_optim.engine.ComposedOptimizer`) runs, per param
group, five kinds of parts, each chosen by a group key:

* a :class:`Rule` (``rule``: Adam, Adafactor, 8-bit Adam, normalized momentum),
* a :class:`Projector` (``proj_method``: SVD, randomized SVD, DCT), used when the group has a ``rank``,
  with its basis :class:`Storage` (dense projectors: as is, or INT8/INT4),
* a :class:`RefreshSchedule` (``refresh``: fixed or adaptive gap),
* an update form (``update_form``: the full-size update made from the low-rank one,
  :mod:`lowmem_optim.update_forms`).

Each part declares the group keys it reads, once, as :class:`HParam` entries of its ``hparams``:
name, default, check, one-line doc. Everything else is derived from those declarations: the
engine's validation and per-group defaults, the keys a named optimizer accepts and its
docstring, the registry's routing of keys to the low-rank group and the training CLI's flags.

Adding a hyperparameter: add an ``HParam`` to the ``hparams`` of the part that reads it (and
read ``group[name]`` there). Adding a part: subclass :class:`Part`, declare its ``hparams``,
implement its protocol below, and register the class in its kind's registry
(``RULES``, ``PROJECTORS``, ``SCHEDULES``, ``UPDATE_FORMS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lowmem_optim.sharding import RowShard, StateLayout


def invalid(name: str, value: Any, allowed: str) -> ValueError:
    """The error of every bad hyperparameter: ``Invalid <name>: <value> (allowed: <allowed>)``."""
    return ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


@dataclass(frozen=True)
class Check:
    """A test of one hyperparameter value, what it allows in words, and the value's type on a
    command line (``optional``: None is allowed too)."""

    test: Callable[[Any], bool]
    allowed: str
    type: type = str
    optional: bool = False

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int = 0, high: int | None = None) -> Check:
    """An int (not a bool) in [low, high]."""
    allowed = f"an int >= {low}" if high is None else f"an int from {low} to {high}"
    return Check(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high),
        allowed,
        int,
    )


def number(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Check:
    """A finite int or float in the interval; ``*_open`` excludes that end."""

    def test(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    if low is not None and high is not None:
        words = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        words = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        words = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        words = "a finite number"
    return Check(test, words, float)


def one_of(*choices: Any) -> Check:
    """One of ``choices`` (None among them makes the flag optional)."""
    values = [c for c in choices if c is not None]
    kind = type(values[0]) if values else str
    return Check(
        lambda v: not isinstance(v, bool) and any(v == c and type(v) is type(c) for c in choices),
        ", ".join(map(str, choices)),
        kind,
        optional=None in choices,
    )


#: True or False (1 and 0 are refused: a flag that is not a bool is a mistake)
BOOLEAN = Check(lambda v: isinstance(v, bool), "True, False", bool)


def optional(check: Check) -> Check:
    """None, or what ``check`` allows."""
    return Check(lambda v: v is None or check(v), f"None, or {check.allowed}", check.type, optional=True)


def sequence(check: Check, length: int, words: str) -> Check:
    """A tuple or list of ``length`` values that ``check`` allows (no command-line type)."""
    return Check(lambda v: isinstance(v, (tuple, list)) and len(v) == length and all(map(check, v)), words, tuple)


@dataclass(frozen=True)
class HParam:
    """One group key a part reads: its name, default, check and a one-line doc."""

    name: str
    default: Any
    check: Check
    doc: str

    def validate(self, value: Any, name: str | None = None) -> None:
        """ValueError naming the key (or ``name``, e.g. a CLI flag) unless ``check`` allows ``value``."""
        if not self.check(value):
            raise invalid(name or self.name, value, self.check.allowed)


def declared(parts: Iterable[Any]) -> dict[str, HParam]:
    """Name -> declaration over ``parts`` (a later part's declaration of a name wins)."""
    return {hp.name: hp for part in parts for hp in part.hparams}


def defaults(*parts: Any) -> dict[str, Any]:
    """The declared default of every key of ``parts``: a complete group for calling parts directly."""
    return {name: hp.default for name, hp in declared(parts).items()}


@dataclass(frozen=True)
class SubspaceChange:
    """What a projector tells the engine (and the rule) after a refresh.

    similarity: how far the subspace moved, in [0, 1] (|cos| of the leading vectors; for index
        based projectors the overlap of index sets); ``None`` on the first refresh.
    kept: for index-based projectors, a LongTensor over the new positions holding the old
        position of each index that stayed, or -1 for a new index; ``None`` means the rule's
        moments are kept as they are (GaLore's convention: not reset, not rotated).
    """

    similarity: float | None = None
    kept: torch.Tensor | None = None


class Part:
    """What every part shares: its declarations, cross-key checks, dtypes kept on load, bytes.

    Parts are stateless: everything they keep lives in the parameter's optimizer state.
    """

    #: the group keys this part reads
    hparams: tuple[HParam, ...] = ()

    def validate(self, group: dict[str, Any]) -> None:
        """Checks that involve more than one key (each key alone is checked by its declaration)."""

    def fixed_dtype_keys(self, param_dtype: torch.dtype) -> frozenset[str]:
        """State keys whose saved floating dtype is kept on load into a ``param_dtype`` parameter
        (torch casts every other floating state tensor to the parameter's dtype)."""
        return frozenset()

    def host_keys(self) -> frozenset[str]:
        """State keys kept on the CPU whatever the parameter's device: small bookkeeping the host
        reads (a read from a GPU tensor would wait for every queued kernel)."""
        return frozenset()

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        """Bytes this part keeps in the state of a parameter whose update it sees as ``shape``
        (a rule: the projected shape; a projector, its storage and an update form: the matrix shape)
        in ``dtype``."""
        return 0

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        """Transient bytes this part allocates during one update of that parameter."""
        return 0

    def update_dtype(self, dtype: torch.dtype, group: dict[str, Any]) -> torch.dtype:
        """A rule's: the dtype of the update N its ``update`` returns for an input in ``dtype``."""
        return dtype

    def update_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        """A rule's: bytes of what its ``update`` returns for a ``shape`` input in ``dtype`` (N, and
        a step size it returns as a tensor), alive until the update is applied."""
        return math.prod(shape) * self.update_dtype(dtype, group).itemsize

    def weight_workspace_bytes(
        self, shape: tuple[int, ...], low_shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]
    ) -> int:
        """A rule's: the most transient bytes alive while its ``update`` reads the weight itself
        (``shape``, in ``dtype``; the rule's input of ``low_shape``), where that tops
        :meth:`workspace_bytes`."""
        return 0

    def refresh_workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        """A projector's: the most transient bytes of a subspace refresh of a matrix gradient of
        ``shape`` in ``dtype``, declared where a refresh is cheap enough to run every step (the
        DCT's; an SVD's, every ``update_proj_gap`` steps, is not modelled)."""
        return 0

    def shared_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> dict[Any, int]:
        """Caches this part shares between parameters (key -> bytes; a key is counted once)."""
        return {}

    def can_step_in_place(self, param: torch.Tensor, grad: torch.Tensor) -> bool:
        """Whether this rule's :meth:`step_in_place` updates ``param`` (full-rank, with ``grad``)."""
        return False

    def step_in_place(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        group: dict[str, Any],
    ) -> None:
        """The whole step of full-rank parameters that :meth:`can_step_in_place` accepts, in one
        call over all of them (a foreach or fused kernel): advance each state, ``step``
        included, and apply W <- W (1 - lr wd) - update in place. The result is the same
        whether the list holds one parameter or many."""
        raise NotImplementedError

    def step_in_place_workspace_bytes(
        self, params: list[tuple[tuple[int, ...], torch.dtype]], group: dict[str, Any]
    ) -> int:
        """The most transient bytes alive during one :meth:`step_in_place` call over parameters
        of these (shape, dtype)."""
        return 0

    def sharded_layout(self, dim: int) -> StateLayout:
        """Which of this part's state entries follow the rows of a ``dim``-D input whose rows are
        sharded (FSDP2, :mod:`lowmem_optim.sharding`); every other entry is the same on every rank."""
        return StateLayout()


class Rule(Protocol):
    """An update rule over a tensor (the full gradient, or the projected one) and its state.

    The engine hands it ``g`` and the parameter's state dict; the rule updates its own entries
    and returns ``(update, lr_t)``; the engine then applies

        W <- W (1 - lr_t * weight_decay)            (decoupled decay, first, as torch.optim.AdamW)
        W <- W - scale * back_project(update)

    ``update`` already carries the step size (so a rule can average lr-scaled updates, as HF's
    Adafactor does). ``lr_t`` is the group's ``lr`` for most rules; rules with their own
    step-size logic (Adafactor's relative step) return theirs, as a 0-D tensor on the device when
    it depends on values there (a host read would stall a GPU every step).
    """

    hparams: tuple[HParam, ...]

    def update(
        self,
        g: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        param: torch.Tensor,
        shard: RowShard | None = None,
        seed: int = 0,
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Advance the rule's state with ``g`` (``state['step']`` already incremented). With
        ``shard``, ``g`` is this rank's rows (its state entries in :meth:`Part.sharded_layout`
        too) and every reduction over rows is summed over the ranks. ``seed`` seeds any random
        draw of the rule (stochastic rounding of its state): the engine derives it from the
        group's ``seed``, the parameter and the step, so it is the same on every rank, in every
        hook order and after a resume; a rule without draws ignores it. With ``shard``, value i
        of this rank's rows should draw as value ``shard.start * (values per row) + i`` of the
        whole tensor, so the draws do not depend on the sharding."""

    def carry(self, state: dict[str, Any], change: SubspaceChange, dim: int, shard: RowShard | None = None) -> None:
        """Carry the rule's moments into a new subspace (``dim``: the projected dimension; with
        ``shard``, the state holds this rank's rows, as in :meth:`update`)."""


class Storage(Protocol):
    """How a projector's dense basis is kept in the state (as is, or quantized): its keys and its
    bytes; the projector stores and loads the basis with :mod:`lowmem_optim.projection.storage`."""

    hparams: tuple[HParam, ...]

    def basis_bytes(self, numel: int, dtype: torch.dtype, group: dict[str, Any]) -> int:
        """Bytes of one stored basis of ``numel`` values computed in ``dtype``."""


class Projector(Protocol):
    """Chooses, stores and applies a rank-r subspace of one weight matrix's gradient."""

    hparams: tuple[HParam, ...]
    #: the basis storage of a dense projector (None: the projector stores no matrix)
    storage: Storage | None

    def refresh(
        self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], seed: int, shard: RowShard | None = None
    ) -> SubspaceChange:
        """Choose a new subspace from the 2-D ``grad`` and store it in ``state``; ``seed`` seeds
        any random draw (derived from the group's seed, the parameter and the step). With
        ``shard``, ``grad`` is this rank's rows, and the subspace stored is the same on every rank."""

    def project(self, grad: torch.Tensor, state: dict[str, Any], shard: RowShard | None = None) -> torch.Tensor:
        """R: the low-rank gradient (with ``shard`` and a left projection, the ranks' partial
        products P_i^T G_i are summed, so every rank holds R whole)."""

    def back_project(self, low: torch.Tensor, state: dict[str, Any], shard: RowShard | None = None) -> torch.Tensor:
        """The full-size (m x n) image of a low-rank tensor (this rank's rows with ``shard``)."""


class RefreshSchedule(Protocol):
    """When a parameter's subspace is recomputed; owns ``next_refresh`` in the state."""

    hparams: tuple[HParam, ...]

    def due(self, state: dict[str, Any], step: int) -> bool:
        """Whether the subspace is refreshed at ``step``."""

    def record(self, state: dict[str, Any], step: int, group: dict[str, Any], similarity: float | None) -> None:
        """Book a refresh done at ``step`` and plan the next one."""

    def defer(self, state: dict[str, Any], step: int) -> None:
        """Refresh again at the next step (the refresh at ``step`` saw nothing to choose from)."""

    def gap(self, state: dict[str, Any], group: dict[str, Any]) -> int:
        """The parameter's current refresh gap."""
