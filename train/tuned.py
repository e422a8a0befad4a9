"""The tuned comparison: each optimizer setting at its best learning rate, over seeds.

A *setting* is an optimizer with its hyperparameters but the learning rate and the seed (the
report's hyperparameter columns, :func:`train.report.hyperparameter_columns`). For each setting:

- the lr grid: the final validation loss of each lr at the lowest seed run;
- the best lr: the lowest of that grid (marked "edge" when it is the grid's smallest or largest
  lr: the optimum may lie outside the grid);
- at the best lr, over every seed run: mean and sample standard deviation of the final
  validation loss (n seeds);
- optimizer-state bytes per matrix parameter (``matrix_state_bytes`` over ``matrix_params``:
  the weight matrices ``--target-modules`` selects, the same for every optimizer) and per model
  parameter (``opt_state_bytes`` over ``n_params``);
- training-step time relative to ``adamw`` (the median tokens/s of the adamw setting over this
  setting's, both at their best lr): the runs share the machine with each other, so on a loaded
  one this ratio is rough; the optimizers' own step times, timed in one process, are a
  benchmark of their own (``scripts.bench.peers``);
- loss against the mean of the ``muon`` setting (full rank, its defaults), in percent.

Written as ``tuned.md``, ``tuned.json`` and ``tuned_vs_state.png`` beside the report by
:func:`train.report.write_report`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

#: a setting's hyperparameters never include these: they are what the table tunes or averages over
TUNED = ("lr", "seed")


def _setting(row: dict[str, Any], hparams: list[str]) -> str:
    shown = ", ".join(f"{k}={row[k]}" for k in hparams if k not in TUNED and row.get(k) is not None)
    return f"{row['optimizer']} ({shown})" if shown else str(row["optimizer"])


def tuned_rows(rows: list[dict[str, Any]], hparams: list[str]) -> list[dict[str, Any]]:
    """One row per setting with a final validation loss (report rows of finished runs), best first."""
    settings: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok" and row["final_val_loss"] is not None:
            settings.setdefault(_setting(row, hparams), []).append(row)
    out = []
    for name, runs in settings.items():
        first_seed = min(r.get("seed") or 0 for r in runs)
        grid = {r["lr"]: r["final_val_loss"] for r in runs if (r.get("seed") or 0) == first_seed}
        best_lr = min(grid, key=grid.__getitem__)
        at_best = [r for r in runs if r["lr"] == best_lr]
        losses = [r["final_val_loss"] for r in at_best]
        speeds = [r["tokens_per_s"] for r in at_best if r["tokens_per_s"]]
        state = [(r["matrix_state_bytes"], r["matrix_params"]) for r in at_best if r.get("matrix_state_bytes")]
        out.append(
            {
                "setting": name,
                "optimizer": runs[0]["optimizer"],
                "grid": dict(sorted(grid.items())),
                "best_lr": best_lr,
                "best_at_edge": len(grid) > 1 and best_lr in (min(grid), max(grid)),
                "mean": statistics.fmean(losses),
                "std": statistics.stdev(losses) if len(losses) > 1 else None,
                "seeds": len(losses),
                "bytes_per_matrix_param": state[0][0] / state[0][1] if state and state[0][1] else None,
                "bytes_per_param": (
                    at_best[0]["opt_state_bytes"] / at_best[0]["n_params"] if at_best[0].get("n_params") else None
                ),
                "tokens_per_s": statistics.median(speeds) if speeds else None,
            }
        )
    out.sort(key=lambda r: r["mean"])
    adamw = next((r for r in out if r["setting"] == "adamw"), None)
    muon = next((r for r in out if r["setting"] == "muon"), None)
    for r in out:
        r["time_vs_adamw"] = (
            adamw["tokens_per_s"] / r["tokens_per_s"] if adamw and adamw["tokens_per_s"] and r["tokens_per_s"] else None
        )
        r["vs_muon_pct"] = 100 * (r["mean"] / muon["mean"] - 1) if muon else None
    return out


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec`` (a trailing "%" is printed after the number), "-" for None."""
    if value is None:
        return "-"
    return format(value, spec[:-1]) + "%" if spec.endswith("%") else format(value, spec)


def tuned_markdown(rows: list[dict[str, Any]], source: str) -> str:
    lines = [
        f"# Tuned comparison: {source}",
        "",
        "Each setting at its best lr (lowest final val loss at the first seed); mean and sample std of "
        "the final val loss over the seeds run at that lr; state bytes per matrix parameter (the "
        "selected weight matrices) and per model parameter; training-step time against adamw from "
        "the runs' tokens/s (rough on a shared machine); loss against the muon setting's mean.",
        "",
        "| setting | lr grid: val loss | best lr | val loss mean | std | seeds | state B / matrix param "
        "| state B / param | train step / adamw (tokens/s) | vs muon |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grid = ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in r["grid"].items())
        best = f"{r['best_lr']:g}{' (edge)' if r['best_at_edge'] else ''}"
        lines.append(
            f"| {r['setting']} | {grid} | {best} | {r['mean']:.4f} | {_fmt(r['std'], '.4f')} | "
            f"{r['seeds']} | {_fmt(r['bytes_per_matrix_param'], '.2f')} | {_fmt(r['bytes_per_param'], '.2f')} | "
            f"{_fmt(r['time_vs_adamw'], '.2f')} | {_fmt(r['vs_muon_pct'], '+.1f%')} |"
        )
    return "\n".join(lines) + "\n"


def plot_tuned(rows: list[dict[str, Any]], path: Path) -> None:
    """Mean final validation loss (bars: the seeds' spread) against state bytes per matrix parameter."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in (r for r in rows if r["bytes_per_matrix_param"] is not None):
        ax.errorbar(r["bytes_per_matrix_param"], r["mean"], yerr=r["std"] or 0, fmt="o", capsize=3)
        ax.annotate(
            r["setting"],
            (r["bytes_per_matrix_param"], r["mean"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set(
        xlabel="optimizer state, bytes per matrix parameter",
        ylabel="final validation loss (mean over seeds)",
        title="Each optimizer at its best learning rate",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tuned_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps([{**r, "grid": {str(k): v for k, v in r["grid"].items()}} for r in rows], indent=1)
