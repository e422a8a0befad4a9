"""The comparison report, on metrics files written by the tests themselves (fabricated runs with
known figures, so every number in the table can be checked)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from train.report import build_table, load_runs, main, pareto_front, write_report

MIB = 2**20


def _write_run(folder: Path, config: dict, metrics: list[dict], trial: dict | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if trial is not None:
        (folder / "trial.json").write_text(json.dumps(trial))


def _metrics(
    losses: list[float], vals: dict[int, float], state_mib: float, peak_mib: list[float], speeds: list[float]
) -> list[dict]:
    return [
        {
            "step": s,
            "loss": loss,
            "lr": 0.01,
            "tokens_per_s": speed,
            "peak_mem_bytes": int(peak * MIB),
            "opt_state_bytes": int(state_mib * MIB),
            **({"val_loss": vals[s]} if s in vals else {}),
        }
        for s, (loss, peak, speed) in enumerate(zip(losses, peak_mib, speeds), start=1)
    ]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    base = {"max_steps": 4, "seed": 0, "output_dir": "ignored", "batch_size": 4}
    # a sweep may pass --rank to every optimizer; the CLI ignores it for full-rank ones, so does the table
    _write_run(
        tmp_path / "adamw",
        {**base, "optimizer": "adamw", "lr": 0.001, "rank": 8},
        _metrics([5, 4, 3.5, 3.2], {2: 4.2, 4: 3.6}, 8.0, [100, 120, 110, 115], [10, 1000, 1100, 1200]),
    )
    _write_run(
        tmp_path / "galore_r8",
        {**base, "optimizer": "galore_adamw", "lr": 0.01, "rank": 8},
        _metrics([5, 4.5, 3.9, 3.7], {2: 4.4, 4: 3.9}, 2.0, [90, 95, 96, 94], [10, 900, 950, 1000]),
    )
    # worse loss with more state than galore_r8: dominated, not on the Pareto front
    _write_run(
        tmp_path / "galore_r16",
        {**base, "optimizer": "galore_adamw", "lr": 0.01, "rank": 16},
        _metrics([5, 4.6, 4.2, 4.1], {2: 4.5, 4: 4.0}, 3.0, [91, 96, 97, 95], [10, 800, 850, 900]),
    )
    # a run whose best validation loss is not its last one
    _write_run(
        tmp_path / "sweep" / "001_lr-0.1",
        {**base, "optimizer": "galore_adamw", "lr": 0.1, "rank": 8},
        _metrics([5, 3.0, 6.0, 7.0], {2: 3.1, 4: 6.5}, 2.0, [90, 90, 90, 90], [10, 10, 10, 10]),
        trial={"status": "ok", "params": {"lr": 0.1}},
    )
    failed = tmp_path / "sweep" / "002_bad"
    failed.mkdir(parents=True)
    (failed / "trial.json").write_text(
        json.dumps({"status": "failed", "returncode": 1, "params": {"optimizer": "bogus", "lr": 0.5}})
    )
    return tmp_path


def test_pareto_front_keeps_only_points_no_other_point_dominates():
    assert pareto_front([(1, 5), (2, 4), (3, 4), (2, 6), (0.5, 9)]) == [True, True, False, False, True]


def test_table_figures_come_from_the_metrics_files(runs):
    columns, rows = build_table(load_runs(runs))
    assert columns[:4] == ["run", "optimizer", "lr", "rank"]
    by_run = {r["run"]: r for r in rows}
    adamw = by_run["adamw"]
    assert (adamw["final_val_loss"], adamw["best_val_loss"], adamw["final_loss"], adamw["steps"]) == (3.6, 3.6, 3.2, 4)
    assert adamw["peak_mem_bytes"] == 120 * MIB  # the largest logged value
    assert adamw["opt_state_bytes"] == 8 * MIB
    assert adamw["tokens_per_s"] == 1100  # median without the first line
    assert adamw["rank"] is None and by_run["galore_r16"]["rank"] == 16
    unstable = by_run["sweep/001_lr-0.1"]
    assert (unstable["final_val_loss"], unstable["best_val_loss"]) == (6.5, 3.1)
    assert {r: by_run[r]["pareto"] for r in ("adamw", "galore_r8", "galore_r16", "sweep/001_lr-0.1")} == {
        "adamw": True,
        "galore_r8": True,
        "galore_r16": False,
        "sweep/001_lr-0.1": False,
    }
    assert by_run["sweep/002_bad"]["status"] == "failed" and by_run["sweep/002_bad"]["optimizer"] == "bogus"
    assert by_run["sweep/002_bad"]["lr"] == 0.5
    # best final validation loss first, failed runs last
    assert [r["run"] for r in rows] == ["adamw", "galore_r8", "galore_r16", "sweep/001_lr-0.1", "sweep/002_bad"]


def test_hyperparameter_columns_are_lr_rank_and_the_flags_that_differ(runs):
    extra = runs / "adamw_bs8"
    _write_run(
        extra,
        {
            "max_steps": 4,
            "seed": 0,
            "output_dir": "elsewhere",
            "batch_size": 8,
            "optimizer": "adamw",
            "lr": 0.001,
            "rank": None,
        },
        _metrics([5, 4, 3, 3], {4: 3.5}, 8.0, [1] * 4, [1] * 4),
    )
    columns, _ = build_table(load_runs(runs))
    assert columns[2:5] == ["lr", "rank", "batch_size"]  # output_dir differs too, but is not a hyperparameter
    assert "output_dir" not in columns and "seed" not in columns


def test_report_files_markdown_csv_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "| adamw | adamw | 0.001 | - | ok | 4 | 3.2 | 3.6 | 3.6 | 120.00 | 8.00 | 1100 | yes |" in markdown
    assert "sweep/002_bad" in markdown.split("Failed trials")[1]
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows][0] == "adamw" and rows[0]["opt_state_bytes"] == str(8 * MIB)
    for plot in ("loss_vs_step.png", "memory_vs_loss.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_folder_without_runs_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        write_report(tmp_path, tmp_path / "report")


def test_refreshes_and_largest_gap_come_from_the_last_layer_statistics_of_projected_layers(runs):
    layers = [
        {"name": "q", "rank": 8, "refreshes": 3, "gap": 10},
        {"name": "k", "rank": 8, "refreshes": 2, "gap": 40},
        {"name": "embed", "rank": None, "refreshes": 0, "gap": None},
    ]
    earlier = [{**layer, "refreshes": 1, "gap": 99} for layer in layers]
    lines = [{"step": 2, "layers": earlier}, {"step": 4, "layers": layers}]
    (runs / "galore_r8" / "layer_stats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    _, rows = build_table(load_runs(runs))
    by_run = {r["run"]: r for r in rows}
    assert (by_run["galore_r8"]["refreshes"], by_run["galore_r8"]["largest_gap"]) == (5, 40)
    assert (by_run["adamw"]["refreshes"], by_run["adamw"]["largest_gap"]) == (None, None)  # no statistics logged


def test_a_matrix_optimizer_keeps_its_rank_column(runs):
    # muon, auon and hybrid_auon take --rank (a subspace of their matrix group), unlike adamw
    metrics = _metrics([5, 4, 3.5, 3.2], {4: 3.5}, 4.0, [100] * 4, [10] * 4)
    _write_run(runs / "auon_r8", {"max_steps": 4, "optimizer": "auon", "lr": 0.01, "rank": 8}, metrics)
    _, rows = build_table(load_runs(runs))
    assert {r["run"]: r["rank"] for r in rows}["auon_r8"] == 8
