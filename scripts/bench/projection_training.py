"""Short training runs comparing projectors and refresh schedules on a small LLaMA (CPU).

Runs ``python -m train`` once per configuration, all with the same seed, data, model, steps,
warm-up and schedule, and reads each run's ``metrics.jsonl`` / ``layer_stats.jsonl``:

* refresh schedules: GaLore (exact SVD) with the fixed gap vs the adaptive (Q-GaLore lazy)
  schedule: subspace refreshes summed over all projected matrices, and the loss at the end;
* projectors: GaLore-AdamW with ``--proj-method`` svd, randomized_svd and dct (same rank, gap,
  scale, lr), DCTAdamW with the paper's defaults (same rank; refresh every step, scale 1, lr
  1e-3) and full AdamW (lr 1e-3): the loss after the same budget of steps.

"final train loss" is the mean of the last ``--tail`` logged training losses; "val loss" the
evaluation at the last step. Each run is its own process with one intra-op thread
(OMP_NUM_THREADS=1), ``--parallel`` of them at a time.

    .venv/bin/python scripts/bench/projection_training.py [--steps 200] [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

RUNS = {
    "adamw": ["--optimizer", "adamw", "--lr", "1e-3"],
    "galore_svd_fixed": ["--optimizer", "galore_adamw", "--proj-method", "svd", "--refresh", "fixed"],
    "galore_svd_adaptive": ["--optimizer", "galore_adamw", "--proj-method", "svd", "--refresh", "adaptive"],
    "galore_randomized_svd": ["--optimizer", "galore_adamw", "--proj-method", "randomized_svd", "--refresh", "fixed"],
    "galore_dct": ["--optimizer", "galore_adamw", "--proj-method", "dct", "--refresh", "fixed"],
    "dct_adamw": ["--optimizer", "dct_adamw", "--lr", "1e-3"],  # the paper's defaults: gap 1, scale 1
}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def protocol_parser(description: str) -> argparse.ArgumentParser:
    """The benchmark's model, steps, batch, sequence length and rank flags (shared with dct_ablations.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-config", default=str(REPO / "configs" / "llama_small.json"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=64)
    return parser


def main() -> None:
    parser = protocol_parser(__doc__.split("\n")[0])
    parser.add_argument("--gap", type=int, default=10)
    parser.add_argument("--lowrank-lr", default="1e-2", help="lr of the GaLore runs (scale 0.25); AdamW uses 1e-3")
    parser.add_argument("--tail", type=int, default=5, help="logged losses averaged for the final train loss")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--output-root", default=str(REPO / "runs" / "bench_projection_training"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    common = [
        "--model-config",
        args.model_config,
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--warmup-steps",
        str(args.steps // 10),
        "--eval-every",
        str(args.steps),
        "--log-every",
        "5",
        "--seed",
        "0",
        "--wandb",
        "off",
        "--progress",
        "false",
        "--save-every",
        "0",
    ]
    lowrank = ["--rank", str(args.rank), "--update-proj-gap", str(args.gap), "--scale", "0.25", "--lr", args.lowrank_lr]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(name: str) -> tuple[str, float]:
        out = Path(args.output_root) / name
        shutil.rmtree(out, ignore_errors=True)  # this script's own folder: a fresh run each time
        recipe = lowrank if name.startswith("galore_") else ["--rank", str(args.rank)] if name != "adamw" else []
        cmd = [sys.executable, "-m", "train", *common, *RUNS[name], *recipe, "--output-dir", str(out)]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        return name, time.perf_counter() - start

    names = args.runs.split(",")
    with ThreadPoolExecutor(args.parallel) as pool:
        walls = dict(pool.map(launch, names))

    results = {}
    for name in names:
        out = Path(args.output_root) / name
        metrics = _read(out / "metrics.jsonl")
        losses = [m["loss"] for m in metrics if "loss" in m]
        stats = _read(out / "layer_stats.jsonl") if (out / "layer_stats.jsonl").exists() else []
        layers = stats[-1]["layers"] if stats else []  # AdamW logs none
        results[name] = {
            "final_train_loss": sum(losses[-args.tail :]) / len(losses[-args.tail :]),
            "val_loss": next(m["val_loss"] for m in reversed(metrics) if "val_loss" in m),
            "refreshes": sum(layer["refreshes"] for layer in layers if layer["rank"] is not None),
            "projected_matrices": sum(1 for layer in layers if layer["rank"] is not None),
            "max_gap": max((layer["gap"] for layer in layers if layer["gap"] is not None), default=None),
            "wall_s": walls[name],
        }
    print(
        f"{args.model_config}, batch {args.batch_size} x seq {args.seq_len}, {args.steps} steps, seed 0, "
        f"rank {args.rank}, gap {args.gap}, scale 0.25, lr {args.lowrank_lr} (AdamW 1e-3), "
        f"warm-up {args.steps // 10}, OMP_NUM_THREADS=1, {args.parallel} runs at a time"
    )
    print("\n| run | final train loss | val loss | refreshes (all matrices) | largest gap at the end | wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['final_train_loss']:.4f} | {r['val_loss']:.4f} | {r['refreshes']} | {r['max_gap']} | "
            f"{r['wall_s']:.0f} |"
        )
    fixed, adaptive = results.get("galore_svd_fixed"), results.get("galore_svd_adaptive")
    if fixed and adaptive and fixed["refreshes"]:
        print(
            f"\nadaptive schedule: {1 - adaptive['refreshes'] / fixed['refreshes']:.0%} fewer refreshes "
            "than the fixed gap"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
