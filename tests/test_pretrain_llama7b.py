"""scripts/pretrain_llama7b.sh picks its recipe from the GPU's total memory, or from GPU_MEMORY."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from train.config import parse_args

REPO = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, total_gib: int, **env: str) -> subprocess.CompletedProcess:
    """The script with a stand-in PYTHON: a CUDA GPU of ``total_gib`` GiB; the training command recorded."""
    record = tmp_path / "argv"
    stub = tmp_path / "python"
    stub.write_text(
        "#!/bin/sh\n"
        'case "$2" in *total_memory*) echo ' + str(total_gib) + "; exit 0 ;; esac\n"
        'if [ "$1" = -c ]; then exit 0; fi\n'
        f'printf "%s\\n" "$@" > {record}\n'
    )
    stub.chmod(0o755)
    script = str(REPO / "scripts" / "pretrain_llama7b.sh")
    return subprocess.run(
        ["bash", script], env={**os.environ, "PYTHON": str(stub), **env}, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "total_gib, weight_bits, rank, batch",
    [(11, 8, 256, 8), (15, 8, 1024, 4), (23, 16, 1024, 16), (79, 16, 1024, 16)],
)
def test_the_recipe_follows_the_gpus_memory(tmp_path, total_gib, weight_bits, rank, batch):
    run = run_script(tmp_path, total_gib)
    assert run.returncode == 0, run.stderr
    cfg = parse_args((tmp_path / "argv").read_text().splitlines()[2:])
    assert (cfg.weight_bits, cfg.rank, cfg.batch_size, cfg.total_batch_size) == (weight_bits, rank, batch, 512)


def test_gpu_memory_chooses_by_hand_and_a_bad_value_is_named(tmp_path):
    run = run_script(tmp_path, 79, GPU_MEMORY="12")
    assert run.returncode == 0 and parse_args((tmp_path / "argv").read_text().splitlines()[2:]).rank == 256
    bad = run_script(tmp_path, 79, GPU_MEMORY="20")
    assert bad.returncode == 1 and "Invalid GPU_MEMORY: '20' (allowed: 12, 16, 24)" in bad.stderr


def test_a_card_under_12_gb_is_refused(tmp_path):
    run = run_script(tmp_path, 10)
    assert run.returncode == 1 and "needs a 12 GB card" in run.stderr
