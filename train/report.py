"""Compare training runs: a table (markdown and CSV) and plots (PNG) from their metrics files.

    python -m train.report runs/sweeps/tiny --out runs/sweeps/tiny/report

A run is a folder under the given one that holds ``metrics.jsonl`` (one JSON line per logged
step: ``step``, ``loss``, ``tokens_per_s``, ``peak_mem_bytes``, ``opt_state_bytes``, and
``val_loss`` on evaluation steps), ``config.json`` (the run's flags) and, for sweep trials,
``trial.json`` (written by :mod:`train.sweep`; a failed trial is listed even without metrics).

Figures per run: final and best validation loss; peak memory and optimizer-state bytes (the
largest logged value of each); subspace refreshes summed over the projected matrices and the
largest refresh gap, from the last line of ``layer_stats.jsonl`` (low-rank runs); tokens/s
(median over logged steps after the first, which carries the start-up cost). The
hyperparameter columns are lr, rank and every other flag that differs between the runs. A run
is on the Pareto front when no other run has both less optimizer state and a lower final
validation loss.

Writes ``report.md``, ``report.csv``, ``loss_vs_step.png`` (the best run of each optimizer),
``memory_vs_loss.png`` (final validation loss against optimizer-state and peak memory) and
``tuned.md``, ``tuned.json`` and ``tuned_vs_state.png`` (each setting at its best learning rate over seeds:
:mod:`train.tuned`).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmem_optim.registry import LOWRANK_OPTIMIZERS, MATRIX_OPTIMIZERS
from train.optim import LOWRANK_FLAGS
from train.tuned import plot_tuned, tuned_json, tuned_markdown, tuned_rows

#: flags that name where or how a run logs, not what it trains: never hyperparameter columns
NOT_HYPERPARAMETERS = frozenset(
    {
        "output_dir",
        "run_name",
        "wandb",
        "wandb_project",
        "resume",
        "progress",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "optimizer",
    }
)
ALWAYS_SHOWN = ("lr", "rank")
FIGURES = (
    "status",
    "steps",
    "final_loss",
    "final_val_loss",
    "best_val_loss",
    "peak_mem_bytes",
    "opt_state_bytes",
    "tokens_per_s",
    "pareto",
    "refreshes",
    "largest_gap",
)
MIB = 2**20


@dataclass
class Run:
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    trial: dict[str, Any] | None
    layers: list[dict[str, Any]] = field(default_factory=list)  # the last per-layer statistics logged


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def load_runs(root: str | Path) -> list[Run]:
    """Every run under ``root`` (folders with ``metrics.jsonl`` or ``trial.json``), by name."""
    root = Path(root)
    folders = {p.parent for pattern in ("metrics.jsonl", "trial.json") for p in root.rglob(pattern)}
    runs = []
    for folder in sorted(folders):
        metrics_path, stats_path = folder / "metrics.jsonl", folder / "layer_stats.jsonl"
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        stats = stats_path.read_text().splitlines() if stats_path.exists() else []
        stats = [line for line in stats if line.strip()]
        runs.append(
            Run(
                name=str(folder.relative_to(root)) if folder != root else folder.name,
                config=_read_json(folder / "config.json") or {},
                metrics=[json.loads(line) for line in lines if line.strip()],
                trial=_read_json(folder / "trial.json"),
                layers=json.loads(stats[-1])["layers"] if stats else [],
            )
        )
    return runs


def _values(metrics: list[dict[str, Any]], key: str) -> list[float]:
    return [m[key] for m in metrics if m.get(key) is not None]


def summarize(run: Run) -> dict[str, Any]:
    """The run's figures (None where its metrics do not have them)."""
    m = run.metrics
    val, speed = _values(m, "val_loss"), _values(m, "tokens_per_s")
    if run.trial is not None:
        status = run.trial["status"]
    elif m and m[-1].get("step", 0) >= run.config.get("max_steps", 0):
        status = "ok"
    else:
        status = "incomplete"
    projected = [layer for layer in run.layers if layer.get("rank") is not None]
    return {
        "status": status,
        "steps": m[-1].get("step") if m else None,
        "final_loss": m[-1].get("loss") if m else None,
        "final_val_loss": val[-1] if val else None,
        "best_val_loss": min(val) if val else None,
        "peak_mem_bytes": max(_values(m, "peak_mem_bytes"), default=None),
        "opt_state_bytes": max(_values(m, "opt_state_bytes"), default=None),
        "refreshes": sum(layer["refreshes"] for layer in projected) if projected else None,
        "largest_gap": max((layer["gap"] for layer in projected if layer["gap"] is not None), default=None),
        "tokens_per_s": statistics.median(speed[1:] or speed) if speed else None,
        "matrix_state_bytes": max(_values(m, "matrix_state_bytes"), default=None),
    }


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (memory, loss) point: whether no other point is <= in both and < in one."""
    return [not any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in points) for p in points]


def hyperparameter_columns(runs: list[Run]) -> list[str]:
    """lr, rank, and every other flag whose value differs between the runs."""
    configs = [r.config for r in runs if r.config]  # a trial that failed early may have none
    keys = sorted({k for c in configs for k in c} - NOT_HYPERPARAMETERS - set(ALWAYS_SHOWN))
    varying = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    return list(ALWAYS_SHOWN) + varying


def build_table(runs: list[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): one row per run, best final validation loss first, failed runs last."""
    hparams = hyperparameter_columns(runs)
    rows = []
    for run in runs:
        params = run.trial["params"] if run.trial else {}
        config = {**{k.replace("-", "_"): v for k, v in params.items()}, **run.config}
        if config.get("optimizer") not in (
            *LOWRANK_OPTIMIZERS,
            *MATRIX_OPTIMIZERS,
        ):  # the CLI ignored its low-rank flags
            config.update(dict.fromkeys(LOWRANK_FLAGS))
        rows.append(
            {
                "run": run.name,
                "optimizer": config.get("optimizer"),
                **{k: config.get(k) for k in hparams},
                **{k: config.get(k) for k in ("seed", "n_params", "matrix_params")},
                **summarize(run),
            }
        )
    scored = [r for r in rows if r["final_val_loss"] is not None and r["opt_state_bytes"] is not None]
    for row, on_front in zip(scored, pareto_front([(r["opt_state_bytes"], r["final_val_loss"]) for r in scored])):
        row["pareto"] = on_front
    rows.sort(key=lambda r: (r["status"] != "ok", r["final_val_loss"] is None, r["final_val_loss"] or 0.0, r["run"]))
    return ["run", "optimizer", *hparams, *FIGURES], rows


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        return f"{value / MIB:.2f}"
    if key == "pareto":
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}" if key != "tokens_per_s" else f"{value:.0f}"
    return str(value)


