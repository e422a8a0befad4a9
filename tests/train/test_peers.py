"""Peer baselines as ``--optimizer peer_*`` (train/peers.py): accepted by the CLI, built with the
run's groups, one clear error where the package is missing."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.helpers.tiny_run import TINY as TINY_CONFIG
from train.config import TrainConfig
from train.model import build_model
from train.optim import make_optimizer
from train.peers import PEERS


def _model() -> torch.nn.Module:
    return build_model(
        TINY_CONFIG, dtype=torch.float32, device=torch.device("cpu"), seed=0, vocab_needed=256, seq_len=32
    )


def test_the_cli_accepts_peer_names_and_lists_them_on_a_bad_name():
    assert TrainConfig(model_config=TINY_CONFIG, optimizer="peer_apollo_mini").optimizer == "peer_apollo_mini"
    with pytest.raises(ValueError, match="--optimizer.*peer_galore_adamw"):
        TrainConfig(model_config=TINY_CONFIG, optimizer="peer_nonexistent")


def test_a_missing_peer_package_is_one_error_naming_the_flag_and_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "apollo_torch", None)  # as if not installed
    cfg = TrainConfig(model_config=TINY_CONFIG, optimizer="peer_apollo", rank=4)
    with pytest.raises(ValueError, match=r"--optimizer peer_apollo needs the package apollo-torch"):
        make_optimizer(cfg, _model())
    assert PEERS["peer_apollo"] == ("apollo_torch", "apollo-torch")


def test_galore_torch_adafactor_gets_the_runs_groups_and_a_fixed_lr():
    # galore-torch is a dev dependency: where it is missing, make_optimizer's error fails the test
    cfg = TrainConfig(
        model_config=TINY_CONFIG, optimizer="peer_galore_adafactor", rank=4, update_proj_gap=7, scale=0.5, lr=0.02
    )
    optimizer = make_optimizer(cfg, _model())
    (lowrank,) = [g for g in optimizer.param_groups if "rank" in g]
    assert (lowrank["rank"], lowrank["update_proj_gap"], lowrank["scale"], lowrank["proj_type"]) == (4, 7, 0.5, "std")
    assert optimizer.defaults["relative_step"] is False and optimizer.defaults["lr"] == 0.02
