"""``lowmem-optim fit``: the preferred low-memory setup whose prediction is within a card's budget."""

from __future__ import annotations

import itertools
import json

import pytest

from lowmem_optim.tools.cli import main
from lowmem_optim.tools.memory import estimate_memory
from lowmem_optim.tools.memory_fit import MODEL_MARGIN, budget_bytes, candidates, fitting

SMALL = "configs/llama_small.json"


def small_config() -> dict:
    return json.loads(open(SMALL).read())


def test_budget_leaves_room_for_the_context_and_allocator():
    assert [budget_bytes(m) / 2**30 for m in (12, 16, 24, 80)] == [10.5, 14.0, 22.0, 78.0]


@pytest.mark.parametrize("memory", [0, 2, -16, "16", True])
def test_bad_memory_is_refused_naming_the_flag(memory):
    with pytest.raises(ValueError, match="--memory-gib"):
        budget_bytes(memory)


def test_the_chosen_setup_is_the_first_candidate_within_the_budget():
    config = json.loads(open("configs/llama_7b.json").read())
    found = fitting(config, 16, 256, 512)
    earlier = list(itertools.takewhile(lambda s: s != found.setup, candidates(config, 256, 512)))
    limit = (1 - MODEL_MARGIN) * budget_bytes(16)
    assert found.estimate.total_bytes <= limit and earlier  # bf16 weights and larger micro-batches come first
    assert all(estimate_memory(config, s).total_bytes > limit for s in earlier)
    assert (found.setup.rank, found.setup.weight_bits, found.setup.batch_size) == (1024, 8, 4)


def test_micro_batches_have_at_least_1024_tokens():
    assert {s.batch_size * s.seq_len for s in candidates(small_config(), 128, 64)} >= {1024}
    assert min(s.batch_size * s.seq_len for s in candidates(small_config(), 128, 64)) == 1024


def test_cli_prints_the_flags_and_the_prediction(capsys):
    assert main(["fit", "--model-config", SMALL, "--memory-gib", "12", "--seq-len", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "--layerwise" in result["flags"] and f"--rank={small_config()['hidden_size'] // 4}" in result["flags"]
    assert result["total_bytes"] <= result["budget_bytes"]


def test_cli_says_when_nothing_fits(capsys):
    assert main(["fit", "--model-config", "configs/llama_7b.json", "--memory-gib", "4"]) == 2
    assert "no setup" in capsys.readouterr().err
