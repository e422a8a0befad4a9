"""The quickstart's runs (:mod:`train.quickstart`): low-rank optimizers share its short-run subspace
settings, except DCT-AdamW, which keeps its own gap 1 and scale 1 at its pretraining recipe's lr."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from lowmem_optim import DCTAdamW
from lowmem_optim.registry import LOWRANK_OPTIMIZERS
from train.config import parse_args
from train.quickstart import command

ARGS = argparse.Namespace(model_config="configs/llama_small.json", rank=64, batch_size=8, seq_len=128, steps=200)


@pytest.mark.parametrize("optimizer", sorted(LOWRANK_OPTIMIZERS))
def test_low_rank_runs_refresh_every_50_steps_at_scale_a_quarter_but_dct_adamw_keeps_its_own(optimizer):
    cfg = parse_args(command(optimizer, ARGS, Path("runs/x"))[3:])
    assert cfg.rank == 64
    if optimizer == "dct_adamw":
        assert cfg.lr == 2.5e-3  # scripts/pretrain_common.sh's dct recipe
        assert (cfg.update_proj_gap, cfg.scale) == (None, None)  # the class defaults
        group = DCTAdamW([{"params": [torch.nn.Parameter(torch.zeros(8, 8))], "rank": 2}]).param_groups[0]
        assert (group["update_proj_gap"], group["scale"]) == (1, 1.0)
    else:
        assert (cfg.lr, cfg.update_proj_gap, cfg.scale) == (1e-2, 50, 0.25)
