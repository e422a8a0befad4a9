"""Quickstart: train a small LLaMA offline on CPU with GaLore and with AdamW, print them side by side.

    python -m train.quickstart [--steps 200] [--optimizers adamw,galore_adamw] [--output-root runs/quickstart]

Each optimizer trains in its own process (``python -m train``), so each peak-memory figure is
that process's own: llama_small (hidden 256, 4 layers, 3.4M parameters), the built-in corpus
(Python's docstrings, byte tokenizer), batch 8 x 128 tokens, cosine schedule with 10% warm-up,
seed 0. The table gives the mean training loss of the last 10 steps, the final validation loss
and perplexity, the peak RSS of the process (torch and transformers included), the optimizer
state (bytes of its tensors) and tokens/s over the run. ``--output-root`` is the quickstart's
own folder: each optimizer's run folder in it is replaced on every call.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from lowmem_optim.registry import LOWRANK_OPTIMIZERS
from train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "configs" / "llama_small.json"

#: learning rates as GaLore's 60M runs set them (AdamW 1e-3 there; 3e-3 suits this smaller model)
ADAMW_FLAGS = ["--lr=3e-3"]
LOWRANK_FLAGS = ["--lr=1e-2", "--rank=64", "--update-proj-gap=50", "--scale=0.25"]


def command(optimizer: str, steps: int, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "train", f"--model-config={MODEL}", f"--optimizer={optimizer}",
        *(LOWRANK_FLAGS if optimizer in LOWRANK_OPTIMIZERS else ADAMW_FLAGS),
        "--batch-size=8", "--seq-len=128", f"--max-steps={steps}", f"--warmup-steps={max(1, steps // 10)}",
        f"--eval-every={steps}", "--eval-batches=8", "--seed=0", "--data=builtin", f"--output-dir={out}",
        "--wandb=off",
    ]


def summarize(optimizer: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    last = records[-10:]
    return {
        "optimizer": optimizer,
        "train_loss": sum(r["loss"] for r in last) / len(last),
        "val_loss": records[-1]["val_loss"],
        "val_ppl": records[-1]["val_ppl"],
        "peak_rss_mib": max(r["peak_mem_bytes"] for r in records) / 2**20,
        "opt_state_kib": records[-1]["opt_state_bytes"] / 2**10,
        # tokens over the whole run / its training time (each record covers one step here)
        "tokens_per_s": len(records) / sum(1 / r["tokens_per_s"] for r in records),
    }


def table(rows: list[dict[str, Any]]) -> str:
    header = "| optimizer | train loss (last 10) | val loss | val ppl | peak RSS (MiB) | optimizer state (KiB) | tokens/s |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['train_loss']:.3f} | {r['val_loss']:.3f} | {r['val_ppl']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['opt_state_kib']:.0f} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m train.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--optimizers", default="adamw,galore_adamw", help="comma-separated registry names")
    parser.add_argument("--output-root", default="runs/quickstart", help="the quickstart's own folder")
    args = parser.parse_args(argv)
    if args.steps < 10:
        raise SystemExit(f"error: --steps {args.steps}: at least 10 (the table averages the last 10 steps)")
    root = Path(args.output_root)
    rows = []
    for optimizer in [o.strip() for o in args.optimizers.split(",") if o.strip()]:
        out = root / optimizer
        shutil.rmtree(out, ignore_errors=True)
        print(f"== {optimizer}: {args.steps} steps on CPU, output in {out}", flush=True)
        if subprocess.run(command(optimizer, args.steps, out)).returncode != 0:
            raise SystemExit(f"error: the {optimizer} run failed (see the messages above)")
        rows.append(summarize(optimizer, read_jsonl(out / "metrics.jsonl")))
    (root / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nllama_small ({MODEL.name}), built-in corpus, byte tokenizer, batch 8 x 128, {args.steps} steps, CPU\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
