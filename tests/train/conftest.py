"""A tiny LLaMA run of the training CLI, in-process, for the train/ tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lowmem_optim.registry import LOWRANK_OPTIMIZERS

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "llama_tiny.json")


def _tiny_argv(output_dir: Path, optimizer: str = "adamw", **flags: Any) -> list[str]:
    """CLI arguments of a few-second run: llama_tiny, batch 4 x 32 tokens, 8 steps, eval at 4 and 8."""
    settings: dict[str, Any] = {
        "model-config": TINY,
        "optimizer": optimizer,
        "lr": 0.01,
        "batch-size": 4,
        "seq-len": 32,
        "max-steps": 8,
        "eval-every": 4,
        "eval-batches": 2,
        "output-dir": output_dir,
        "progress": False,
        "wandb": "off",
    }
    if optimizer in LOWRANK_OPTIMIZERS:
        settings.update({"rank": 8, "update-proj-gap": 3})
    settings.update({k.replace("_", "-"): v for k, v in flags.items()})
    return [f"--{k}={v}" for k, v in settings.items() if v is not None]


@pytest.fixture
def tiny_argv() -> Callable[..., list[str]]:
    """``tiny_argv(output_dir, optimizer="adamw", **flags)``: the CLI arguments of a tiny run."""
    return _tiny_argv


@pytest.fixture
def run_tiny(tmp_path: Path) -> Callable[..., list[dict[str, Any]]]:
    """``run_tiny(name, optimizer, **flags)`` trains in ``tmp_path / name``; returns the records."""
    from train import main

    def run(name: str = "run", optimizer: str = "adamw", **flags: Any) -> list[dict[str, Any]]:
        return main(_tiny_argv(tmp_path / name, optimizer, **flags))

    return run


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from intra-op threads; on a shared CI machine they only spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
