"""Where DCTAdamW's quality goes: one short training run per variant of the DCT projection (CPU).

Protocol (as ``projection_training.py``): ``configs/llama_small.json`` (4 layers, hidden 256,
MLP 688, vocab 512), the built-in byte-level corpus, batch 4 x seq 64, 200 steps, linear
warm-up over 10% of them, then cosine decay to 0.1 x lr, no weight decay, no clipping, float32,
one intra-op thread per run (OMP_NUM_THREADS=1), ``--parallel`` runs at a time, each in its own
process. Projected: the weights of every linear layer but the output head (rank 64 of 256),
unless a variant says otherwise; embeddings, head and norms get full-rank AdamW.

Per run and seed (``--seeds``: the model init, the data order and the optimizer seed):

* val loss: the mean loss over the 10 validation batches after the last step;
* state bytes: ``optimizer.state_bytes()`` after the last step (every tensor in the state);
* refreshes: subspace refreshes summed over the projected matrices;
* refresh ms/step: the projector's refresh on the model's projected shapes, timed in-process
  after training (median of 5, on the last gradients), times refreshes per step;
* step s: wall time of all ``optimizer.step()`` calls of the run.

    .venv/bin/python scripts/bench/dct_ablations.py --variants dct_paper,galore_svd --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from projection_training import REPO, protocol_parser  # the same protocol flags (this script's folder)

#: GaLore's recipe here (projection_training.py): lr 1e-2, scale 0.25, a refresh every 10 steps
GALORE = {"optimizer": "galore_adamw", "lr": 1e-2, "group": {"scale": 0.25, "update_proj_gap": 10}}
#: DCTAdamW as published (the authors' defaults): a refresh every step, scale 1, lr 1e-3, no error feedback
DCT = {"optimizer": "dct_adamw", "lr": 1e-3, "group": {"scale": 1.0, "error_feedback": None}}


def _variant(base: dict[str, Any], lr: float | None = None, target: str = "all-linear", **group: Any) -> dict[str, Any]:
    return {
        "optimizer": base["optimizer"],
        "lr": base["lr"] if lr is None else lr,
        "target": target,
        "group": {**base["group"], **group},
    }


VARIANTS: dict[str, dict[str, Any]] = {
    "adamw": {"optimizer": "adamw", "lr": 1e-3, "target": None, "group": {}},
    "galore_svd": _variant(GALORE, proj_method="svd"),
    "galore_dct": _variant(GALORE, proj_method="dct"),
    # the other side for each matrix (moments min(m, n) x r): the 7B recipe's side is chosen on it
    "galore_svd_reverse": _variant(GALORE, proj_method="svd", proj_type="reverse_std"),
    "dct_paper": _variant(DCT),
    # DCTAdamW's class defaults (gap 1, scale 1, NF4 error feedback) at the recipe's lr: dct_efnf4_lr2.5e-3's settings
    "dct_adamw": {"optimizer": "dct_adamw", "lr": 2.5e-3, "target": "all-linear", "group": {}},
    # the earlier pretraining recipe: 4-bit error feedback at GaLore's lr and scale
    "dct_ef4_lr1e-2_s0.25": _variant(DCT, lr=1e-2, scale=0.25, error_feedback="4bit"),
    "dct_l2": _variant(DCT, dct_score="l2"),
    "dct_inplace": _variant(DCT, dct_keep_moments=False),
    "dct_lr2.5e-3": _variant(DCT, lr=2.5e-3),
    "dct_lr5e-3": _variant(DCT, lr=5e-3),
    "dct_lr1e-2_s0.25": _variant(DCT, lr=1e-2, scale=0.25),
    "dct_inplace_lr2.5e-3": _variant(DCT, lr=2.5e-3, dct_keep_moments=False),
    "dct_gap10_lr2.5e-3": _variant(DCT, lr=2.5e-3, update_proj_gap=10),
    "dct_gap10_inplace_lr2.5e-3": _variant(DCT, lr=2.5e-3, update_proj_gap=10, dct_keep_moments=False),
    "dct_gap50_lr2.5e-3": _variant(DCT, lr=2.5e-3, update_proj_gap=50),
    "dct_gap200_lr2.5e-3": _variant(DCT, lr=2.5e-3, update_proj_gap=200),
    "dct_attn_only_lr2.5e-3": _variant(DCT, lr=2.5e-3, target="q_proj,k_proj,v_proj,o_proj"),
    "dct_mlp_only_lr2.5e-3": _variant(DCT, lr=2.5e-3, target="gate_proj,up_proj,down_proj"),
    "galore_svd_attn_only": _variant(GALORE, proj_method="svd", target="q_proj,k_proj,v_proj,o_proj"),
    "dct_type3": _variant(DCT, dct_type=3),
    "dct_type3_inplace": _variant(DCT, dct_type=3, dct_keep_moments=False),
    "dct_type3_lr2.5e-3": _variant(DCT, lr=2.5e-3, dct_type=3),
    "dct_ef": _variant(DCT, error_feedback="float32"),
    "dct_ef_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="float32"),
    "dct_ef8_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="8bit"),
    "dct_ef_inplace_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="float32", dct_keep_moments=False),
    "dct_ef_gap10_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="float32", update_proj_gap=10),
    "galore_svd_ef": _variant(GALORE, proj_method="svd", error_feedback="float32"),
    "dct_ef4_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="4bit"),
    "dct_ef4_type3_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="4bit", dct_type=3),
    "dct_ef_type3_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="float32", dct_type=3),
    "dct_ef4": _variant(DCT, error_feedback="4bit"),
    "dct_ef4_lr5e-3": _variant(DCT, lr=5e-3, error_feedback="4bit"),
    "dct_ef4_lr3.5e-3": _variant(DCT, lr=3.5e-3, error_feedback="4bit"),
    "dct_ef4_type3_lr5e-3": _variant(DCT, lr=5e-3, error_feedback="4bit", dct_type=3),
    "dct_ef4_l2_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="4bit", dct_score="l2"),
    "dct_ef_lr5e-3": _variant(DCT, lr=5e-3, error_feedback="float32"),
    "dct_ef4_lr2e-2_s0.25": _variant(DCT, lr=2e-2, scale=0.25, error_feedback="4bit"),
    "dct_ef_gap2_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="float32", update_proj_gap=2),
    "dct_ef_gap5_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="float32", update_proj_gap=5),
    "dct_ef4_b2_0.99_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="4bit", betas=(0.9, 0.99)),
    "dct_ef4_b2_0.95_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="4bit", betas=(0.9, 0.95)),
    "dct_ef4_lr1.5e-3": _variant(DCT, lr=1.5e-3, error_feedback="4bit"),
    "dct_efnf4_lr2.5e-3": _variant(DCT, lr=2.5e-3, error_feedback="nf4"),
}


def _refresh_ms(optimizer: Any) -> float:
    """Median ms of one refresh over the projected matrices' last gradients (summed over them)."""
    from lowmem_optim.engine import group_parts, matrix_shape, uses_projection

    total = 0.0
    for group in optimizer.param_groups:
        if group.get("rank") is None:
            continue
        projector = group_parts(group).projector
        for p in group["params"]:
            if not uses_projection(p, group):
                continue
            g, scratch = p.grad.reshape(matrix_shape(p)), {}
            times = []
            for _ in range(5):
                start = time.perf_counter()
                projector.refresh(g, scratch, group, 0)
                times.append(time.perf_counter() - start)
            total += statistics.median(times)
    return total * 1e3


