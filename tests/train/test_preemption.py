"""SIGTERM and SIGINT, sent to a running ``python -m train``: the step in flight is finished and
saved, the folder released, the exit says "preempted", and ``--resume`` continues bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import checkpoint, main, outdir
from train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "train", *argv], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )


def _wait_for(run: subprocess.Popen, folder: Path, pattern: str) -> None:
    """Waits until the run has written a file ``pattern`` in ``folder`` (so it is inside its loop),
    however slow the machine. A pattern, not a name: a run that saves every step may rotate its
    first checkpoint away between two looks."""
    deadline = time.monotonic() + 300
    while not _written(folder, pattern):
        assert run.poll() is None, run.communicate()[1]
        assert time.monotonic() < deadline, f"the run wrote no {pattern} in 300 s"
        time.sleep(0.05)


def _written(folder: Path, pattern: str) -> bool:
    for path in folder.glob(pattern):
        try:
            if path.stat().st_size:
                return True
        except FileNotFoundError:  # rotated away since the listing
            pass
    return False


def _long_run(tiny_argv, out: Path, **flags) -> list[str]:
    """A run far longer than the test waits for, at a constant lr (its length changes nothing)."""
    return tiny_argv(out, scheduler="constant", max_steps=100_000, eval_every=100_000, **flags)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_step_in_flight_and_resume_continues_bit_exactly(tmp_path, tiny_argv, stop):
    out = tmp_path / "preempted"
    run = _start(_long_run(tiny_argv, out, optimizer="galore_adamw", rank=8, update_proj_gap=3))
    _wait_for(run, out, "metrics.jsonl")
    run.send_signal(stop)
    _, err = run.communicate(timeout=300)

    assert run.returncode == 1
    last = err.strip().splitlines()[-1]
    saved = checkpoint.saved(out)
    assert len(saved) == 1, err
    step = checkpoint.step_of(saved[0])
    assert last == (
        f"error: preempted by {stop.name} after step {step}: saved {str(saved[0])!r}; continue the run with --resume"
    )
    assert "Traceback" not in err
    assert not (out / outdir.LOCK_NAME).exists()
    if stop == signal.SIGINT:
        return  # the same path as SIGTERM from here on

    settings = dict(optimizer="galore_adamw", rank=8, update_proj_gap=3, scheduler="constant", eval_every=100_000)
    resumed = main(tiny_argv(out, max_steps=step + 3, resume=True, **settings))
    whole = main(tiny_argv(tmp_path / "whole", max_steps=step + 3, **settings))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[step:]]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, step + 4))
    ends = [checkpoint.load(checkpoint.latest(folder)) for folder in (out, tmp_path / "whole")]
    for name, tensor in ends[1]["model"].items():
        assert torch.equal(ends[0]["model"][name], tensor), name


def test_a_second_signal_exits_at_once_and_leaves_the_folder_resumable(tmp_path, tiny_argv):
    out = tmp_path / "run"
    run = _start(_long_run(tiny_argv, out, save_every=1, keep_checkpoints=2))
    _wait_for(run, out / "checkpoints", "step_*.pt")
    # both signals pending while the run is stopped: its handlers see them one right after the other
    run.send_signal(signal.SIGSTOP)
    run.send_signal(signal.SIGINT)
    run.send_signal(signal.SIGTERM)
    run.send_signal(signal.SIGCONT)
    _, err = run.communicate(timeout=300)

    assert run.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), err
    assert err.strip().splitlines()[-1].startswith("error: second signal (SIG")
    assert "exiting now; the checkpoints already written are intact" in err
    newest, corrupt = checkpoint.newest_intact(out)
    assert newest is not None and corrupt == []
    step = checkpoint.step_of(newest)
    records = main(tiny_argv(out, max_steps=step + 1, eval_every=step + 1, resume=True, scheduler="constant"))
    assert [r["step"] for r in records] == [step + 1]