def _markdown(columns: list[str], rows: list[dict[str, Any]], source: Path) -> str:
    header = [c.replace("_bytes", " (MiB)") for c in columns]
    lines = [
        f"# Optimizer comparison: {source}",
        "",
        "Final/best val loss: last and lowest validation loss; peak memory and optimizer state: "
        "largest logged value (MiB); tokens/s: median over logged steps after the first; "
        "pareto: no run has both less optimizer state and a lower final val loss.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed trials (see each trial's train.log):"]
        lines += [f"- {r['run']}" for r in failed]
    return "\n".join(lines) + "\n"


def _label(row: dict[str, Any], hparams: list[str]) -> str:
    shown = ", ".join(f"{k}={row[k]}" for k in hparams if row.get(k) is not None)
    return f"{row['optimizer']} ({shown})" if shown else str(row["optimizer"])


def _plot_losses(runs: dict[str, Run], rows: list[dict[str, Any]], hparams: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    best: dict[str, dict[str, Any]] = {}
    for row in rows:  # sorted best first, so the first row of an optimizer is its best run
        if row["steps"] is not None:
            best.setdefault(str(row["optimizer"]), row)
    for _, row in sorted(best.items()):
        metrics = runs[row["run"]].metrics
        logged = [m for m in metrics if m.get("loss") is not None]
        (line,) = ax.plot(
            [m["step"] for m in logged], [m["loss"] for m in logged], alpha=0.6, label=_label(row, hparams)
        )
        evals = [m for m in metrics if m.get("val_loss") is not None]
        ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o--", color=line.get_color())
    ax.set(xlabel="step", ylabel="loss (line: train, dots: validation)", title="Loss vs step, best run per optimizer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_pareto(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in zip(axes, ("opt_state_bytes", "peak_mem_bytes"), ("optimizer state", "peak memory")):
        scored = [r for r in rows if r["final_val_loss"] is not None and r[key] is not None]
        for optimizer in sorted({str(r["optimizer"]) for r in scored}):
            mine = [r for r in scored if str(r["optimizer"]) == optimizer]
            ax.scatter([r[key] / MIB for r in mine], [r["final_val_loss"] for r in mine], label=optimizer)
        points = [(r[key] / MIB, r["final_val_loss"]) for r in scored]
        front = sorted(p for p, on in zip(points, pareto_front(points)) if on)
        if front:
            ax.step(*zip(*front), where="post", color="black", linewidth=1, label="Pareto front")
        ax.set(xlabel=f"{title} (MiB)", ylabel="final validation loss", title=f"Final loss vs {title}")
        if scored:  # no run measured this figure (peak memory on a CPU): an empty panel, no legend
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(root: str | Path, out: str | Path) -> dict[str, Path]:
    """Write report.md, report.csv and the two plots for the runs under ``root`` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    root, out = Path(root), Path(out)
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"Invalid runs folder {str(root)!r}: no metrics.jsonl or trial.json under it")
    columns, rows = build_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "loss_plot": out / "loss_vs_step.png",
        "pareto_plot": out / "memory_vs_loss.png",
    }
    paths["markdown"].write_text(_markdown(columns, rows, root))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    hparams = columns[2 : -len(FIGURES)]
    tuned = tuned_rows(rows, hparams)
    paths["tuned"] = out / "tuned.md"
    paths["tuned"].write_text(tuned_markdown(tuned, str(root)))
    (out / "tuned.json").write_text(tuned_json(tuned))
    paths["tuned_plot"] = out / "tuned_vs_state.png"
    plot_tuned(tuned, paths["tuned_plot"])
    _plot_losses({r.name: r for r in runs}, rows, hparams, paths["loss_plot"])
    _plot_pareto(rows, paths["pareto_plot"])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", help="folder holding run folders (e.g. a sweep's --output-root)")
    parser.add_argument("--out", default=None, help="where the report goes (default: <runs>/report)")
    args = parser.parse_args(argv)
    paths = write_report(args.runs, args.out or Path(args.runs) / "report")
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