def worker(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lowmem_optim.groups import lowrank_param_groups
    from lowmem_optim.registry import get_optimizer_class
    from train.config import TrainConfig
    from train.data import build_data
    from train.loop import evaluate
    from train.model import build_model
    from train.optim import lr_lambda

    spec = VARIANTS[name]
    cfg = TrainConfig(
        model_config=args.model_config,
        optimizer=spec["optimizer"],
        lr=spec["lr"],
        max_steps=args.steps,
        warmup_steps=args.steps // 10,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=seed,
    )
    device = torch.device("cpu")
    data = build_data(
        cfg.data,
        cfg.tokenizer,
        cfg.seq_len,
        cfg.batch_size,
        seed=seed,
        val_fraction=cfg.val_fraction,
        eval_batches=cfg.eval_batches,
    )
    model = build_model(
        cfg.model_config,
        dtype=torch.float32,
        device=device,
        seed=seed,
        vocab_needed=data.tokenizer.vocab_size,
        seq_len=cfg.seq_len,
    )
    cls = get_optimizer_class(spec["optimizer"])
    if spec["target"] is None:
        optimizer = cls(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    else:
        groups = lowrank_param_groups(
            model,
            spec["target"].split(",") if "," in spec["target"] else spec["target"],
            rank=args.rank,
            **spec["group"],
        )
        optimizer = cls(groups, lr=cfg.lr, weight_decay=0.0, seed=seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step_s = 0.0
    for _ in range(cfg.max_steps):
        batch = data.train.next_batch()
        model(input_ids=batch, labels=batch).loss.backward()
        start = time.perf_counter()
        optimizer.step()
        step_s += time.perf_counter() - start
        scheduler.step()
        if _ != cfg.max_steps - 1:
            optimizer.zero_grad(set_to_none=True)
    stats = optimizer.layer_stats() if hasattr(optimizer, "layer_stats") else []
    refreshes = sum(s["refreshes"] for s in stats if s["rank"] is not None)
    return {
        "variant": name,
        "seed": seed,
        "val_loss": evaluate(model, data.val, device),
        "state_bytes": sum(
            t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
        ),
        "refreshes": refreshes,
        "refresh_ms_per_step": _refresh_ms(optimizer)
        * refreshes
        / max(1, sum(1 for s in stats if s["rank"] is not None))
        / cfg.max_steps
        if stats
        else 0.0,
        "step_s": step_s,
        "torch": torch.__version__,
    }


def energy(args: argparse.Namespace, at: list[int]) -> None:
    """Share of the gradient's squared norm that a rank-``args.rank`` projection keeps, averaged over the
    projected matrices, along an AdamW run: top singular vectors vs the best DCT columns (L1 / L2 score,
    type 2 / 3). 1 - share is what a step without error feedback discards."""
    import torch

    from lowmem_optim.engine import matrix_shape
    from lowmem_optim.groups import lowrank_param_groups
    from lowmem_optim.projection.base import projection_sides
    from lowmem_optim.projection.dct import dct_spectrum, select_indices
    from train.data import build_data
    from train.model import build_model

    data = build_data("builtin", None, args.seq_len, args.batch_size, seed=0, val_fraction=0.05, eval_batches=10)
    model = build_model(
        args.model_config,
        dtype=torch.float32,
        device=torch.device("cpu"),
        seed=0,
        vocab_needed=data.tokenizer.vocab_size,
        seq_len=args.seq_len,
    )
    matrices = [
        p for g in lowrank_param_groups(model, "all-linear", rank=args.rank) if g.get("rank") for p in g["params"]
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    print("| step | SVD | DCT-II L1 | DCT-II L2 | DCT-III L1 |\n|---|---|---|---|---|")
    for step in range(1, max(at) + 1):
        batch = data.train.next_batch()
        model(input_ids=batch, labels=batch).loss.backward()
        if step in at:
            shares: dict[str, list[float]] = {"svd": [], "2l1": [], "2l2": [], "3l1": []}
            for p in matrices:
                g = p.grad.reshape(matrix_shape(p)).double()
                dim = 0 if projection_sides(tuple(g.shape), "std")[0] else 1
                total = g.square().sum()
                shares["svd"].append(float(torch.linalg.svdvals(g)[: args.rank].square().sum() / total))
                for kind, dct_type, score in (("2l1", 2, "l1"), ("2l2", 2, "l2"), ("3l1", 3, "l1")):
                    spectrum = dct_spectrum(g, dim, 10**9, dct_type)
                    kept = spectrum.index_select(dim, select_indices(spectrum, dim, args.rank, score))
                    shares[kind].append(float(kept.square().sum() / total))
            print(f"| {step} | " + " | ".join(f"{statistics.mean(v):.3f}" for v in shares.values()) + " |")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = protocol_parser(__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--json", default=None, help="append one JSON line per run to this file")
    parser.add_argument(
        "--energy",
        default=None,
        help="comma-separated steps: print the gradient energy each "
        "projection keeps along an AdamW run (no ablation runs)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.energy is not None:
        energy(args, [int(s) for s in args.energy.split(",")])
        return
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.worker_seed, args)))
        return
    names, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"Invalid --variants: {', '.join(unknown)} (allowed: {', '.join(VARIANTS)})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    passthrough = [
        "--model-config",
        args.model_config,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--rank",
        str(args.rank),
    ]

    def launch(job: tuple[str, int]) -> dict[str, Any]:
        cmd = [sys.executable, __file__, *passthrough, "--worker", job[0], "--worker-seed", str(job[1])]
        out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
        return result

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(launch, [(n, s) for n in names for s in seeds]))
    print(
        f"{args.model_config}, batch {args.batch_size} x seq {args.seq_len}, {args.steps} steps, rank {args.rank}, "
        f"seeds {args.seeds}, OMP_NUM_THREADS=1, torch {results[0]['torch']}"
    )
    print("\n| variant | val loss per seed | mean | state bytes | refreshes | refresh ms/step | step s |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        rs = [r for r in results if r["variant"] == name]
        losses = [r["val_loss"] for r in rs]
        print(
            f"| {name} | {' / '.join(f'{v:.4f}' for v in losses)} | {statistics.mean(losses):.4f} | "
            f"{rs[0]['state_bytes']} | {rs[0]['refreshes']} | {rs[0]['refresh_ms_per_step']:.2f} | "
            f"{statistics.mean(r['step_s'] for r in rs):.1f} |"
        )


if __name__ == "__main__":
    main()
