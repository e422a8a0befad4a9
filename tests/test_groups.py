"""Param groups from a model (:mod:`lowmem_optim.groups`): which weights are low-rank, which go to
a normalized-momentum rule and which to AdamW."""

from __future__ import annotations

import pytest

import lowmem_optim
from tests.helpers.models import ConvNet
from tests.helpers.tiny import tiny_llama


def test_normalized_param_groups_send_hidden_matrices_and_convs_to_the_rule_and_the_rest_to_adam():
    model = ConvNet()
    rest, matrices = lowmem_optim.normalized_param_groups(model, target_modules=["conv", "fc"], lr=0.1)
    assert matrices["param_names"] == ["conv.weight", "fc.weight"] and matrices["lr"] == 0.1
    assert rest["rule"] == "adam"
    assert set(rest["param_names"]) == {"conv.bias", "norm.weight", "norm.bias", "fc.bias", "head.weight", "head.bias"}


def test_all_linear_on_llama_excludes_embeddings_norms_and_output_head():
    model = tiny_llama()
    rest, matrices = lowmem_optim.normalized_param_groups(model)
    assert len(matrices["params"]) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(p.dim() == 2 for p in matrices["params"])
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(rest["param_names"])


def test_lowrank_param_groups_keeps_linear_only_selection_after_refactor():
    groups = lowmem_optim.lowrank_param_groups(ConvNet(), target_modules=["conv", "fc"], rank=2)
    assert groups[1]["param_names"] == ["fc.weight"] and groups[1]["rank"] == 2
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lowmem_optim.lowrank_param_groups(ConvNet(), target_modules=["conv"], rank=2)
