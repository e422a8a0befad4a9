"""The offline sweep runner: wandb's expansion semantics, command rendering, running trials."""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from train.sweep import SweepRunner, build_command, expand, load_sweep, main, main_exit_status, override

REPO = Path(__file__).resolve().parents[2]


def _grid(parameters: dict, **more) -> dict:
    return {"method": "grid", "parameters": parameters, **more}


def _random(parameters: dict, run_cap: int = 2000) -> dict:
    return {"method": "random", "run_cap": run_cap, "parameters": parameters}


def test_grid_is_the_product_in_sorted_name_order_with_the_last_name_fastest():
    trials = expand(_grid({"b": {"values": [1, 2]}, "a": {"values": ["x", "y", "z"]}, "c": {"value": 5}}))
    assert trials == [{"a": a, "b": b, "c": 5} for a in "xyz" for b in (1, 2)]


def test_grid_int_uniform_includes_max_and_q_uniform_excludes_it():
    trials = expand(
        _grid({"n": {"min": 1, "max": 3}, "q": {"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.25}})
    )
    assert sorted({t["n"] for t in trials}) == [1, 2, 3]
    assert sorted({t["q"] for t in trials}) == [0.0, 0.25, 0.5, 0.75]
    assert len(trials) == 12


def test_grid_rejects_continuous_distributions_naming_the_parameter():
    with pytest.raises(ValueError, match="'lr'.*grid"):
        expand(_grid({"lr": {"min": 0.1, "max": 1.0}}))


def test_run_cap_keeps_the_first_grid_trials_and_count_overrides_it():
    config = _grid({"a": {"values": [1, 2, 3, 4]}}, run_cap=3)
    assert expand(config) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert expand(config, count=1) == [{"a": 1}]


def test_random_search_needs_a_cap():
    with pytest.raises(ValueError, match="run_cap"):
        expand({"method": "random", "parameters": {"a": {"values": [1, 2]}}})


def test_bayes_is_refused_offline_and_points_to_the_agent():
    with pytest.raises(ValueError, match="wandb agent"):
        expand({"method": "bayes", "parameters": {"a": {"values": [1, 2]}}})


def test_random_search_is_seeded():
    config = _random(
        {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}, "rank": {"values": [64, 128]}},
        run_cap=5,
    )
    assert expand(config, seed=3) == expand(config, seed=3)
    assert expand(config, seed=3) != expand(config, seed=4)


def test_random_distributions_follow_wandb_definitions():
    trials = expand(
        _random(
            {
                "categorical": {"values": ["a", "b", "c", "d"]},
                "weighted": {"values": ["x", "y"], "probabilities": [0.8, 0.2]},
                "ints": {"min": 2, "max": 5},  # inferred int_uniform: both ends included
                "floats": {"min": 2.0, "max": 5.0},  # inferred uniform
                "log_values": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                "log_exponents": {"distribution": "log_uniform", "min": 0.0, "max": 1.0},
                "q_log": {"distribution": "q_log_uniform_values", "min": 8, "max": 512, "q": 8},
                "normal": {"distribution": "normal", "mu": 1.0, "sigma": 2.0},
            }
        )
    )
    column = {k: [t[k] for t in trials] for k in trials[0]}
    n = len(trials)
    assert set(column["categorical"]) == set("abcd")
    assert abs(Counter(column["weighted"])["x"] / n - 0.8) < 0.04
    assert set(column["ints"]) == {2, 3, 4, 5} and all(isinstance(v, int) for v in column["ints"])
    assert all(2.0 <= v <= 5.0 and isinstance(v, float) for v in column["floats"])
    # log-uniform in the values: half the draws below the geometric mean of the bounds
    assert all(1e-4 <= v <= 1e-2 for v in column["log_values"])
    assert abs(sum(v < 1e-3 for v in column["log_values"]) / n - 0.5) < 0.04
    assert all(1.0 <= v <= math.e for v in column["log_exponents"])
    assert all(isinstance(v, int) and v % 8 == 0 and 8 <= v <= 512 for v in column["q_log"])
    mean = sum(column["normal"]) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in column["normal"]) / n)
    assert abs(mean - 1.0) < 0.15 and abs(std - 2.0) < 0.15


