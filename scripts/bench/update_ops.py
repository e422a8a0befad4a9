"""What one optimizer update at 7B width costs: aten ops, host-device syncs, temporaries (and CPU time).

Protocol (figures in the docs come from this script, as printed):
- One weight of LLaMA-7B's ``down_proj`` shape (4096 x 11008, ``--shape``) alone in a model, in
  the low-rank group of each low-rank optimizer of the registry at rank 1024 (the 7B recipe's,
  ``--rank``), class defaults but ``update_proj_gap`` 10^6 (steps 2 and later never refresh);
  INT8 weights off (the weight in ``--dtype``) and on (stochastic rounding). A step is
  ``optimizer.step()`` on a seeded standard-normal ``param.grad``: no forward or backward.
- Counts (:class:`lowmem_optim.tools.op_count.OpCounter`) on the ``meta`` device in ``--dtype``
  (bfloat16, the recipe's): every op runs shape-only, and a sync is a host read of a tensor off
  the CPU, as on a GPU. ``ops`` / ``syncs`` of step 2; ``syncs/load`` of a step after
  ``state_dict()`` -> a new optimizer -> ``load_state_dict()``; ``refresh ops`` / ``refresh
  syncs`` / ``refresh peak MiB`` (the most new storages alive at once) of step 1, after a step
  of another matrix has built what the process caches (such as quantization code maps);
  ``alloc MiB`` (every new storage of step 2) and ``peak MiB`` (the most of them alive at once).
  ``fused ...``: INT8 step 2 as CUDA runs it, each compiled pass of
  :mod:`lowmem_optim.quant.groupwise` one op (:func:`lowmem_optim.tools.op_count.as_one_op`).
  Their CPU time: ``python -m scripts.bench.peers --matrix 4096x11008 --rank 1024``.

``--full-rank CONFIG``: the full-rank parameters of a LLaMA config instead (embedding, head, the
2 L + 1 RMSNorm weights: the 7B recipe's full-rank group) in one group without a rank, stepped
by ``galore_adamw``'s ``step()`` and its ``step_param`` per parameter (layer-wise), torch's
AdamW with and without ``foreach``, and ``q_galore_adamw8bit``'s ``step()`` (eager 8-bit
moments): counts of step 2 on meta (``device ops`` leaves out ops on CPU tensors only, the step
counters); ``fused device ops`` / ``fused peak MiB``: the 8-bit step with bitsandbytes' fused
kernel one op per parameter, as CUDA runs it; ``CPU ms``: the median ``time.process_time()`` of
``--steps`` steps after the first, in ``--cpu-dtype`` (float32: bf16 matmuls are emulated on
these CPUs) with ``--threads`` threads (``--no-time``: skipped).

Usage:
  OMP_NUM_THREADS=1 python -m scripts.bench.update_ops [--rank 1024] [--json out.json]
  OMP_NUM_THREADS=1 python -m scripts.bench.update_ops --full-rank configs/llama_7b.json --no-time
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch import nn

from lowmem_optim.quant import groupwise, int8_linear
from lowmem_optim.registry import LOWRANK_OPTIMIZERS, build_optimizer, get_optimizer_class
from lowmem_optim.rules import adam8bit
from lowmem_optim.tools.llama_config import load_llama_config
from lowmem_optim.tools.op_count import OpCounter, as_one_op
from scripts.bench.toolkit import OneMatrix, markdown_table, median_seconds, set_gradients, write_json

NO_REFRESH_GAP = 10**6
FULL_RANK_WAYS = (
    "galore_adamw step",
    "galore_adamw step_param",
    "adamw foreach",
    "adamw single-tensor",
    "q_galore_adamw8bit step",
)


def counted(model: nn.Module, step: Callable[[], Any], seed: int) -> OpCounter:
    """The counts of one ``step`` on seeded gradients of ``model``'s parameters."""
    counter = OpCounter()
    set_gradients(model, seed)
    with counter:
        step()
    model.zero_grad(set_to_none=True)
    return counter


def cpu_seconds(model: nn.Module, step: Callable[[], Any], steps: int) -> float:
    """Median ``time.process_time()`` of ``steps`` steps after one, each on fresh seeded gradients."""
    seeds = itertools.count(1)
    before = lambda: set_gradients(model, next(seeds))  # noqa: E731
    return median_seconds(step, steps, "cpu", before=before, clock=time.process_time)


