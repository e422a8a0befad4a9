"""The shipped sweep YAMLs: valid for wandb, runnable by the training CLI, expected trial counts.

wandb validates sweeps against ``sweeps/config/schema.json`` from the ``sweeps`` package, whose
declared dependencies pin numpy < 2, so it is not installed: the test reads the schema from the
pinned wheel (sha256 checked), fetched once with ``pip download --no-deps`` into ``build/wheels``
(or ``$LOWMEM_WHEEL_DIR``) and reused from there on later runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from lowmem_optim import available_optimizers
from train.config import build_parser, parse_args
from train.sweep import build_command, expand, load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
SWEEPS_WHEEL = "sweeps-0.3.0-py3-none-any.whl"
SWEEPS_WHEEL_SHA256 = "e35fbfa87215000238dd4ee8589fc0fed476e4f792cbe803f65071e52d53a692"

#: trials each shipped file expands to (a new file must be added here)
EXPECTED_TRIALS = {
    "tiny.yaml": 2,
    "cpu_small.yaml": 1,
    "peers.yaml": 1,
    "quality.yaml": 1,
    "llama60m_baselines.yaml": 2 * 3,
    "llama60m_lowrank.yaml": 4 * 3 * 2,
    "llama60m_dct.yaml": 3 * 2,
    "llama60m_apollo.yaml": 3 * 2,
    "llama60m_apollo_mini.yaml": 3,
    "llama60m_fira.yaml": 3 * 2,
    "llama60m_normalized.yaml": 3 * 5,
    "llama60m_stateless.yaml": 2 * 4,
    "llama60m_galore_random.yaml": 16,
}


def _sweeps_wheel() -> Path:
    folder = Path(os.environ.get("LOWMEM_WHEEL_DIR", REPO / "build" / "wheels"))
    wheel = folder / SWEEPS_WHEEL
    if not wheel.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # two xdist workers may fetch at once
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary=:all:",
                    "sweeps==0.3.0",
                    "-d",
                    tmp,
                ],
                check=True,
                timeout=180,
            )
            os.replace(Path(tmp) / SWEEPS_WHEEL, wheel)
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == SWEEPS_WHEEL_SHA256, f"{wheel} is not sweeps 0.3.0"
    return wheel


@pytest.fixture(scope="module")
def wandb_validator() -> jsonschema.Draft7Validator:
    """wandb's validator: its schema with its two format checks (min/max ints select int_uniform)."""
    with zipfile.ZipFile(_sweeps_wheel()) as wheel:
        schema = json.loads(wheel.read("sweeps/config/schema.json"))
    formats = jsonschema.FormatChecker()
    formats.checks("float")(lambda value: isinstance(value, float))
    formats.checks("integer")(lambda value: isinstance(value, int))
    return jsonschema.Draft7Validator(schema, format_checker=formats)


def _violations(validator: jsonschema.Draft7Validator, config: dict) -> list[str]:
    messages = [error.message for error in validator.iter_errors(config)]
    # wandb's checks beyond the schema: min < max for ranges
    messages += [
        f"{name}: min >= max"
        for name, spec in config.get("parameters", {}).items()
        if "min" in spec and "max" in spec and spec["min"] >= spec["max"]
    ]
    return messages


def test_every_shipped_sweep_has_an_expected_trial_count():
    assert sorted(p.name for p in SWEEPS) == sorted(EXPECTED_TRIALS)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_validates_against_wandb_schema(path, wandb_validator):
    config = yaml.safe_load(path.read_text())
    assert _violations(wandb_validator, config) == []
    assert config["metric"] == {"name": "val_loss", "goal": "minimize"}


def test_wandb_schema_rejects_broken_sweeps(wandb_validator):
    good = yaml.safe_load((REPO / "configs" / "sweeps" / "tiny.yaml").read_text())
    assert _violations(wandb_validator, {**good, "methd": "grid"})  # unknown top-level key
    assert _violations(wandb_validator, {**good, "method": "annealing"})
    bad_lr = {"distribution": "log_uniform_values", "min": 0.01}  # no max
    assert _violations(wandb_validator, {**good, "parameters": {**good["parameters"], "lr": bad_lr}})
    assert _violations(wandb_validator, {**good, "parameters": {"lr": {"min": 0.1, "max": 0.01}}})


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_expands_to_expected_trials_that_the_training_cli_accepts(path):
    config = load_sweep(path)
    trials = expand(config)
    assert len(trials) == EXPECTED_TRIALS[path.name]
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == len(trials)  # no duplicate trial
    flags = {s for action in build_parser()._actions for s in action.option_strings}
    assert {f"--{key}" for key in config["parameters"]} <= flags
    for params in trials:
        assert params["optimizer"] in available_optimizers()
        assert (REPO / params["model-config"]).is_file()
        command = build_command(config, {**params, "output-dir": "runs/x", "wandb": "offline"})
        assert command[:3] == [sys.executable, "-m", "train"]
        cfg = parse_args(command[3:])  # validates every flag value as a run would
        assert (cfg.optimizer, cfg.lr, cfg.wandb) == (params["optimizer"], params["lr"], "offline")


#: per sweep, each optimizer's own (update_proj_gap, scale, error_feedback): GaLore's and Q-GaLore's C4
#: scripts; DCT-AdamW's class defaults (a new subspace every step, scale 1, NF4 error feedback)
SWEEP_GAP_SCALE_FEEDBACK = {
    "llama60m_lowrank.yaml": {
        "galore_adamw": (200, 0.25, None),
        "galore_adamw8bit": (200, 0.25, None),
        "galore_adafactor": (200, 0.25, None),
        "q_galore_adamw8bit": (200, 0.25, None),
    },
    "llama60m_dct.yaml": {"dct_adamw": (1, 1.0, "nf4")},
    "llama60m_apollo.yaml": {"apollo": (200, 1.0, None)},
    "llama60m_apollo_mini.yaml": {"apollo_mini": (200, math.sqrt(128), None)},
}


@pytest.mark.parametrize("sweep", sorted(SWEEP_GAP_SCALE_FEEDBACK))
def test_lowrank_sweeps_run_each_optimizer_with_its_own_gap_scale_and_feedback(sweep):
    from train.model import build_model
    from train.optim import make_optimizer

    expected = SWEEP_GAP_SCALE_FEEDBACK[sweep]
    config = load_sweep(REPO / "configs" / "sweeps" / sweep)
    tiny = str(REPO / "configs" / "llama_tiny.json")
    seen = set()
    for params in expand(config):
        cfg = parse_args(build_command(config, {**params, "output-dir": "runs/x"})[3:])
        if cfg.optimizer in seen:  # trials of one optimizer differ in lr and rank only
            continue
        cfg = dataclasses.replace(cfg, model_config=tiny, rank=8, dtype="float32")  # the same flags on a tiny model
        model = build_model(tiny, dtype=torch.float32, device=torch.device("cpu"), seed=0, vocab_needed=256, seq_len=32)
        groups = [g for g in make_optimizer(cfg, model).param_groups if g.get("rank") is not None]
        found = {(g["update_proj_gap"], g["scale"], g["error_feedback"]) for g in groups}
        assert found == {expected[cfg.optimizer]}, cfg.optimizer
        seen.add(cfg.optimizer)
    assert seen == set(expected)
