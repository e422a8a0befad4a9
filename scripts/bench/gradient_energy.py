"""Share of each gradient's squared norm that a rank-r projection keeps: the top r singular
vectors against the best r DCT columns (L1 / L2 score, DCT-II / DCT-III), averaged over the
projected matrices, along a training run. 1 - share is what a step without error feedback
discards.

Protocol: the gradients are those of a ``python -m train`` run that saved checkpoints. From
each checkpoint (and from the run's initial model, step 0) the probe rebuilds the model and the
data stream at that step and takes the gradient of the next training batch, i.e. of step
(checkpoint step + 1), without stepping. Projected matrices: those ``--target-modules
all-linear`` selects at the run's ``--rank``; each projected on the side GaLore projects.
The run behind docs/benchmarks.md (the CPU benchmark's model and data, AdamW at a constant lr
1e-3, no warm-up, a checkpoint every 20 steps):

    OMP_NUM_THREADS=1 python -m train --model-config configs/llama_small.json --batch-size 4 \\
        --seq-len 64 --max-steps 200 --warmup-steps 0 --scheduler constant --rank 64 \\
        --save-every 20 --keep-checkpoints 10 --eval-every 200 --progress false --wandb off \\
        --output-dir runs/gradient_energy
    OMP_NUM_THREADS=1 python -m scripts.bench.gradient_energy runs/gradient_energy --steps 0,20,100,200
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from lowmem_optim.engine import matrix_shape
from lowmem_optim.groups import lowrank_param_groups
from lowmem_optim.projection.base import projection_sides
from lowmem_optim.projection.dct import dct_spectrum, select_indices
from train import checkpoint
from train.config import TrainConfig
from train.data import run_data
from train.model import run_model

#: column -> (DCT type, score); "svd" is the top singular vectors
KINDS = {"SVD": None, "DCT-II L1": (2, "l1"), "DCT-II L2": (2, "l2"), "DCT-III L1": (3, "l1")}


def gradient_at(cfg: TrainConfig, payload: dict | None) -> torch.nn.Module:
    """The model with the gradient of the first batch after ``payload``'s step (None: step 0)."""
    data = run_data(cfg)
    as_run = dataclasses.replace(cfg, dtype="float32", weight_bits=16, init_from=None)
    model = run_model(as_run, torch.device("cpu"), data.tokenizer.vocab_size)
    if payload is not None:
        model.load_state_dict(payload["model"])
        data.train.load_state_dict(payload["data"])
    batch = data.train.next_batch()
    model(input_ids=batch, labels=batch).loss.backward()
    return model


def energy_shares(model: torch.nn.Module, rank: int) -> dict[str, float]:
    """Per column of :data:`KINDS`: the mean over projected matrices of the gradient energy kept."""
    shares: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for group in lowrank_param_groups(model, "all-linear", rank=rank):
        for p in group["params"] if group.get("rank") else []:
            g = p.grad.reshape(matrix_shape(p)).double()
            dim = 0 if projection_sides(tuple(g.shape), "std")[0] else 1
            total = g.square().sum()
            shares["SVD"].append(float(torch.linalg.svdvals(g)[:rank].square().sum() / total))
            for kind, spec in KINDS.items():
                if spec is not None:
                    spectrum = dct_spectrum(g, dim, 10**9, spec[0])
                    kept = spectrum.index_select(dim, select_indices(spectrum, dim, rank, spec[1]))
                    shares[kind].append(float(kept.square().sum() / total))
    return {kind: statistics.mean(values) for kind, values in shares.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the output dir of a python -m train run with checkpoints")
    parser.add_argument("--steps", default="0,20,100,200", help="checkpoint steps (0: the initial model)")
    args = parser.parse_args()
    saved = {checkpoint.step_of(p): p for p in checkpoint.saved(args.run)}
    steps = [int(s) for s in args.steps.split(",")]
    missing = [s for s in steps if s and s not in saved]
    if missing:
        raise ValueError(f"Invalid --steps: {missing} (allowed: 0 or a saved step of {args.run}: {sorted(saved)})")
    payloads = {s: checkpoint.load(saved[s]) if s else None for s in steps}
    if not any(payloads.values()):
        raise ValueError(f"Invalid --steps: {args.steps} (allowed: at least one saved step, to read the run's config)")
    config = next(p["config"] for p in payloads.values() if p is not None)  # the flags and the run's world size
    cfg = TrainConfig(**{f.name: config[f.name] for f in dataclasses.fields(TrainConfig)})
    print(f"{Path(args.run)}: {cfg.model_config}, rank {cfg.rank}, gradient of the batch after each step")
    print("| step | " + " | ".join(KINDS) + " |\n" + "|---" * (len(KINDS) + 1) + "|")
    for step in steps:
        shares = energy_shares(gradient_at(cfg, payloads[step]), cfg.rank)
        print(f"| {step + 1} | " + " | ".join(f"{v:.3f}" for v in shares.values()) + " |")


if __name__ == "__main__":
    main()
