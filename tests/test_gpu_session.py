"""The GPU check runs in one go: its dry run on the CPU takes every step with tiny configurations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1500)  # six Python processes; minutes on a shared CI machine
def test_gpu_session_dry_run_takes_every_step_and_stays_within_the_result_limits(tmp_path):
    out = tmp_path / "session"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "BUDGET_S": "1500"}
    run = subprocess.run(
        ["bash", str(REPO / "scripts" / "bench" / "gpu_session.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    log = (out / "session.log").read_text()
    assert run.returncode == 0, run.stdout + run.stderr
    assert log.count("   rc=0,") == 8, log  # steps 0-5 (step 1 once per recipe), none skipped or failed
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files
    assert not any("checkpoint" in str(f) for f in files)
    for card in ("16", "12", "24"):  # each recipe of scripts/pretrain_llama7b.sh, 4 micro-batches per update
        split = json.loads((out / f"split{card}" / "recipe_step.jsonl").read_text())
        assert split["tokens_per_s_vs_floor"] > 0 and split["predicted"]["total_bytes"] > 0
        assert split["ours"]["accumulation_steps"] == 4
        int8 = "int8 apply_update" in split["ours"]["parts_s_per_step"]
        assert {"forward", "backward", "update"} <= set(split["ours"]["parts_s_per_step"])
        assert int8 == (split["config"]["weight_bits"] == 8) == (card != "24")
    assert [json.loads(line)["step"] for line in (out / "recipe7b" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    assert json.loads((out / "memory" / "recipe_step.jsonl").read_text())["ours"]["peak_allocated_bytes"] > 0
