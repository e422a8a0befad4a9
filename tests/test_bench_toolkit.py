"""State bytes as the peers hold state (train/optim.py) and the probes' shared helpers
(scripts/bench/toolkit.py): a timer that leaves its set-up out, LLaMA from configs/."""

from __future__ import annotations

import json

import torch

from scripts.bench.toolkit import LLAMA_60M, llama, median_seconds
from train.optim import retained_bytes, state_bytes


class _Projector:  # as galore-torch keeps its basis: an object in the state
    def __init__(self, basis: torch.Tensor) -> None:
        self.basis = basis


def test_state_bytes_reach_nested_tensors_and_retained_bytes_count_a_views_whole_storage():
    p = torch.nn.Parameter(torch.zeros(4, 8))
    optimizer = torch.optim.SGD([p], lr=0.1)
    whole = torch.zeros(16, 8)
    optimizer.state[p] = {"m": torch.zeros(4, 8), "projector": _Projector(whole[:2]), "queue": [torch.zeros(3)], "n": 1}
    assert state_bytes(optimizer) == (32 + 16 + 3) * 4
    assert retained_bytes(optimizer) == (32 + 128 + 3) * 4


def test_median_seconds_runs_before_untimed_ahead_of_each_call():
    calls: list[str] = []
    seconds = median_seconds(
        lambda: calls.append("run"), repeats=3, device="cpu", before=lambda: calls.append("before")
    )
    assert calls == ["before", "run"] * 4 and seconds >= 0  # one warm-up, three timed


def test_llama_is_built_from_the_shipped_config():
    model = llama(device="meta")
    config = json.loads(LLAMA_60M.read_text())
    assert model.config.hidden_size == config["hidden_size"] and not model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 58_073_600  # GaLore's "60M" with its untied head
