"""State bytes as the peers hold state (train/optim.py) and the probes' shared helpers
(scripts/bench/toolkit.py): a timer that leaves its set-up out, LLaMA from configs/."""

from __future__ import annotations

import json

import torch

from scripts.bench.toolkit import (
    LLAMA_60M,
    llama,
    markdown_table,
    median_seconds,
    peak_rss_above,
    predicted_memory,
    recipe,
    set_gradients,
)
from tests.helpers.tiny_run import TINY
from train.config import TrainConfig
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
    now = [0.0]  # a clock that moves only when a call says so
    run_seconds = iter([50.0, 3.0, 1.0, 2.0])  # the warm-up, then three timed calls

    def takes(what: str, seconds: float) -> None:
        calls.append(what)
        now[0] += seconds

    seconds = median_seconds(
        lambda: takes("run", next(run_seconds)),
        repeats=3,
        device="cpu",
        before=lambda: takes("before", 100.0),
        clock=lambda: now[0],
    )
    assert calls == ["before", "run"] * 4
    assert seconds == 2.0  # the median of 3, 1, 2: neither `before` nor the warm-up is timed


def test_llama_is_built_from_the_shipped_config():
    model = llama(device="meta")
    config = json.loads(LLAMA_60M.read_text())
    assert model.config.hidden_size == config["hidden_size"] and not model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 58_073_600  # GaLore's "60M" with its untied head


def test_recipe_builds_the_run_as_the_training_cli_and_predicts_a_float32_run_with_32_bit_weights():
    cfg = TrainConfig(model_config=TINY, optimizer="galore_adamw", rank=4, layerwise=True)
    model, optimizer, handle, accumulation = recipe(cfg, torch.device("cpu"))
    assert handle is not None and accumulation == 1 and {p.dtype for p in model.parameters()} == {torch.float32}
    assert [g["rank"] for g in optimizer.param_groups if g.get("rank")] == [4]
    handle.remove()
    weights = sum(p.numel() * 4 for p in model.parameters())
    # 4 bytes a parameter (and a few buffers); refused as "float32 with 16-bit weights" before
    assert weights <= predicted_memory(cfg).weights_bytes < 1.01 * weights


def test_peak_rss_above_sees_a_tensor_made_and_freed_inside_and_no_earlier_peak():
    torch.ones(32 * 2**20).sum()  # a 128 MiB peak of the process before the measurement
    assert peak_rss_above(lambda: None) < 16 * 2**20
    assert peak_rss_above(lambda: torch.ones(16 * 2**20).sum()) >= 48 * 2**20  # 64 MiB of float32, touched


def test_markdown_table_and_seeded_gradients():
    assert markdown_table(("a", "b"), [(1, "x")]) == "| a | b |\n|---|---|\n| 1 | x |"
    model = torch.nn.Linear(3, 2)
    set_gradients(model, 7)
    first = [p.grad.clone() for p in model.parameters()]
    set_gradients(model, 7)
    assert all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters()))
    on_meta = torch.nn.Linear(3, 2, device="meta", dtype=torch.bfloat16)
    set_gradients(on_meta, 7)
    assert [(p.grad.device.type, p.grad.dtype, p.grad.shape) for p in on_meta.parameters()] == [
        ("meta", torch.bfloat16, p.shape) for p in on_meta.parameters()
    ]
