"""What a resumed run may change about the run's shape, and the record of what it changed.

A resume must train the same run (:func:`train.loop.check_resumable`). Four settings change it
while looking harmless: the world size (the number of processes), the global batch (sequences
per optimizer step: ``--total-batch-size``, or ``--batch-size`` x processes when unset), the
micro-batch (``--batch-size``) and the schedule's length (``--max-steps`` under a decaying
``--scheduler``; with ``constant`` the length moves no learning rate). A resume that changes
any of them is refused, naming the old and the new value, unless ``--allow-resume-changes``;
then each change is appended to ``history`` in ``config.json`` (the step it took effect at and
the old and new values), so the record of how the first part ran is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def shape(config: dict[str, Any], world: int | None) -> dict[str, Any]:
    """The settings above, by the name an error shows (``world`` None: a checkpoint that does not
    record its world size, from before it was saved)."""
    global_batch = config["total_batch_size"] or (config["batch_size"] * world if world is not None else None)
    described = {
        "world size": world,
        "global batch (sequences per step)": global_batch,
        "micro-batch (--batch-size)": config["batch_size"],
        "schedule length (--max-steps)": config["max_steps"] if config["scheduler"] != "constant" else None,
    }
    return {name: value for name, value in described.items() if value is not None}


def changes(saved: dict[str, Any], now: dict[str, Any], world: int) -> dict[str, list[Any]]:
    """{setting: [the checkpoint's value, this run's]} for each setting of :func:`shape` that differs."""
    before, after = shape(saved, saved.get("world_size")), shape(now, world)
    return {name: [before[name], after[name]] for name in before.keys() & after.keys() if before[name] != after[name]}


def check(saved: dict[str, Any], now: dict[str, Any], world: int, *, allowed: bool) -> dict[str, list[Any]]:
    """The changes (see :func:`changes`); ValueError naming each one unless ``allowed``."""
    found = changes(saved, now, world)
    if found and not allowed:
        diffs = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in sorted(found.items()))
        raise ValueError(
            f"--resume: the checkpoint's run had another shape ({diffs}); resume with the same settings, "
            "or pass --allow-resume-changes to continue with these changes (recorded in config.json's history)"
        )
    return found


def history(output_dir: Path, step: int, found: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The ``history`` of ``output_dir``'s config.json with ``found`` (taking effect after ``step``) appended."""
    path = output_dir / "config.json"
    earlier = json.loads(path.read_text()).get("history", []) if path.exists() else []
    return earlier + ([{"resumed_after_step": step, "changed": found}] if found else [])
