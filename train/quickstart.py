"""Quickstart: train a small LLaMA offline on CPU with GaLore and with AdamW, print them side by side.

    python -m train.quickstart [--steps 200] [--optimizers adamw,galore_adamw] [--output-root runs/quickstart]
                               [--model-config configs/llama_small.json] [--batch-size 8] [--seq-len 128] [--rank 64]
                               [any flag of python -m train, passed to every run]

Each optimizer trains in its own process (``python -m train``), so each peak-memory figure is that
process's own. Defaults: llama_small (hidden 256, 4 layers, 3.4M parameters), the built-in corpus
(Python's docstrings, byte tokenizer), batch 8 x 128 tokens, cosine schedule with 10% warm-up, seed
0; low-rank optimizers at rank 64, gap 50, scale 0.25, lr 0.01 (dct_adamw: its own gap 1 and scale
1, at its pretraining recipe's lr 0.0025); the others at lr 0.003. The table gives the mean training
loss of the last 10 steps, the final validation loss and perplexity, the peak memory (torch and
transformers included on CPU), the optimizer state (bytes of its tensors) and tokens/s over the run,
and over steps 2+ (step 1 holds one-time costs: allocation, kernel selection, the first subspace
refresh). Peak memory is the process's peak RSS on CPU (``torch.cuda.max_memory_allocated`` on a
GPU). ``--output-root`` is the quickstart's own folder: each optimizer's run folder in it is
replaced on every call.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from lowmem_optim.registry import LOWRANK_OPTIMIZERS
from train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]

ADAMW_LR = 3e-3  # GaLore's 60M runs used 1e-3 for AdamW and 1e-2 for GaLore; this model is smaller


#: the low-rank runs' subspace settings: GaLore's scale and lr, and a refresh every 50 steps so a
#: short run sees several subspaces; DCT-AdamW keeps its own (a new subspace every step, scale 1) at
#: the lr of its recipe in scripts/pretrain_common.sh (GaLore's lr is 4x too large at scale 1)
GALORE_LOWRANK = ["--update-proj-gap=50", "--scale=0.25", "--lr=1e-2"]
OWN_LOWRANK = {"dct_adamw": ["--lr=2.5e-3"]}


def command(optimizer: str, args: argparse.Namespace, out: Path) -> list[str]:
    lowrank = [f"--rank={args.rank}", *OWN_LOWRANK.get(optimizer, GALORE_LOWRANK)]
    return [
        sys.executable,
        "-m",
        "train",
        f"--model-config={args.model_config}",
        f"--optimizer={optimizer}",
        *(lowrank if optimizer in LOWRANK_OPTIMIZERS else [f"--lr={ADAMW_LR}"]),
        f"--batch-size={args.batch_size}",
        f"--seq-len={args.seq_len}",
        f"--max-steps={args.steps}",
        f"--warmup-steps={max(1, args.steps // 10)}",
        f"--eval-every={args.steps}",
        "--eval-batches=8",
        "--seed=0",
        "--data=builtin",
        f"--output-dir={out}",
        "--wandb=off",
    ]


def summarize(optimizer: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    last = records[-10:]
    return {
        "optimizer": optimizer,
        "train_loss": sum(r["loss"] for r in last) / len(last),
        "val_loss": records[-1]["val_loss"],
        "val_ppl": records[-1]["val_ppl"],
        "peak_mem_mib": max(r["peak_mem_bytes"] for r in records) / 2**20,
        "opt_state_kib": records[-1]["opt_state_bytes"] / 2**10,
        # tokens over the run / its training time (each record covers one step here); and the
        # same without step 1, which holds one-time costs (allocation, kernels, the first refresh)
        "tokens_per_s": len(records) / sum(1 / r["tokens_per_s"] for r in records),
        "tokens_per_s_after_step1": (len(records) - 1) / sum(1 / r["tokens_per_s"] for r in records[1:]),
    }


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| optimizer | train loss (last 10) | val loss | val ppl | peak memory (MiB) | optimizer state (KiB) "
        "| tokens/s | tokens/s after step 1 |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['train_loss']:.3f} | {r['val_loss']:.3f} | {r['val_ppl']:.2f} | "
            f"{r['peak_mem_mib']:.0f} | {r['opt_state_kib']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s_after_step1']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m train.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--optimizers", default="adamw,galore_adamw", help="comma-separated registry names")
    parser.add_argument("--output-root", default="runs/quickstart", help="the quickstart's own folder")
    parser.add_argument("--model-config", default=str(REPO / "configs" / "llama_small.json"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=64, help="rank of the low-rank optimizers")
    args, extra = parser.parse_known_args(argv)  # unknown flags go to every run (e.g. --dtype=bfloat16)
    if args.steps < 10:
        raise SystemExit(f"error: --steps {args.steps}: at least 10 (the table averages the last 10 steps)")
    root = Path(args.output_root)
    rows = []
    for optimizer in [o.strip() for o in args.optimizers.split(",") if o.strip()]:
        out = root / optimizer
        shutil.rmtree(out, ignore_errors=True)
        print(f"== {optimizer}: {args.steps} steps on CPU, output in {out}", flush=True)
        if subprocess.run(command(optimizer, args, out) + extra).returncode != 0:
            raise SystemExit(f"error: the {optimizer} run failed (see the messages above)")
        rows.append(summarize(optimizer, read_jsonl(out / "metrics.jsonl")))
    (root / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"\n{Path(args.model_config).name}, built-in corpus, byte tokenizer, batch {args.batch_size} x {args.seq_len}, "
        f"{args.steps} steps, {'GPU' if torch.cuda.is_available() else 'CPU'}\n"
    )
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
