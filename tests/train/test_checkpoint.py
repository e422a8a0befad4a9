"""Checkpoints and resume (:mod:`train.checkpoint`): a resumed run reproduces the uninterrupted one; bad or foreign
checkpoints give clear errors and are never overwritten; writes are atomic."""

from __future__ import annotations

import shutil

import pytest
import torch

from train import checkpoint, main
from train.metrics import read_jsonl

SAME_IN_BOTH = ("step", "loss", "lr", "opt_state_bytes", "val_loss", "val_ppl")


@pytest.mark.parametrize(
    ("optimizer", "flags"),
    [
        ("galore_adamw", {}),
        ("galore_adamw8bit", {"layerwise": True, "total_batch_size": 8}),  # 8-bit codes; hooks; accumulation
    ],
)
def test_a_resumed_run_reproduces_the_uninterrupted_run_exactly(tmp_path, tiny_argv, optimizer, flags):
    # gap 3: refreshes at steps 1, 4, 7, so the first step after resuming refreshes the subspace
    settings = dict(max_steps=6, save_every=3, eval_every=3, keep_checkpoints=3, **flags)
    full = main(tiny_argv(tmp_path / "full", optimizer, **settings))

    shutil.copytree(tmp_path / "full", tmp_path / "cut")  # as if killed after step 3's checkpoint...
    (tmp_path / "cut" / "checkpoints" / "step_00000006.pt").unlink()
    resumed = main(tiny_argv(tmp_path / "cut", optimizer, resume=True, **settings))

    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [{k: r.get(k) for k in SAME_IN_BOTH} for r in resumed] == [
        {k: r.get(k) for k in SAME_IN_BOTH} for r in full[3:]
    ]
    lines = read_jsonl(tmp_path / "cut" / "metrics.jsonl")  # the interrupted run's steps 4-6 were dropped
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "step_00000006.pt")
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "step_00000006.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data"] == b["data"] == {"position": 6 * flags.get("total_batch_size", 4)}


def test_a_checkpoint_cut_short_is_reported_and_left_alone(tmp_path, tiny_argv):
    main(tiny_argv(tmp_path / "run", max_steps=4, save_every=2, eval_every=4))
    latest = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a checkpoint cut short by hand
    before = latest.read_bytes()
    with pytest.raises(ValueError, match=r"step_00000004.pt' is corrupt: its contents do not match .* left as is"):
        checkpoint.load(latest)
    assert latest.read_bytes() == before


def test_a_run_refuses_an_output_dir_with_checkpoints_unless_resuming(tmp_path, tiny_argv):
    argv = tiny_argv(tmp_path / "run", max_steps=2, eval_every=2)
    main(argv)
    saved = (tmp_path / "run" / "checkpoints" / "step_00000002.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds checkpoints .* pass --resume"):
        main(argv)
    with pytest.raises(ValueError, match=r"other settings \(--lr 0.01 -> 0.02\)"):
        main(tiny_argv(tmp_path / "run", max_steps=4, eval_every=2, lr=0.02, resume=True))
    assert (tmp_path / "run" / "checkpoints" / "step_00000002.pt").read_bytes() == saved


def test_a_write_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"weights": torch.ones(3)}, keep=2)

    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, {"weights": torch.zeros(3)}, keep=2)
    assert checkpoint.latest(tmp_path).name == "step_00000001.pt"
    assert torch.equal(torch.load(checkpoint.latest(tmp_path), weights_only=True)["weights"], torch.ones(3))
    assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == [
        "step_00000001.pt",
        "step_00000001.pt.sha256",
    ]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in checkpoint.saved(tmp_path)] == ["step_00000002.pt", "step_00000003.pt"]


def test_checkpoints_follow_save_every_even_between_logged_steps(run_tiny, tmp_path):
    records = run_tiny("run", "adamw", max_steps=6, log_every=4, eval_every=6, save_every=3, keep_checkpoints=5)
    assert [r["step"] for r in records] == [4, 6]
    assert [p.name for p in checkpoint.saved(tmp_path / "run")] == ["step_00000003.pt", "step_00000006.pt"]


def test_save_false_writes_no_checkpoint_not_even_at_the_end(run_tiny, tmp_path):
    records = run_tiny("run", "adamw", max_steps=3, eval_every=3, save_every=1, save=False)
    assert records[-1]["step"] == 3
    assert checkpoint.saved(tmp_path / "run") == [] and checkpoint.latest(tmp_path / "run") is None
