"""Memory-versus-loss picture of a peer benchmark: optimizer state against final validation loss.

    python -m scripts.bench.peers --out runs/bench/peers
    python -m scripts.bench.plot_peers runs/bench/peers/results.jsonl --out docs/img/memory_vs_loss.png

Reads the ``results.jsonl`` that ``scripts/bench/peers.py`` writes (one JSON object per
optimizer: ``name``, ``state_bytes``, ``final_val_loss``, ``not_run``) and draws each optimizer
that ran as one point: x = the bytes its state keeps alive (log scale), y = its final validation
loss; this package's optimizers and the peers in two colours, the (state, loss) Pareto front as a
line. Optimizers listed as not run are named under the plot with their reason, never drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.report import pareto_front

OURS = "lowmem_optim "
#: label positions tried around a point, in points (the first one that overlaps no placed label wins)
OFFSETS = [(6, -3), (6, 6), (6, -12), (-6, -3), (-6, 6), (-6, -12), (6, 14), (6, -20), (-6, 14), (-6, -20)]


def load(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(results that ran, results listed as not run) of one ``results.jsonl``."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if not r.get("not_run")], [r for r in rows if r.get("not_run")]


def plot(ran: list[dict], not_run: list[dict], out: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import matplotlib.transforms

    fig, ax = plt.subplots(figsize=(9, 5.6))
    for ours, colour, label in ((True, "tab:blue", "lowmem_optim"), (False, "tab:gray", "peers")):
        mine = [r for r in ran if r["name"].startswith(OURS) == ours]
        ax.scatter(
            [r["state_bytes"] / 1024 for r in mine],
            [r["final_val_loss"] for r in mine],
            s=36,
            color=colour,
            marker="o" if ours else "s",
            label=label,
            zorder=3,
        )
    points = [(r["state_bytes"] / 1024, r["final_val_loss"]) for r in ran]
    front = sorted(p for p, on in zip(points, pareto_front(points)) if on)
    if front:
        ax.step(*zip(*front), where="post", color="tab:green", linewidth=1, label="Pareto front (state, loss)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax.tick_params(axis="x", which="minor", labelsize=8)
    ax.set(xlabel="optimizer state (KiB, log scale)", ylabel="final validation loss", title=title)
    ax.grid(True, which="both", alpha=0.3)
    legend = ax.legend(fontsize=8, loc="best")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    # labels avoid the legend, the markers and each other
    placed = [legend.get_window_extent(renderer)]
    placed += [matplotlib.transforms.Bbox.from_bounds(*(ax.transData.transform(p) - 4), 8, 8) for p in points]
    for r, (x, y) in sorted(zip(ran, points), key=lambda item: item[1]):
        name = r["name"].removeprefix(OURS)
        for dx, dy in OFFSETS:
            text = ax.annotate(
                name,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=7.5,
                ha="left" if dx > 0 else "right",
                va="center",
            )
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(other) for other in placed) or (dx, dy) == OFFSETS[-1]:
                placed.append(box)
                break
            text.remove()
    if not_run:
        fig.text(
            0.01,
            0.01,
            "not run: " + "; ".join(f"{r['name']} ({r['not_run'][:60]})" for r in not_run),
            fontsize=7,
            wrap=True,
        )
    fig.tight_layout(rect=(0, 0.04 if not_run else 0, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.jsonl written by scripts/bench/peers.py")
    parser.add_argument("--out", default="docs/img/memory_vs_loss.png", help="PNG to write")
    parser.add_argument("--title", default="Optimizer state vs loss: LLaMA 4 x 128, 100 steps, same data and seed")
    args = parser.parse_args(argv)
    ran, not_run = load(args.results)
    print(plot(ran, not_run, args.out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
