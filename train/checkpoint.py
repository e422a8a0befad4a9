"""Checkpoints: one file per saved step, written atomically, read with ``weights_only=True``.

``<output-dir>/checkpoints/step_00001000.pt`` holds the step, model, optimizer (with any
layer-wise state), scheduler, data position, RNG states and the run's config. A checkpoint is
first written to a temporary file in the same folder and then renamed over its final name
(``os.replace`` is atomic on POSIX), so a run killed mid-write leaves the previous checkpoints
intact and never a half-written ``step_*.pt``. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"step_(\d+)\.pt")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def saved(output_dir: str | Path) -> list[Path]:
    """The checkpoints in ``output_dir``, oldest first (temporary files excluded)."""
    folder = checkpoint_dir(output_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest(output_dir: str | Path) -> Path | None:
    found = saved(output_dir)
    return found[-1] if found else None


def save(output_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` and drop all but the newest ``keep``."""
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except BaseException:  # interrupted or failed: the partial file never becomes a checkpoint
        tmp.unlink(missing_ok=True)
        raise
    for old in saved(output_dir)[:-keep]:
        old.unlink()
    return path


def load(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``; ValueError saying what to do when it cannot be read."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, foreign objects: all mean "unusable"
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt or unreadable ({type(err).__name__}: {err}). It was left as is; "
            "move it away to resume from the checkpoint before it, or start a new --output-dir"
        ) from err
    missing = {"step", "model", "optimizer", "scheduler", "data", "rng", "config"} - set(payload)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {sorted(missing)}; it was not written by this training loop")
    return payload


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
