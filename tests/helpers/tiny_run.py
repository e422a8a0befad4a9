"""The command line of a tiny LLaMA run of the training CLI, shared by the train/ tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem_optim.registry import LOWRANK_OPTIMIZERS

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "llama_tiny.json")


def tiny_argv(output_dir: Path, optimizer: str = "adamw", **flags: Any) -> list[str]:
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
