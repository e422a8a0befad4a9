"""Two-stage tuning (train/tune.py): the tuning file's checks, each grid at the sweep's seed, the
extra seeds at each setting's best lr, --only, skipping done trials; trials are a fake program
whose validation loss is lowest at the lr its setting names as ``target``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from train.config import parse_args
from train.sweep import build_command, expand, with_parameters
from train.tune import load_tuning, main_exit_status

REPO = Path(__file__).resolve().parents[2]

FAKE_TRAIN = """
import json, math, os, sys

def value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

args = {k[2:].replace("-", "_"): value(v) for k, _, v in (a.partition("=") for a in sys.argv[1:])}
out = args["output_dir"]
os.makedirs(out, exist_ok=True)
json.dump({**args, "n_params": 1000, "matrix_params": 800}, open(f"{out}/config.json", "w"))
val = 1.0 + abs(math.log10(args["lr"] / args["target"])) + args["seed"] / 100
metrics = {"step": 1, "loss": 2.0, "val_loss": val, "opt_state_bytes": 100, "matrix_state_bytes": 80,
           "tokens_per_s": 5.0}
open(f"{out}/metrics.jsonl", "w").write(json.dumps(metrics) + "\\n")
"""

SETTINGS = {
    "low": {"set": {"optimizer": "adamw", "target": 0.01}, "lr": [0.001, 0.01, 0.1]},
    "high": {"set": {"optimizer": "adamw", "target": 0.1, "beta": 0.5}, "lr": [0.01, 0.1]},
}


@pytest.fixture
def tuning_file(tmp_path: Path) -> Path:
    """A tuning file over a fake protocol sweep (seed 0), stage 2 at seeds 1 and 2."""
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    sweep = {
        "method": "grid",
        "program": str(tmp_path / "fake_train.py"),
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
        "parameters": {"optimizer": {"value": "sgd"}, "lr": {"value": 1.0}, "seed": {"value": 0}},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    path = tmp_path / "tuning.yaml"
    path.write_text(
        yaml.safe_dump({"sweep": str(tmp_path / "sweep.yaml"), "seeds": [1, 2], "settings": SETTINGS}, sort_keys=False)
    )
    return path


def _tune(tuning: Path, *flags: str) -> int:
    return main_exit_status([str(tuning), "--output-root", str(tuning.parent / "out"), *flags])


def _trials(folder: Path) -> list[dict]:
    return sorted((json.loads(p.read_text())["params"] for p in folder.glob("*/trial.json")), key=json.dumps)


def test_grid_runs_at_the_sweeps_seed_then_the_extra_seeds_at_each_settings_best_lr(tuning_file):
    assert _tune(tuning_file, "--parallel", "2") == 0
    out = tuning_file.parent / "out"
    for name, setting in SETTINGS.items():
        best = setting["set"]["target"]
        expected = [{**setting["set"], "lr": lr, "seed": 0} for lr in setting["lr"]]
        expected += [{**setting["set"], "lr": best, "seed": seed} for seed in (1, 2)]
        assert _trials(out / name) == sorted(expected, key=json.dumps)
    rows = json.loads((out / "report" / "tuned.json").read_text())
    assert sorted((r["best_lr"], r["seeds"]) for r in rows) == [(0.01, 3), (0.1, 3)]


def test_only_runs_the_named_settings_and_a_rerun_skips_the_done_trials(tuning_file, capsys):
    assert _tune(tuning_file, "--only", "high", "--stage", "grid") == 0
    out = tuning_file.parent / "out"
    assert sorted(p.name for p in out.iterdir()) == ["high", "report"]
    assert "2 trials, 0 skipped" in capsys.readouterr().out
    assert _tune(tuning_file, "--only", "high") == 0
    printed = capsys.readouterr().out
    assert "'lr': [0.01, 0.1]}: 2 trials, 2 skipped" in printed and "'seed': [1, 2]}: 2 trials, 0 skipped" in printed
    assert len(_trials(out / "high")) == 4


def test_seeds_stage_without_grid_results_is_refused_and_dry_run_runs_nothing(tuning_file, capsys):
    assert _tune(tuning_file, "--stage", "seeds") == 2
    assert "--stage seeds" in capsys.readouterr().err
    assert _tune(tuning_file, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert printed.count("fake_train.py") == 5 and "low: seeds [1, 2] at the best lr" in printed
    assert not (tuning_file.parent / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: {**t, "grids": {}}, "unknown key 'grids' (allowed: sweep, seeds, settings)"),
        (lambda t: {k: v for k, v in t.items() if k != "seeds"}, "missing key 'seeds'"),
        (lambda t: {**t, "seeds": [0, 1]}, "Invalid seeds: [0, 1] (allowed: a non-empty list of ints above"),
        (lambda t: {**t, "settings": {}}, "Invalid settings: {} (allowed: a non-empty mapping"),
        (lambda t: {**t, "settings": {"a": {"set": {}, "lrs": [1.0]}}}, "setting 'a': unknown key 'lrs'"),
        (lambda t: {**t, "settings": {"a": {"set": {}, "lr": []}}}, "Invalid lr of setting 'a': []"),
        (lambda t: {**t, "settings": {"a": {"set": {}, "lr": ["1e-3"]}}}, "Invalid lr of setting 'a': ['1e-3']"),
        (lambda t: {**t, "settings": {"a": {"set": {"seed": 3}, "lr": [1.0]}}}, "Invalid set of setting 'a'"),
    ],
)
def test_bad_tuning_files_are_one_error_naming_the_key_and_the_allowed_values(tuning_file, capsys, change, message):
    tuning = yaml.safe_load(tuning_file.read_text())
    tuning_file.write_text(yaml.safe_dump(change(tuning)))
    assert _tune(tuning_file, "--dry-run") == 2
    assert message in capsys.readouterr().err


def test_unknown_only_names_and_a_sweep_without_one_seed_are_refused(tuning_file, capsys):
    assert _tune(tuning_file, "--only", "low", "mid") == 2
    assert "Invalid --only: mid (allowed: low, high)" in capsys.readouterr().err
    sweep = yaml.safe_load((tuning_file.parent / "sweep.yaml").read_text())
    sweep["parameters"]["seed"] = {"values": [0, 1]}
    (tuning_file.parent / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert _tune(tuning_file) == 2
    assert "parameter seed {'values': [0, 1]} (allowed: one int value)" in capsys.readouterr().err


def test_every_shipped_setting_expands_to_trials_that_the_training_cli_accepts(monkeypatch):
    monkeypatch.chdir(REPO)
    shipped = sorted((REPO / "configs" / "tuning").glob("*.yaml"))
    assert shipped, "configs/tuning/ holds no tuning file"  # else the loop below checks nothing
    for path in shipped:
        tuning = load_tuning(path)
        for name, setting in tuning["settings"].items():
            config = with_parameters(tuning["sweep"], {**setting["set"], "lr": setting["lr"]})
            trials = expand(config)
            assert [t["lr"] for t in trials] == setting["lr"], name
            for trial in trials:
                cfg = parse_args(build_command(config, {**trial, "output-dir": "runs/x"})[3:])
                assert (cfg.lr, cfg.seed) == (trial["lr"], tuning["sweep"]["parameters"]["seed"]["value"]), name