def figures(counter: OpCounter, prefix: str = "") -> dict[str, Any]:
    return {
        f"{prefix}ops": counter.ops,
        f"{prefix}alloc_bytes": counter.allocated_bytes,
        f"{prefix}peak_bytes": counter.peak_bytes,
    }


@contextlib.contextmanager
def fused_int8_passes() -> Iterator[None]:
    """INT8 weights as CUDA runs them: each compiled pass of :mod:`lowmem_optim.quant.groupwise` one op."""
    fused = {
        fn: as_one_op(fn, f"fused {fn.__name__}") for fn in (groupwise.dequantize_rows, groupwise.requantize_rows_)
    }
    fusable = lambda codes, group_size: codes.numel() % group_size == 0  # noqa: E731
    with mock.patch.object(int8_linear, "_fusable", fusable), mock.patch.dict(groupwise._COMPILED, fused):
        yield


@contextlib.contextmanager
def fused_adam8bit() -> Iterator[None]:
    """8-bit moments as CUDA runs them: bitsandbytes' fused kernel, one op per parameter."""
    kernel = as_one_op(adam8bit.fused_adam8bit_, "fused 8-bit Adam")
    with (
        mock.patch.object(adam8bit, "fuses", lambda *args: True),
        mock.patch.object(adam8bit, "fused_adam8bit_", kernel),
    ):
        yield


def lowrank_figures(name: str, args: argparse.Namespace, int8: bool) -> dict[str, Any]:
    """The figures of the module docstring for one optimizer, INT8 weights off or on."""
    shape, rank, dtype = tuple(args.shape), args.rank, getattr(torch, args.dtype)
    build = lambda model, **extra: build_optimizer(name, model, rank=rank, update_proj_gap=NO_REFRESH_GAP, **extra)  # noqa: E731
    row: dict[str, Any] = {"optimizer": name, "int8": "on" if int8 else "off"}
    try:
        # what a process builds once and caches (code maps, DCT tables) is no refresh's cost: a
        # first step on another matrix builds it, so no figure depends on which optimizer ran first
        warm = OneMatrix(shape, dtype, "meta", int8)
        counted(warm, build(warm).step, 1)
        model = OneMatrix(shape, dtype, "meta", int8)
        optimizer = build(model)
        refresh = counted(model, optimizer.step, 1)
    except (RuntimeError, NotImplementedError) as err:  # an op with no meta kernel
        print(f"# {name} int8={int8}: no step on the meta device ({str(err).splitlines()[0]})")
        return row
    steady = counted(model, optimizer.step, 2)
    resumed = build(model)
    resumed.load_state_dict(optimizer.state_dict())
    after_load = counted(model, resumed.step, 3)
    row.update(figures(steady), syncs=steady.syncs, syncs_after_load=after_load.syncs)
    row.update(refresh_ops=refresh.ops, refresh_syncs=refresh.syncs, refresh_peak_bytes=refresh.peak_bytes)
    row.update(top_ops=dict(steady.by_op.most_common(8)))
    if int8:
        with fused_int8_passes():
            model = OneMatrix(shape, dtype, "meta", True)
            optimizer = build(model)
            counted(model, optimizer.step, 1)
            row.update(figures(counted(model, optimizer.step, 2), "fused_"))
    return row


def full_rank_model(config: dict[str, Any], dtype: torch.dtype, device: str) -> nn.ParameterList:
    """The embedding, the head and the 2 L + 1 RMSNorm weights of a LLaMA config, drawn N(0, 0.02^2)."""
    vocab, hidden, layers = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    shapes = [(vocab, hidden), (vocab, hidden)] + [(hidden,)] * (2 * layers + 1)
    gen = torch.Generator().manual_seed(0)
    if device == "meta":
        return nn.ParameterList(torch.empty(shape, dtype=dtype, device="meta") for shape in shapes)
    return nn.ParameterList(torch.randn(shape, generator=gen).mul_(0.02).to(dtype) for shape in shapes)


def full_rank_step(way: str, params: nn.ParameterList) -> Callable[[], Any]:
    """One step of ``way`` (:data:`FULL_RANK_WAYS`) over ``params``, as a function of nothing."""
    if way.startswith("adamw"):
        return torch.optim.AdamW(params, foreach=way == "adamw foreach").step
    optimizer = get_optimizer_class(way.split()[0])(params)  # one group without a rank
    if way.endswith("step_param"):
        return lambda: [optimizer.step_param(p) for p in params]
    return optimizer.step


