"""The one table of LLaMA-7B memory figures (docs/llama7b_memory.md), from recorded traces and the memory model.

    python scripts/docs_llama7b_table.py                       # rewrite docs/llama7b_memory.md
    python scripts/docs_llama7b_table.py --check               # exit 1 if the page differs (tests check it)
    python scripts/docs_llama7b_table.py --record RUN/memory_trace.json [--gpu-memory 16]

Rows are the recorded traces (docs/llama7b_traces.json: one per recipe and micro-batch, each
written by ``--record`` from the output of python -m train.memory_trace, with the command that
made it). For each row the page gives the memory model's prediction for the same flags, computed
now (:func:`lowmem_optim.tools.memory.estimate_memory`), the traced peak and its split, and the peak
measured on a GPU where a run recorded one (``gpu`` in the row). Every 7B memory figure the
README and docs/ quote comes from this page (tests/test_llama7b_table.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowmem_optim.tools.llama_config import load_llama_config  # noqa: E402
from lowmem_optim.tools.memory import TrainingSetup, estimate_memory  # noqa: E402
from lowmem_optim.tools.memory_trace import CATEGORIES  # noqa: E402

PAGE = REPO / "docs" / "llama7b_memory.md"
TRACES = REPO / "docs" / "llama7b_traces.json"
CONFIG = "configs/llama_7b.json"
GIB = 2**30
TRACE_COMMAND = "ENTRY=train.memory_trace GPU_MEMORY={card} BATCH_SIZE={batch} bash scripts/pretrain_llama7b.sh"


def gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def predicted_bytes(row: dict) -> int:
    setup = {**row["setup"], "optimizer_kwargs": tuple(row["setup"].get("optimizer_kwargs", {}).items())}
    return estimate_memory(load_llama_config(str(REPO / CONFIG)), TrainingSetup(**setup)).total_bytes


def recipe_batch(card: int) -> int:
    """The micro-batch scripts/pretrain_llama7b.sh gives the recipe of a ``card`` GB card."""
    for line in (REPO / "scripts" / "pretrain_llama7b.sh").read_text().splitlines():
        if line.strip().startswith(f"{card})"):
            return int(line.split("batch=")[1].split()[0])
    raise ValueError(f"Invalid card: {card!r} (allowed: a GPU_MEMORY of scripts/pretrain_llama7b.sh)")


def figures(rows: list[dict]) -> set[str]:
    """Every GiB figure of the page, as written (two decimals)."""
    out = set()
    for row in rows:
        out |= {gib(predicted_bytes(row)), gib(row["traced_bytes"])}
        out |= {gib(v) for v in row["traced_split"].values()}
        if row.get("gpu"):
            out |= {gib(row["gpu"]["allocated_bytes"]), gib(row["gpu"]["reserved_bytes"])}
    return out


def page(rows: list[dict]) -> str:
    lines = [
        "# LLaMA-7B memory: one table",
        "",
        "<!-- written by scripts/docs_llama7b_table.py from docs/llama7b_traces.json; do not edit -->",
        "",
        "Every LLaMA-7B memory figure of the README and docs/ is one of this page's. Recipes of",
        "`scripts/pretrain_llama7b.sh` (`GPU_MEMORY` 12, 16, 24; 512 sequences of 256 tokens per",
        "update). *Predicted*: the memory model (`lowmem-optim memory`, [memory.md](memory.md)).",
        "*Traced*: the recipe's own training step at full shapes on valueless tensors, every live",
        "storage counted (`python -m train.memory_trace`, [memory.md](memory.md#a-traced-7b-step));",
        "its peak is what `torch.cuda.max_memory_allocated` would count before allocator rounding",
        "(the CUDA context, 0.3-0.5 GiB, comes on top). *GPU*: measured by",
        "`scripts/bench/gpu_session.sh` where a run recorded it. The budget of a card is what",
        "`lowmem-optim fit` allows a predicted peak (14.0 GiB on a 16 GB card).",
        "",
        "| card | recipe | micro-batch | predicted GiB | traced GiB | model vs trace | GPU allocated / reserved GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s, predicted, traced = row["setup"], predicted_bytes(row), row["traced_bytes"]
        weights = "INT8" if s["weight_bits"] == 8 else "bf16"
        in_script = recipe_batch(row["card"]) == s["batch_size"]
        recipe = f"{weights} weights, rank {s['rank']}" + ("" if in_script else " (not the script's)")
        micro = f"{s['batch_size']} x {s['seq_len']}, {s['total_batch_size'] // s['batch_size']} per update"
        gpu = row.get("gpu")
        measured = f"{gib(gpu['allocated_bytes'])} / {gib(gpu['reserved_bytes'])}" if gpu else "not measured yet"
        lines.append(
            f"| {row['card']} GB | {recipe} | {micro} | {gib(predicted)} | {gib(traced)} | "
            f"{predicted / traced - 1:+.1%} | {measured} |"
        )
    phases = sorted({row["traced_phase"] for row in rows})
    lines += [
        "",
        f"The traced peak of each row, split (GiB), reached in: {', '.join(phases)} (of 2 steps of 3",
        "micro-batches traced; step 1 refreshes every subspace):",
        "",
        "| card | micro-batch | " + " | ".join(c.replace("_", " ") for c in CATEGORIES) + " |",
        "|---|---|" + "---|" * len(CATEGORIES),
    ]
    for row in rows:
        split = " | ".join(gib(row["traced_split"][c]) for c in CATEGORIES)
        lines.append(f"| {row['card']} GB | {row['setup']['batch_size']} | {split} |")
    lines += ["", "Commands (each trace takes 12-35 minutes on two shared CPU cores):", ""]
    for row in rows:
        lines.append(f"- `{row['command']}`")
    return "\n".join(lines) + "\n"


def record(path: Path, card: int) -> None:
    """Add (or replace) the row of a trace written by python -m train.memory_trace."""
    from train.config import TrainConfig
    from train.memory_trace import training_setup

    trace = json.loads(path.read_text())
    cfg = TrainConfig(**trace["config"])
    setup = training_setup(cfg).__dict__
    row = {
        "card": card,
        "setup": {**setup, "optimizer_kwargs": dict(setup["optimizer_kwargs"])},
        "traced_bytes": trace["peak_bytes"],
        "traced_phase": trace["peak_phase"],
        "traced_split": trace["peak_split"],
        "traced_seconds": round(trace["seconds"]),
        "command": TRACE_COMMAND.format(card=card, batch=cfg.batch_size),
        "gpu": None,
    }
    rows = [r for r in load_rows() if (r["card"], r["setup"]["batch_size"]) != (card, cfg.batch_size)]
    rows.append(row)
    rows.sort(key=lambda r: (r["card"], -r["setup"]["batch_size"]))
    TRACES.write_text(json.dumps(rows, indent=1) + "\n")


def load_rows() -> list[dict]:
    return json.loads(TRACES.read_text()) if TRACES.exists() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from what would be written")
    parser.add_argument("--record", type=Path, help="a memory_trace.json to add to docs/llama7b_traces.json")
    parser.add_argument("--gpu-memory", type=int, choices=(12, 16, 24), help="the recipe (card) of --record")
    args = parser.parse_args(argv)
    if args.record:
        if args.gpu_memory is None:
            parser.error("--record needs --gpu-memory (12, 16 or 24)")
        record(args.record, args.gpu_memory)
    text = page(load_rows())
    if args.check:
        if PAGE.read_text() != text:
            print(f"{PAGE.relative_to(REPO)} is out of date: run python scripts/docs_llama7b_table.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
