"""Optimizer-state bytes and optimizer step time: this package's optimizers against their peers.

    pip install -e ".[bench]"      # galore-torch, apollo-torch, torchao: benchmark only
    python -m scripts.bench.peers [--model-config configs/llama_60m.json | --matrix 4096x11008 ...]
        [--rank 128] [--steps 5] [--threads 1] [--device cpu] [--only NAME ...] [--json out.json]

The training comparison (final loss) is a sweep: ``configs/sweeps/peers.yaml``.

Protocol:
- Model: HF ``LlamaForCausalLM`` from ``--model-config`` (default GaLore's 60M), or with
  ``--matrix`` one linear layer's weight of each shape, alone (drawn N(0, 0.02^2)); float32 on
  ``--device``, weights drawn with seed 0, fresh for every optimizer.
- Optimizers: every ``--optimizer`` name of the training CLI (the registry's, where ``adamw``
  and ``adamw8bit`` are torch's and bitsandbytes' classes, and the peers of
  :mod:`train.peers`), built by its ``make_optimizer`` from the same flags: ``--rank`` on every
  linear layer of the decoder (attention and MLP; not the head; ``--rank 0``: none, so AuON,
  Hybrid-AuON and Muon update whole matrices), scale 0.25, other hyperparameters at the CLI's
  defaults.
- Gradients: seeded standard-normal tensors on every parameter (no forward or backward: only
  the optimizer is timed).
- State, after the first step (:func:`train.optim.state_bytes`, :func:`train.optim.retained_bytes`):
  every tensor the optimizer holds for the parameters, per parameter and in KiB, and the
  distinct storages those tensors keep alive (a slice keeps its whole base alive).
- Step time: :func:`scripts.bench.toolkit.median_seconds` of ``--steps`` steps after one
  warm-up step (the first refresh), without a refresh (``update_proj_gap`` larger than the run)
  and all refreshing (``update_proj_gap`` 1), as ratios to ``adamw``'s median in the same run
  (the refresh column means nothing for an optimizer without a subspace).
A peer that is not installed or fails to run is listed as not run, with the reason.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from lowmem_optim import available_optimizers
from scripts.bench.toolkit import LLAMA_60M, OneMatrix, llama, markdown_table, median_seconds, set_gradients, write_json
from train.config import TrainConfig
from train.optim import make_optimizer, retained_bytes, state_bytes
from train.peers import PEERS


def measure(name: str, model_of: Callable[[], nn.Module], args: argparse.Namespace) -> dict:
    model = model_of()
    seeds = itertools.count()

    def timed_step_s(gap: int) -> tuple[float, torch.optim.Optimizer]:
        cfg = TrainConfig(
            model_config=str(args.model_config), optimizer=name, rank=args.rank or None, update_proj_gap=gap, scale=0.25
        )
        optimizer = make_optimizer(cfg, model)
        before = lambda: set_gradients(model, next(seeds))  # noqa: E731
        return median_seconds(optimizer.step, args.steps, args.device, before=before), optimizer

    row = {"optimizer": name, "params": sum(p.numel() for p in model.parameters())}
    try:
        row["step_s"], optimizer = timed_step_s(10**6)
        row.update(state_bytes=state_bytes(optimizer), retained_bytes=retained_bytes(optimizer))
        row["refresh_step_s"] = timed_step_s(1)[0]
    except Exception as err:  # a peer that cannot run here is reported, not hidden
        row["not_run"] = f"{type(err).__name__}: {err}".splitlines()[0][:120]
    return row


def table(rows: list[dict]) -> str:
    base = rows[0]
    columns = ("optimizer", "state bytes/param", "state KiB", "retained KiB", "step vs adamw", "refresh step vs adamw")
    cells = [
        (r["optimizer"], f"not run: {r['not_run']}", "", "", "", "")
        if "not_run" in r
        else (
            r["optimizer"],
            f"{r['state_bytes'] / r['params']:.3f}",
            f"{r['state_bytes'] / 1024:.1f}",
            f"{r['retained_bytes'] / 1024:.1f}",
            f"{r['step_s'] / base['step_s']:.2f}x",
            f"{r['refresh_step_s'] / base['step_s']:.2f}x",
        )
        for r in rows
    ]
    return f"{markdown_table(columns, cells)}\n\nadamw median step: {base['step_s'] * 1e3:.2f} ms\n"


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", default=LLAMA_60M)
    parser.add_argument("--matrix", nargs="+", metavar="OUTxIN", help="one weight matrix of each shape instead")
    parser.add_argument("--rank", type=int, default=128, help="0: none (matrix optimizers unprojected)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="run only the names holding one of these (adamw always runs)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [*available_optimizers(), *PEERS]
    names = [n for n in names if n == "adamw" or not args.only or any(s in n for s in args.only)]
    shapes = {shape: tuple(int(d) for d in shape.split("x")) for shape in args.matrix or ()}
    models = {label: partial(OneMatrix, shape, device=args.device) for label, shape in shapes.items()}
    models = models or {str(args.model_config): partial(llama, args.model_config, device=args.device)}
    print(
        f"rank {args.rank}, {args.device} float32, {torch.get_num_threads()} threads, median of {args.steps} steps "
        f"after 1 warm-up, torch {torch.__version__}"
    )
    results = {}
    for label, model_of in models.items():
        results[label] = [measure(name, model_of, args) for name in names]
        print(f"\n{label}: {results[label][0]['params'] / 1e6:.2f}M parameters\n\n{table(results[label])}")
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    return results


if __name__ == "__main__":
    main()