def test_unknown_distribution_is_a_value_error_listing_the_allowed_ones():
    with pytest.raises(ValueError, match="'lr'.*allowed: constant"):
        expand(_random({"lr": {"distribution": "lognormal_typo", "min": 1, "max": 2}}, run_cap=1))


def test_args_render_as_wandbs_agent_writes_them():
    params = {"lr": 0.01, "layerwise": True, "activation-checkpointing": False, "rank": None}
    config = {"command": ["${env}", "${interpreter}", "-m", "train", "${args}"]}
    assert build_command(config, params) == [
        sys.executable,
        "-m",
        "train",
        "--lr=0.01",
        "--layerwise=True",
        "--activation-checkpointing=False",
        "--rank=None",
    ]
    config["command"] = ["${interpreter}", "${program}", "${args_no_boolean_flags}"]
    config["program"] = "train.py"
    assert build_command(config, params) == [sys.executable, "train.py", "--lr=0.01", "--layerwise", "--rank=None"]


def test_command_errors_name_the_problem(monkeypatch):
    monkeypatch.setenv("MY_FLAG", "--seed=3")
    config = {"command": ["${interpreter}", "-m", "train", "${envvar:MY_FLAG}", "${args}"]}
    assert build_command(config, {"lr": 1})[3:] == ["--seed=3", "--lr=1"]
    with pytest.raises(ValueError, match=r"\$\{args_hydra\}"):
        build_command({"command": ["${interpreter}", "${args}", "${args_hydra}"]}, {})
    with pytest.raises(ValueError, match=r"\$\{args\}"):
        build_command({"command": ["${interpreter}", "-m", "train"]}, {})


# A stand-in for the training CLI (no torch import): writes metrics.jsonl and config.json into
# --output-dir, and fails for --optimizer=bad.
FAKE_TRAIN = """
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
if args["optimizer"] == "bad":
    sys.exit("no such optimizer")
out = args["output-dir"]
os.makedirs(out, exist_ok=True)
json.dump({"optimizer": args["optimizer"], "lr": float(args["lr"]), "max_steps": 1,
           "wandb": args["wandb"], "wandb_mode_env": os.environ["WANDB_MODE"]}, open(f"{out}/config.json", "w"))
open(f"{out}/metrics.jsonl", "w").write(json.dumps({"step": 1, "loss": 2.0, "val_loss": float(args["lr"]),
                                                    "opt_state_bytes": 10, "peak_mem_bytes": 20,
                                                    "tokens_per_s": 5.0}) + "\\n")
"""


def _fake_sweep(tmp_path: Path, optimizers: list[str]) -> dict:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return {
        "method": "grid",
        "program": str(script),
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
        "parameters": {"optimizer": {"values": optimizers}, "lr": {"values": [0.1, 0.2]}},
    }


def test_parallel_runner_records_each_trial_and_a_failure_does_not_stop_the_others(tmp_path):
    config = _fake_sweep(tmp_path, ["bad", "adamw"])
    records = SweepRunner(config, expand(config), tmp_path / "sweep").run(parallel=2)
    # names sorted: lr varies slowest
    assert [(r["params"]["optimizer"], r["status"]) for r in records] == [
        ("bad", "failed"),
        ("adamw", "ok"),
        ("bad", "failed"),
        ("adamw", "ok"),
    ]
    assert records[0]["returncode"] != 0 and records[1]["returncode"] == 0
    assert "no such optimizer" in Path(records[0]["log"]).read_text()
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["trials"] == records
    written = json.loads((tmp_path / "sweep" / records[1]["name"] / "config.json").read_text())
    assert (written["wandb"], written["wandb_mode_env"]) == ("offline", "offline")


