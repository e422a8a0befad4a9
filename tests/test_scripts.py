"""The pretraining scripts (scripts/pretrain_llama{60m,130m,350m,1b}.sh): each optimizer gets its
paper's recipe, and the flags reach the optimizer. The scripts run with a stand-in ``PYTHON`` that
reports no GPU and records the training command instead of training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.helpers.scripts import script_config
from train.config import TrainConfig
from train.model import build_model
from train.optim import make_optimizer

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "llama_tiny.json")


def lowrank_groups(cfg: TrainConfig) -> list[dict]:
    """The low-rank param groups of the optimizer the configuration builds (on a tiny LLaMA)."""
    tiny = dataclasses.replace(cfg, model_config=TINY, rank=8, dtype="float32", weight_bits=16)
    model = build_model(TINY, dtype=torch.float32, device=torch.device("cpu"), seed=0, vocab_needed=256, seq_len=32)
    return [g for g in make_optimizer(tiny, model).param_groups if g.get("rank") is not None]


@pytest.mark.parametrize("size, rank", [("60m", 128), ("350m", 256)])
def test_galore_runs_galores_c4_recipe(tmp_path, size, rank):
    cfg = script_config(tmp_path, size)
    assert (cfg.optimizer, cfg.lr, cfg.rank, cfg.update_proj_gap, cfg.scale) == ("galore_adamw", 0.01, rank, 200, 0.25)
    assert (cfg.weight_decay, cfg.grad_clip, cfg.total_batch_size, cfg.warmup_steps * 10) == (0, 0, 512, cfg.max_steps)
    assert [(g["update_proj_gap"], g["scale"], g["eps"]) for g in lowrank_groups(cfg)] == [(200, 0.25, 1e-6)]


def test_galore_adamw8bit_keeps_its_own_eps(tmp_path):
    cfg = script_config(tmp_path, "60m", OPTIMIZER="galore_adamw8bit")
    assert cfg.eps is None and [g["eps"] for g in lowrank_groups(cfg)] == [1e-8]


def test_dct_adamw_runs_its_own_lr_gap_scale_and_error_feedback(tmp_path):
    cfg = script_config(tmp_path, "60m", OPTIMIZER="dct_adamw")
    assert (cfg.optimizer, cfg.lr, cfg.update_proj_gap, cfg.scale) == ("dct_adamw", 0.0025, 1, 1.0)
    assert [(g["proj_method"], g["update_proj_gap"], g["scale"], g["error_feedback"]) for g in lowrank_groups(cfg)] == [
        ("dct", 1, 1.0, "nf4")
    ]


@pytest.mark.parametrize(
    "size, lr, rank", [("60m", 0.015, 128), ("130m", 0.015, 256), ("350m", 0.01, 256), ("1b", 0.01, 1024)]
)
def test_q_galore_runs_q_galores_recipe_for_the_size(tmp_path, size, lr, rank):
    cfg = script_config(tmp_path, size, OPTIMIZER="q_galore_adamw8bit")
    assert (cfg.lr, cfg.rank, cfg.adam_betas, cfg.weight_bits, cfg.proj_bits) == (lr, rank, (0.9, 0.95), 8, 4)
    assert (cfg.update_proj_gap, cfg.scale) == (200, 0.25)
    (group,) = lowrank_groups(cfg)
    assert (group["betas"], group["refresh"], group["proj_bits"], group["update_proj_gap"]) == (
        (0.9, 0.95),
        "adaptive",
        4,
        200,
    )


def test_lr_from_the_environment_overrides_the_recipes(tmp_path):
    cfg = script_config(tmp_path, "60m", OPTIMIZER="q_galore_adamw8bit", LR="0.02")
    assert cfg.lr == 0.02
