"""What the probes share: state bytes, timing, LLaMA models from the shipped configs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
LLAMA_60M = REPO / "configs" / "llama_60m.json"
LLAMA_7B = REPO / "configs" / "llama_7b.json"


def state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``optimizer.state``, each once: values, nested containers,
    tensors held as attributes of objects (galore-torch and apollo-torch keep projectors so), the
    inner tensors of tensor subclasses (torchao's codes and scales; a DTensor's local shard)."""
    seen: set[int] = set()

    def walk(value: Any) -> Iterator[torch.Tensor]:
        if id(value) in seen:
            return
        seen.add(id(value))
        if torch.is_tensor(value) and hasattr(value, "__tensor_flatten__"):
            for inner in value.__tensor_flatten__()[0]:
                yield from walk(getattr(value, inner))
        elif torch.is_tensor(value):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from walk(v)
        elif hasattr(value, "__dict__"):
            for v in vars(value).values():
                yield from walk(v)

    for state in optimizer.state.values():
        yield from walk(state)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """numel x element size of every state tensor (on this rank)."""
    return sum(t.numel() * t.element_size() for t in state_tensors(optimizer))


def retained_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind the state tensors: what the state keeps alive (a
    view of a larger tensor keeps all of it)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state_tensors(optimizer)}
    return sum(storages.values())


def sync(device: torch.device | str) -> None:
    """Waits for the device's queued work (CUDA), so that a wall clock times it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    run: Callable[[], Any],
    repeats: int,
    device: torch.device | str,
    warmup: int = 1,
    before: Callable[[], Any] | None = None,
) -> float:
    """Median wall time of ``repeats`` calls of ``run`` after ``warmup`` untimed ones, the
    device synchronized around each; ``before`` runs untimed ahead of every call."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def llama(config: str | Path = LLAMA_60M, seed: int = 0, device: torch.device | str = "cpu") -> torch.nn.Module:
    """HF ``LlamaForCausalLM`` from a config JSON (default ``configs/llama_60m.json``, GaLore's
    60M: hidden 512, MLP 1376, 8 layers, vocab 32000, untied head), float32, its weights drawn
    after ``manual_seed(seed)`` on ``device`` (``"meta"``: shapes only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig.from_json_file(config))