def test_rerun_skips_trials_done_earlier_and_retries_failed_ones(tmp_path):
    config = _fake_sweep(tmp_path, ["bad", "adamw"])
    SweepRunner(config, expand(config), tmp_path / "sweep").run()
    again = SweepRunner(config, expand(config), tmp_path / "sweep").run()
    assert [r.get("skipped", False) for r in again] == [False, True, False, True]


def test_main_writes_the_report_and_exits_1_when_a_trial_failed(tmp_path, capsys):
    sweep_file = tmp_path / "fake.yaml"
    sweep_file.write_text(yaml.safe_dump(_fake_sweep(tmp_path, ["bad", "adamw"])))
    assert main([str(sweep_file), "--output-root", str(tmp_path / "out"), "--wandb", "off"]) == 1
    assert "2/4 trials ok" in capsys.readouterr().out
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert report.count("| failed |") == 2 and report.count("| ok |") == 2


def test_tiny_sweep_trains_every_trial_through_the_cli_records_a_failure_and_reports(tmp_path, monkeypatch):
    """End to end on CPU: the shipped tiny sweep (shortened, on a small local corpus) with an
    invalid optimizer in the middle; the trials after the failing one still train."""
    monkeypatch.chdir(REPO)
    config = load_sweep(REPO / "configs" / "sweeps" / "tiny.yaml")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"line {i}: low-rank optimizers keep the state small, {i * 7 % 13} times." for i in range(600))
    )
    config["parameters"].update(
        {
            "optimizer": {"values": ["adamw", "no_such_optimizer", "galore_adamw"]},
            "data": {"value": str(corpus)},
            "max-steps": {"value": 6},
            "warmup-steps": {"value": 1},
            "eval-every": {"value": 3},
        }
    )
    sweep_file = tmp_path / "tiny.yaml"
    sweep_file.write_text(yaml.safe_dump(config))
    root = tmp_path / "runs"
    assert main([str(sweep_file), "--output-root", str(root)]) == 1

    trials = json.loads((root / "sweep.json").read_text())["trials"]
    assert [(t["params"]["optimizer"], t["status"]) for t in trials] == [
        ("adamw", "ok"),
        ("no_such_optimizer", "failed"),
        ("galore_adamw", "ok"),
    ]
    assert "no_such_optimizer" in Path(trials[1]["log"]).read_text()
    for trial in (trials[0], trials[2]):
        lines = [json.loads(x) for x in (root / trial["name"] / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["step"] == 6 and lines[-1]["val_loss"] > 0
        assert any((root / trial["name"] / "wandb").glob("offline-run-*"))  # wandb ran offline
    report = root / "report"
    assert {p.name for p in report.iterdir()} == {
        "report.md",
        "report.csv",
        "loss_vs_step.png",
        "memory_vs_loss.png",
        "tuned.md",
        "tuned.json",
        "tuned_vs_state.png",
    }
    rows = (report / "report.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[-1].split(",")[1] == "no_such_optimizer"


def test_set_replaces_or_adds_a_parameter_a_flow_list_giving_its_values():
    config = _grid({"optimizer": {"values": ["adamw", "galore_adamw"]}, "lr": {"value": 0.1}})
    changed = override(config, ["optimizer=dct_adamw", "lr=[0.001, 0.01]", "betas=0.9,0.99"])
    assert expand(changed) == [
        {"betas": "0.9,0.99", "lr": 0.001, "optimizer": "dct_adamw"},
        {"betas": "0.9,0.99", "lr": 0.01, "optimizer": "dct_adamw"},
    ]
    assert config["parameters"]["optimizer"] == {"values": ["adamw", "galore_adamw"]}  # the loaded file is kept
    for bad in ("lr", "=1", "lr=[]"):
        with pytest.raises(ValueError, match="Invalid --set"):
            override(config, [bad])


def test_set_reaches_the_trials_command_lines(tmp_path, capsys):
    sweep_file = tmp_path / "fake.yaml"
    sweep_file.write_text(yaml.safe_dump(_fake_sweep(tmp_path, ["adamw"])))
    assert main([str(sweep_file), "--dry-run", "--set", "lr=0.5", "--set", "seed=[0, 1]"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2 and all("--lr=0.5" in c for c in commands)
    assert ["--seed=0" in commands[0], "--seed=1" in commands[1]] == [True, True]


@pytest.mark.parametrize(
    ("contents", "flags", "message"),
    [
        ({"method": "annealing", "parameters": {"lr": {"value": 1}}}, [], r"Invalid method in .*'annealing'"),
        (None, [], r"Invalid sweep file '.*missing.yaml': No such file"),
        ("- method: grid\n", [], r"Invalid sweep file .*: not a mapping"),
        ({"method": "grid", "parameters": {"lr": {"value": 1}}}, ["--parallel", "0"], r"Invalid --parallel: 0"),
        ({"method": "grid", "parameters": {"lr": {"value": 1}}}, ["--count", "0"], r"Invalid count / run_cap: 0"),
        ({"method": "grid", "command": None, "parameters": {"lr": {"value": 1}}}, [], r"Invalid command: None"),
        ("!!python/object/apply:os.system ['true']\n", [], r"Invalid sweep file .*could not determine a constructor"),
        ({"method": "grid", "parameters": {"lr": {"values": []}}}, [], r"Invalid values of parameter 'lr': \[\]"),
        ({"method": "random", "run_cap": 2, "parameters": {"lr": {"values": []}}}, [], r"parameter 'lr': \[\]"),
        (
            {"method": "grid", "parameters": {"seed": {"min": 0, "max": 99_999}, "lr": {"min": 0, "max": 99_999}}},
            ["--dry-run"],
            r"Invalid grid: 10000000000 trials \(lr 100000 x seed 100000; allowed: at most 100000\)",
        ),
    ],
)
def test_bad_sweep_files_and_flags_are_one_line_and_exit_status_2(tmp_path, capsys, contents, flags, message):
    path = tmp_path / ("missing.yaml" if contents is None else "sweep.yaml")
    if isinstance(contents, dict):
        contents = yaml.safe_dump({"command": ["${interpreter}", "-m", "train", "${args}"], **contents})
    if contents is not None:
        path.write_text(contents)
    assert main_exit_status([str(path), "--output-root", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_trial_interrupted_after_its_first_checkpoint_resumes_when_the_sweep_is_run_again(tmp_path, tiny_argv):
    """The trial's first attempt stopped after step 2 of 3 (as a preempted run leaves it); the same
    sweep command then resumes it instead of failing on its checkpoints."""
    from train import checkpoint
    from train import main as train_main

    config = {
        "method": "grid",
        "command": ["${env}", "${interpreter}", "-m", "train", "${args}"],
        "parameters": {"optimizer": {"value": "adamw"}, "max-steps": {"value": 3}},
    }
    runner = SweepRunner(config, expand(config), tmp_path / "sweep", wandb="off")
    trial = tmp_path / "sweep" / runner.names[0]
    flags = dict(scheduler="constant", save_every=1, eval_every=3, keep_checkpoints=3)
    train_main(tiny_argv(trial, max_steps=3, **flags))
    checkpoint.latest(trial).unlink()  # as if stopped after step 2's checkpoint
    lines = (trial / "metrics.jsonl").read_text().splitlines()
    (trial / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    argv = [a for a in tiny_argv(trial, max_steps=3, **flags) if not a.startswith(("--output-dir", "--wandb"))]
    config["parameters"] = {a[2:].split("=", 1)[0]: {"value": a.split("=", 1)[1]} for a in argv}
    runner = SweepRunner(config, expand(config), tmp_path / "sweep", wandb="off")

    [record] = runner.run()
    assert record["status"] == "ok", Path(record["log"]).read_text()
    assert "--resume=True" in record["command"]
    assert [json.loads(line)["step"] for line in (trial / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
