"""``lowmem-optim``: the package's console script.

    lowmem-optim memory --model-config configs/llama_7b.json --optimizer q_galore_adamw8bit \\
        --rank 1024 --weight-bits 8 --proj-bits 4 --batch-size 16 --seq-len 256 \\
        --activation-checkpointing --layerwise [--json]

prints the bytes of weights, gradients, optimizer states, projections, activations, the update's
workspace, and the predicted peak (:mod:`lowmem_optim.tools.memory`).

    lowmem-optim fit --model-config configs/llama_7b.json --memory-gib 12 [--json]

prints the training flags of the low-memory setup that fits a card of that memory, with its
prediction and the budget (:mod:`lowmem_optim.tools.memory_fit`).

    lowmem-optim traffic --model-config configs/llama_7b.json --world 2 --rank 1024 \\
        [--optimizer galore_adamw muon ...] [--json]

prints the bytes each rank sends through the optimizers' collectives under FSDP2 per plain step,
first and later refresh step, and what splitting a left projection's R costs and saves, for every
optimizer that steps sharded parameters at its defaults with that rank (APOLLO-Mini: its own
rank 1), float32 gradients (:mod:`lowmem_optim.tools.traffic`; a prediction from the shapes).
Flags shared with the training CLI have its names; snake_case spellings are accepted too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from lowmem_optim.groups import TARGET_MODULES_HELP, check_some_matrix_projected, parse_target_modules
from lowmem_optim.layerwise import ACCUMULATION_BUFFERS
from lowmem_optim.registry import (
    LOWRANK_OPTIMIZERS,
    MATRIX_OPTIMIZERS,
    available_optimizers,
    build_optimizer,
    check_int8_capable,
    lowrank_defaults,
    momentum_dtype_optimizers,
)
from lowmem_optim.rules.momentum_storage import MOMENTUM_DTYPES
from lowmem_optim.tools.llama_config import check_seq_len, load_llama_config
from lowmem_optim.tools.memory import (
    COMPONENTS,
    DTYPES,
    WEIGHT_BITS,
    LlamaShape,
    TrainingSetup,
    estimate_memory,
    llama_skeleton,
)
from lowmem_optim.tools.memory_fit import budget_bytes, fitting
from lowmem_optim.tools.traffic import gather_every_gradient_bytes, left_split, predicted_bytes, sharding_optimizers


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    spellings = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*spellings, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowmem-optim", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    memory = commands.add_parser("memory", help="predict the memory of a LLaMA training step")
    _flag(memory, "model-config", required=True, help="LLaMA config JSON (HF LlamaConfig fields)")
    _flag(memory, "optimizer", required=True, choices=available_optimizers())
    _flag(memory, "rank", type=int, default=None, help="subspace rank (low-rank optimizers)")
    _flag(
        memory,
        "weight-bits",
        type=int,
        default=16,
        choices=WEIGHT_BITS,
        help="32: float32 weights; 16: weights in --dtype; 8: INT8 linear layers",
    )
    _flag(
        memory,
        "dtype",
        default=None,
        choices=tuple(DTYPES),
        help="compute dtype (default: float32 for --weight-bits 32, else bfloat16)",
    )
    _flag(memory, "proj-bits", type=int, default=None, choices=(4, 8, 16), help="bits of the stored projections")
    _flag(memory, "batch-size", type=int, required=True)
    _flag(memory, "seq-len", type=int, required=True)
    _flag(memory, "activation-checkpointing", action="store_true")
    _flag(memory, "layerwise", action="store_true", help="layer-wise updates (gradients freed in backward)")
    _flag(
        memory,
        "total-batch-size",
        type=int,
        default=None,
        help="sequences per optimizer step (default: --batch-size); more is accumulated over micro-batches",
    )
    _flag(
        memory,
        "accumulation-buffer",
        default=TrainingSetup.accumulation_buffer,
        choices=ACCUMULATION_BUFFERS,
        help="with --layerwise and several micro-batches: where projected gradients are summed (the training CLI's)",
    )
    _flag(
        memory,
        "loss-chunk-tokens",
        type=int,
        default=TrainingSetup.loss_chunk_tokens,
        help="tokens per chunk of the loss (0: unchunked; default: the training loop's)",
    )
    _flag(memory, "target-modules", default="all-linear", help=f"low-rank/INT8 linear layers: {TARGET_MODULES_HELP}")
    _flag(
        memory,
        "momentum-dtype",
        default=None,
        choices=MOMENTUM_DTYPES,
        help="how Muon, AuON and Hybrid-AuON store their momentum (the training CLI's)",
    )
    _flag(memory, "json", action="store_true", help="print one JSON object")
    fit = commands.add_parser("fit", help="the low-memory training setup that fits a card of a given memory")
    _flag(fit, "model-config", required=True, help="LLaMA config JSON (HF LlamaConfig fields)")
    _flag(fit, "memory-gib", type=float, required=True, help="the card's memory in GiB (e.g. 12, 16, 24)")
    _flag(fit, "seq-len", type=int, default=256)
    _flag(fit, "total-batch-size", type=int, default=512, help="sequences per optimizer step")
    _flag(fit, "json", action="store_true", help="print one JSON object")
    traffic = commands.add_parser("traffic", help="predict the bytes each rank sends per step under FSDP2")
    _flag(traffic, "model-config", required=True, help="LLaMA config JSON (HF LlamaConfig fields)")
    _flag(traffic, "world", type=int, required=True, help="ranks the weights are sharded over (>= 2)")
    _flag(traffic, "rank", type=int, required=True, help="subspace rank of the low-rank optimizers")
    _flag(
        traffic,
        "optimizer",
        nargs="+",
        default=None,
        choices=sharding_optimizers(),
        help="optimizers to predict (default: every one that steps FSDP2-sharded parameters)",
    )
    _flag(traffic, "json", action="store_true", help="print one JSON object")
    return parser


def memory_command(args: argparse.Namespace) -> dict[str, int]:
    """The estimate; ValueError for what the training CLI would refuse too (the same config
    loader, ``--target-modules`` parser, sequence length, rank and INT8 checks)."""
    config = load_llama_config(args.model_config)
    check_seq_len(config, args.seq_len, args.model_config)
    targets = parse_target_modules(args.target_modules)
    if args.weight_bits == 8:
        check_int8_capable(args.optimizer)
    if args.rank is not None and args.optimizer in LOWRANK_OPTIMIZERS | MATRIX_OPTIMIZERS:
        check_some_matrix_projected(llama_skeleton(LlamaShape.from_config(config), torch.float32), targets, args.rank)
    kwargs = ()
    if args.momentum_dtype is not None:
        if args.optimizer not in momentum_dtype_optimizers():
            raise ValueError(
                f"--momentum-dtype {args.momentum_dtype} with --optimizer {args.optimizer}, which keeps no "
                f"normalized momentum (allowed: --optimizer {', '.join(momentum_dtype_optimizers())})"
            )
        kwargs = (("momentum_dtype", args.momentum_dtype),)
    setup = TrainingSetup(
        optimizer=args.optimizer,
        rank=args.rank,
        weight_bits=args.weight_bits,
        dtype=args.dtype,
        proj_bits=args.proj_bits,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        activation_checkpointing=args.activation_checkpointing,
        layerwise=args.layerwise,
        total_batch_size=args.total_batch_size,
        accumulation_buffer=args.accumulation_buffer,
        loss_chunk_tokens=args.loss_chunk_tokens,
        target_modules=targets,
        optimizer_kwargs=kwargs,
    )
    return estimate_memory(config, setup).as_dict()


def fit_command(args: argparse.Namespace) -> dict[str, Any]:
    """The setup :func:`lowmem_optim.tools.memory_fit.fitting` chooses: its flags, the prediction and
    the budget; ValueError when none fits or for bad input."""
    config = load_llama_config(args.model_config)
    check_seq_len(config, args.seq_len, args.model_config)
    budget = budget_bytes(args.memory_gib)
    found = fitting(config, args.memory_gib, args.seq_len, args.total_batch_size)
    if found is None:
        raise ValueError(
            f"no setup of {args.model_config} fits --memory-gib {args.memory_gib:g} (budget "
            f"{budget / 2**30:.2f} GiB, the smallest search setup included); try a smaller --seq-len"
        )
    return {"flags": found.flags(), "budget_bytes": budget, **found.estimate.as_dict()}


def traffic_command(args: argparse.Namespace) -> dict[str, Any]:
    """Per optimizer, the bytes one rank sends per plain, first-refresh and later-refresh step and
    :func:`~lowmem_optim.tools.traffic.left_split`, with the naive gather of every gradient;
    ValueError for bad input."""
    config = load_llama_config(args.model_config)
    if args.world < 2:
        raise ValueError(f"--world {args.world}: one rank sends nothing (allowed: an int >= 2)")
    if args.rank < 1:
        raise ValueError(f"--rank {args.rank} (allowed: an int >= 1)")
    model = llama_skeleton(LlamaShape.from_config(config), torch.float32)
    check_some_matrix_projected(model, parse_target_modules("all-linear"), args.rank)
    optimizers = {}
    for name in args.optimizer or sharding_optimizers():
        keys = {"rank": lowrank_defaults(name).get("rank", args.rank)} if name in LOWRANK_OPTIMIZERS else {}
        optimizer = build_optimizer(name, model, **keys)
        traffic = predicted_bytes(optimizer, args.world)
        optimizers[name] = {
            **{f"{kind}_bytes": sent for kind, sent in traffic._asdict().items()},
            "left_split": left_split(optimizer, args.world),
        }
    naive = gather_every_gradient_bytes(model, args.world)
    return {"world": args.world, "rank": args.rank, "naive_bytes": naive, "optimizers": optimizers}


def _size(nbytes: float) -> str:
    """Bytes below 10 kB as they are, below 10 MiB in KiB, more in MiB (one decimal)."""
    if nbytes < 10_000:
        return f"{nbytes:.0f} B"
    return f"{nbytes / 2**10:.1f} KiB" if nbytes < 10 * 2**20 else f"{nbytes / 2**20:.1f} MiB"


def _markdown(columns: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = [columns, ["---"] * len(columns), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _traffic_tables(result: dict[str, Any]) -> str:
    """The prediction as two markdown tables: bytes per step, and the left projections' split."""
    naive = _size(result["naive_bytes"])
    columns = ("optimizer", "plain step", "first refresh", "later refresh", "naive: gather every gradient")
    rows = [
        (name, _size(r["step_bytes"]), _size(r["refresh_bytes"]), _size(r["later_refresh_bytes"]), naive)
        for name, r in result["optimizers"].items()
    ]
    title = f"Bytes each rank sends per optimizer step, {result['world']} ranks, rank {result['rank']} (predicted)"
    text = f"{title}\n\n{_markdown(columns, rows)}"
    splits = [
        (name, r["left_split"]) for name, r in result["optimizers"].items() if r["left_split"]["replicated_state"]
    ]
    if splits:
        columns = ("optimizer", "state of R per rank, split / whole", "sent per step by the split", "split")
        rows = [
            (
                name,
                f"{_size(s['split_state'])} / {_size(s['replicated_state'])}",
                _size(s["gather_bytes"]),
                "yes" if s["split"] else "no",
            )
            for name, s in splits
        ]
        text += f"\n\nLeft projections (R = P^T G): the rule's state of R\n\n{_markdown(columns, rows)}"
    return text


def _table(result: dict[str, int]) -> str:
    rows = [(name, result[f"{name}_bytes"]) for name in (*COMPONENTS, "total")]
    return "\n".join(f"{name:<22}{value:>16,d} B {value / 2**30:>9.3f} GiB" for name, value in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = {"fit": fit_command, "memory": memory_command, "traffic": traffic_command}[args.command](args)
    except ValueError as err:
        print(f"lowmem-optim: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif args.command == "traffic":
        print(_traffic_tables(result))
    elif args.command == "fit":
        print(" ".join(result["flags"]))
        print(_table(result))
        print(f"{'budget':<22}{result['budget_bytes']:>16,d} B {result['budget_bytes'] / 2**30:>9.3f} GiB")
    else:
        print(_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
