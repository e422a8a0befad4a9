"""A tiny LLaMA run of the training CLI, in-process, for the train/ tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.tiny_run import tiny_argv as _tiny_argv


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