def full_rank_figures(way: str, config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """ops and temporaries of step 2 on meta and the median CPU seconds of a step after the first."""
    row: dict[str, Any] = {"optimizer": way}
    for fused in (False, True) if "8bit" in way else (False,):
        with fused_adam8bit() if fused else contextlib.nullcontext():
            params = full_rank_model(config, getattr(torch, args.dtype), "meta")
            step = full_rank_step(way, params)
            counted(params, step, 1)
            counter = counted(params, step, 2)
        prefix = "fused_" if fused else ""
        row.update({f"{prefix}device_ops": counter.ops - counter.host_ops, f"{prefix}peak_bytes": counter.peak_bytes})
        if not fused:
            row.update(figures(counter), syncs=counter.syncs)
    if not args.no_time:
        params = full_rank_model(config, getattr(torch, args.cpu_dtype), "cpu")
        row["cpu_s"] = cpu_seconds(params, full_rank_step(way, params), args.steps)
    return row


#: (table title, row key): a key ending in ``_bytes`` is shown in MiB, one ending in ``_s`` in ms
DISPATCH_COLUMNS = (
    ("ops", "ops"),
    ("syncs", "syncs"),
    ("syncs/load", "syncs_after_load"),
    ("refresh ops", "refresh_ops"),
)
DISPATCH_COLUMNS += (("refresh syncs", "refresh_syncs"), ("refresh peak MiB", "refresh_peak_bytes"))
DISPATCH_COLUMNS += (("alloc MiB", "alloc_bytes"), ("peak MiB", "peak_bytes"))
DISPATCH_COLUMNS += (("fused ops", "fused_ops"), ("fused alloc MiB", "fused_alloc_bytes"))
DISPATCH_COLUMNS += (("fused peak MiB", "fused_peak_bytes"),)
FULL_RANK_COLUMNS = (("ops", "ops"), ("device ops", "device_ops"), ("syncs", "syncs"), ("alloc MiB", "alloc_bytes"))
FULL_RANK_COLUMNS += (("peak MiB", "peak_bytes"), ("fused device ops", "fused_device_ops"))
FULL_RANK_COLUMNS += (("fused peak MiB", "fused_peak_bytes"), ("CPU ms", "cpu_s"))


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        return f"{value / 2**20:.1f}"
    return f"{1000 * value:.0f}" if key.endswith("_s") else f"{value}"


def _table(first: tuple[str, ...], columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]]) -> str:
    """A markdown table: ``first`` columns (row keys), then one per ``(title, key)`` of ``columns``."""
    cells = [[row[key] for key in first] + [_cell(key, row.get(key)) for _, key in columns] for row in rows]
    return markdown_table([*first, *(title for title, _ in columns)], cells)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(4096, 11008), metavar=("OUT", "IN"))
    parser.add_argument("--rank", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--cpu-dtype", default="float32", choices=("bfloat16", "float32"))
    parser.add_argument("--optimizers", default=",".join(sorted(LOWRANK_OPTIMIZERS)))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-time", action="store_true", help="--full-rank: skip the CPU timing")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--full-rank", metavar="CONFIG", help="the full-rank parameters of this LLaMA config instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}"
    where = f"in {args.dtype} on meta, CPU time in {args.cpu_dtype}"
    if args.full_rank:
        config = load_llama_config(args.full_rank, "--full-rank")
        count = 2 * config["num_hidden_layers"] + 3
        print(f"{machine}, {args.full_rank}: {count} full-rank parameters, counts {where}")
        rows = [full_rank_figures(way, config, args) for way in FULL_RANK_WAYS]
        first, columns = ("optimizer",), FULL_RANK_COLUMNS
    else:
        shape = f"shape {args.shape[0]} x {args.shape[1]}, rank {args.rank}"
        print(f"{machine}, {shape}, dispatch figures {where}")
        rows = [lowrank_figures(name, args, int8) for name in args.optimizers.split(",") for int8 in (False, True)]
        first, columns = ("optimizer", "int8"), DISPATCH_COLUMNS
    print(_table(first, columns, rows))
    write_json(args.json, {"args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
