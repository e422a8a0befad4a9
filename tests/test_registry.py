"""The registry (:mod:`lowmem_optim.registry`): names to classes, and param groups built from a model
for each kind of optimizer."""

from __future__ import annotations

import pytest
import torch

import lowmem_optim
from lowmem_optim.registry import MATRIX_OPTIMIZERS, build_optimizer
from tests.helpers.tiny import tiny_llama


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor", "galore_adamw8bit"])
def test_registry_builds_each_optimizer_from_a_model(name):
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 32), torch.nn.Linear(32, 8))
    opt = lowmem_optim.build_optimizer(name, model, rank=4)
    assert isinstance(opt, lowmem_optim.get_optimizer_class(name))
    assert [g["rank"] for g in opt.param_groups] == [None, 4]


@pytest.mark.parametrize("name", sorted(MATRIX_OPTIMIZERS))
def test_registry_builds_matrix_and_adamw_groups(name):
    opt = build_optimizer(name, tiny_llama(), lr=0.05, adamw_lr=2e-3)
    assert type(opt) is lowmem_optim.get_optimizer_class(name)
    rules = [g["rule"] for g in opt.param_groups]
    matrix_rule = type(opt).part_choices["rule"][0]  # the registry name but for SinkGD and SCALE
    assert rules == ["adam", matrix_rule] and opt.param_groups[0]["lr"] == 2e-3 and opt.param_groups[1]["lr"] == 0.05


def test_registry_routes_rank_to_the_matrix_group_for_the_lowrank_variant():
    opt = build_optimizer("auon", tiny_llama(), rank=4, update_proj_gap=10)
    assert "rank" not in opt.param_groups[0] or opt.param_groups[0]["rank"] is None
    assert opt.param_groups[1]["rank"] == 4 and opt.param_groups[1]["update_proj_gap"] == 10


def test_each_class_of_the_package_carries_the_name_the_registry_lists_it_under():
    from lowmem_optim.registry import OPTIMIZERS, get_optimizer_class

    ours = {name: get_optimizer_class(name) for name, path in OPTIMIZERS.items() if path.startswith("lowmem_optim.")}
    assert ours and {name: cls.registry_name for name, cls in ours.items()} == {name: name for name in ours}


def test_none_is_a_choice_where_the_class_defaults_to_another_value_and_unset_elsewhere():
    model = tiny_llama()
    lowrank = lambda opt: opt.param_groups[1]  # noqa: E731
    assert lowrank(build_optimizer("dct_adamw", model, rank=4))["error_feedback"] == "nf4"
    assert lowrank(build_optimizer("dct_adamw", model, rank=4, error_feedback=None))["error_feedback"] is None
    assert lowrank(build_optimizer("fira", model, rank=4, norm_growth_limit=None))["norm_growth_limit"] is None
    assert lowrank(build_optimizer("q_galore_adamw8bit", model, rank=4, proj_bits=None))["proj_bits"] is None
    # None where the class's default is None: dropped, as before (APOLLO-Mini's rank 1 stays)
    assert lowrank(build_optimizer("apollo_mini", model, rank=None))["rank"] == 1
    assert lowrank(build_optimizer("galore_adamw", model, rank=4, proj_bits=None))["proj_bits"] is None
