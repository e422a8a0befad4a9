"""The tuned comparison (train/tuned.py) on fabricated runs with known figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.report import write_report


def _run(root: Path, name: str, optimizer: str, lr: float, seed: int, val: float, tokens_per_s: float, **extra) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    config = {"optimizer": optimizer, "lr": lr, "seed": seed, "max_steps": 2, "n_params": 1000, "matrix_params": 800}
    (folder / "config.json").write_text(json.dumps({**config, **extra}))
    state = {"adamw": 8000, "muon": 4000 + 400}.get(optimizer, 1000)
    matrix_state = {"adamw": 6400, "muon": 3200}.get(optimizer, 800)
    lines = [
        {"step": 1, "loss": 3.0, "tokens_per_s": tokens_per_s, "opt_state_bytes": state},
        {
            "step": 2,
            "loss": 2.0,
            "tokens_per_s": tokens_per_s,
            "opt_state_bytes": state,
            "matrix_state_bytes": matrix_state,
            "val_loss": val,
        },
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for lr, val in ((1e-3, 2.5), (3e-3, 2.2), (1e-2, 2.4)):
        _run(root, f"adamw_{lr}", "adamw", lr, 0, val, 100.0)
    _run(root, "adamw_3e-3_s1", "adamw", 3e-3, 1, 2.4, 100.0)
    _run(root, "adamw_3e-3_s2", "adamw", 3e-3, 2, 2.3, 100.0)
    for lr, val in ((0.01, 2.1), (0.02, 2.0)):
        _run(root, f"muon_{lr}", "muon", lr, 0, val, 50.0)
    # the best lr at seed 0 wins even when another lr has a lower loss at another seed
    _run(root, "muon_0.01_s1", "muon", 0.01, 1, 1.0, 50.0)
    _run(root, "galore_r8", "galore_adamw", 0.01, 0, 2.2, 80.0, rank=8)
    _run(root, "galore_r16", "galore_adamw", 0.01, 0, 2.1, 80.0, rank=16)
    return root


def test_each_setting_is_tabled_at_its_best_lr_with_mean_and_spread_over_seeds(grid: Path) -> None:
    write_report(grid, grid / "report")
    rows = {r["setting"]: r for r in json.loads((grid / "report" / "tuned.json").read_text())}
    assert set(rows) == {"adamw", "muon", "galore_adamw (rank=8)", "galore_adamw (rank=16)"}
    adamw = rows["adamw"]
    assert adamw["grid"] == {"0.001": 2.5, "0.003": 2.2, "0.01": 2.4}
    assert adamw["best_lr"] == 3e-3 and adamw["seeds"] == 3 and not adamw["best_at_edge"]
    assert adamw["mean"] == pytest.approx((2.2 + 2.4 + 2.3) / 3)
    assert adamw["std"] == pytest.approx(0.1)
    assert adamw["bytes_per_matrix_param"] == pytest.approx(8.0)
    assert adamw["bytes_per_param"] == pytest.approx(8.0)
    muon = rows["muon"]
    assert muon["best_lr"] == 0.02 and muon["seeds"] == 1 and muon["std"] is None
    assert muon["best_at_edge"]  # the largest lr of its grid: the optimum may lie above it
    assert muon["bytes_per_matrix_param"] == pytest.approx(4.0)
    assert muon["time_vs_adamw"] == pytest.approx(2.0)
    assert muon["vs_muon_pct"] == pytest.approx(0.0)
    assert adamw["vs_muon_pct"] == pytest.approx(100 * (2.3 / 2.0 - 1))
    text = (grid / "report" / "tuned.md").read_text()
    assert "| adamw | 0.001: 2.5000, 0.003: 2.2000, 0.01: 2.4000 | 0.003 | 2.3000 | 0.1000 | 3 | 8.00 |" in text
    assert list(rows) == sorted(rows, key=lambda s: rows[s]["mean"])  # best first
