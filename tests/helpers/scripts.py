"""The pretraining scripts' configurations, read without training."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from train.config import TrainConfig, parse_args

REPO = Path(__file__).resolve().parents[2]


def script_config(tmp_path: Path, size: str, **env: str) -> TrainConfig:
    """The configuration ``scripts/pretrain_llama<size>.sh`` hands to ``python -m train``."""
    record = tmp_path / "argv"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then echo 0; exit 0; fi\nprintf "%s\\n" "$@" > {record}\n')
    stub.chmod(0o755)
    subprocess.run(
        ["bash", str(REPO / "scripts" / f"pretrain_llama{size}.sh")],
        check=True,
        env={**os.environ, "PYTHON": str(stub), **env},
    )
    argv = record.read_text().splitlines()
    assert argv[:2] == ["-m", "train"]
    return parse_args(argv[2:])
