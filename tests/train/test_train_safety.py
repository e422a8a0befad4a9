"""A run never replaces good state with bad and refuses what it cannot trust: non-finite losses,
corrupt checkpoints, failed writes, changed configs or data, and output dirs of other runs."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import RunStopped, checkpoint, main, outdir
from train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def _poison_loss_at(monkeypatch, steps: set[int], accum: int = 1) -> None:
    """The training loss is NaN in the forward passes of ``steps`` (counted in optimizer steps)."""
    import train.loop

    real = train.loop.run_model
    calls = {"n": 0}

    def build(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if (calls["n"] - 1) // accum + 1 in steps:
                    output.logits = output.logits * float("nan")
                    output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train.loop, "run_model", build)


def _all_finite(path: Path) -> bool:
    payload = checkpoint.load(path)
    tensors = list(payload["model"].values()) + [v for s in payload["optimizer"]["state"].values() for v in s.values()]
    return all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point())


# ---- 1. non-finite losses: stop before saving, keep the last good checkpoint ------------------
@pytest.mark.parametrize("optimizer", ["adamw", "galore_adamw"])
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_argv, optimizer):
    out = tmp_path / "run"
    with pytest.raises(RunStopped) as err:
        main(tiny_argv(out, optimizer, lr=1e30, max_steps=6, save_every=1, keep_checkpoints=2, update_proj_gap=1))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("step 2: ") and "step_00000001.pt" in message
    assert [p.name for p in checkpoint.saved(out)] == ["step_00000001.pt"]
    assert _all_finite(out / "checkpoints" / "step_00000001.pt")
    lines = [json.loads(line, parse_constant=pytest.fail) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if optimizer == "adamw":  # strict JSON: the NaN loss is written as null
        assert [r["loss"] is None for r in lines] == [False, True]
    else:  # the subspace refresh of step 2 refuses its NaN gradient before anything is logged
        assert "holds inf/NaN at a subspace refresh; nothing was updated" in message and len(lines) == 1
    assert not (out / outdir.LOCK_NAME).exists()


def test_the_entry_point_exits_1_with_one_line_on_divergence(tmp_path, tiny_argv, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["train", *tiny_argv(tmp_path / "run", lr=1e30, max_steps=3, save_every=1)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("train", run_name="__main__")
    assert exit_.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: step 2: the loss is not finite") and "step_00000001.pt" in last


def test_a_non_finite_loss_between_logged_steps_is_caught_by_the_next_read(tmp_path, tiny_argv, monkeypatch):
    _poison_loss_at(monkeypatch, {3})
    with pytest.raises(RunStopped, match=r"^step 3: the loss is not finite.*Last good checkpoint: none yet"):
        main(tiny_argv(tmp_path / "run", max_steps=8, log_every=4, eval_every=8))
    assert checkpoint.saved(tmp_path / "run") == []


def test_on_nonfinite_skip_skips_the_step_and_its_update(tmp_path, tiny_argv, monkeypatch):
    _poison_loss_at(monkeypatch, {3}, accum=2)
    records = main(
        tiny_argv(tmp_path / "run", max_steps=5, eval_every=5, total_batch_size=8, save_every=5, on_nonfinite="skip")
    )
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 0, 0]
    assert records[2]["loss"] is None and all(r["loss"] is not None for r in records[3:])
    assert _all_finite(tmp_path / "run" / "checkpoints" / "step_00000005.pt")


def test_skip_is_refused_with_layerwise(tmp_path, tiny_argv):
    with pytest.raises(ValueError, match="--on-nonfinite skip with --layerwise is not supported"):
        main(tiny_argv(tmp_path / "run", "galore_adamw", layerwise=True, on_nonfinite="skip"))


def test_the_loss_is_read_once_per_logging_interval_not_per_step(tmp_path, tiny_argv, monkeypatch):
    # every device-to-host read of a tensor goes through one of these
    import train.distributed
    import train.loop

    loop_files = {train.loop.__file__, train.distributed.__file__}
    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, real=real):  # reads by the loop itself (the optimizer's are its own)
            reads["n"] += sys._getframe(1).f_code.co_filename in loop_files
            return real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_of(steps: int) -> int:
        reads["n"] = 0
        main(tiny_argv(tmp_path / f"run{steps}", max_steps=steps, log_every=4, eval_every=100, eval_batches=1))
        return reads["n"]

    # 4 more steps = one more logging interval: its one read of the loss, nothing per step
    assert reads_of(8) - reads_of(4) == 1


# ---- 2. checksums, resume from the newest intact checkpoint ----------------------------------------
def _flip_bytes(path: Path, n: int = 50) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for i in rng.sample(range(len(data)), n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_an_error_naming_it_and_resume_takes_the_newest_intact(tmp_path, tiny_argv, capsys):
    settings = dict(max_steps=6, save_every=2, eval_every=2, keep_checkpoints=3)
    main(tiny_argv(tmp_path / "full", **settings))
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    newest = tmp_path / "cut" / "checkpoints" / "step_00000006.pt"
    _flip_bytes(newest)
    with pytest.raises(ValueError, match=r"^checkpoint '.*step_00000006.pt' is corrupt: its contents do not match"):
        checkpoint.load(newest)

    resumed = main(tiny_argv(tmp_path / "cut", resume=True, **settings))
    err = capsys.readouterr().err
    assert "skipping a corrupt checkpoint" in err and "resuming from" in err and "step_00000004.pt" in err
    assert [r["step"] for r in resumed] == [5, 6]
    a, b = (checkpoint.load(tmp_path / run / "checkpoints" / "step_00000006.pt") for run in ("full", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_with_only_corrupt_checkpoints_is_refused_and_they_are_left_as_they_are(tmp_path, tiny_argv):
    argv = tiny_argv(tmp_path / "run", max_steps=2, save_every=1, eval_every=2)
    main(argv)
    for path in checkpoint.saved(tmp_path / "run"):
        _flip_bytes(path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()}
    with pytest.raises(ValueError, match=r"^no intact checkpoint in .*step_00000002.pt' is corrupt.*step_00000001.pt"):
        main(argv + ["--resume"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()} == before


def test_the_checksum_file_is_sha256sum_compatible(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"weights": torch.arange(5.0)}, keep=2)
    line = checkpoint.checksum_path(path).read_text()
    assert line == f"{checkpoint.file_sha256(path)}  step_00000001.pt\n"
    checkpoint.verify(path)


def test_a_full_disk_is_one_line_naming_the_file_and_the_previous_checkpoints_stay(tmp_path, monkeypatch):
    first = checkpoint.save(tmp_path, 1, {"weights": torch.ones(3)}, keep=1)
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 300:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError) as err:
        checkpoint.save(tmp_path, 2, {"weights": torch.zeros(10_000)}, keep=1)
    assert str(err.value) == (
        f"[Errno 28] could not write checkpoint '{tmp_path / 'checkpoints' / 'step_00000002.pt'}' "
        "(No space left on device); the previous checkpoints are intact"
    )
    assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == [
        "step_00000001.pt",
        "step_00000001.pt.sha256",
    ]
    checkpoint.verify(first)
    assert torch.equal(torch.load(first, weights_only=True)["weights"], torch.ones(3))


def test_a_failed_save_in_a_run_stops_it_with_one_line(tmp_path, tiny_argv, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "could not write checkpoint 'x' (No space left on device)")

    monkeypatch.setattr(checkpoint, "save", full)
    with pytest.raises(RunStopped, match=r"^step 2: could not write checkpoint 'x' \(No space left on device\)$"):
        main(tiny_argv(tmp_path / "run", max_steps=2, eval_every=2))


def test_a_checkpoint_that_reads_back_wrong_stops_the_run_and_the_previous_one_stays(tmp_path, tiny_argv, monkeypatch):
    argv = tiny_argv(tmp_path / "run", max_steps=2, save_every=1, eval_every=2, keep_checkpoints=1)
    real = checkpoint.verify

    def second_fails(path):
        if path.name == "step_00000002.pt":
            raise ValueError(f"checkpoint {str(path)!r} is corrupt")
        real(path)

    monkeypatch.setattr(checkpoint, "verify", second_fails)
    with pytest.raises(RunStopped, match=r"^step 2: checkpoint '.*step_00000002.pt' is corrupt$"):
        main(argv)
    assert [p.name for p in checkpoint.saved(tmp_path / "run")] == ["step_00000001.pt", "step_00000002.pt"]


def test_rotation_deletes_an_old_checkpoint_only_after_the_new_one_is_verified(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"step": 1}, keep=1)

    def fails(path):
        raise ValueError(f"checkpoint {str(path)!r} is corrupt")

    monkeypatch.setattr(checkpoint, "verify", fails)
    with pytest.raises(ValueError, match="step_00000002.pt' is corrupt"):
        checkpoint.save(tmp_path, 2, {"step": 2}, keep=1)
    assert [p.name for p in checkpoint.saved(tmp_path)] == ["step_00000001.pt", "step_00000002.pt"]


def test_stale_temporary_files_are_removed_at_start(tmp_path, tiny_argv, capsys):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / ".step_00000004.pt.12345.tmp").write_bytes(b"PK partial")
    main(tiny_argv(tmp_path / "run", max_steps=1, eval_every=1))
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001.pt", "step_00000001.pt.sha256"]
    assert "removed .step_00000004.pt.12345.tmp" in capsys.readouterr().err


# ---- 3. resume compares the model config's contents and the data -----------------------------------
def test_resume_compares_the_model_config_contents_not_its_path(tmp_path, tiny_argv, monkeypatch):
    config = json.loads((REPO / "configs" / "llama_tiny.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps(config))
    main(
        tiny_argv(
            tmp_path / "run", scheduler="constant", model_config=tmp_path / "model.json", max_steps=2, eval_every=2
        )
    )
    monkeypatch.chdir(tmp_path)  # the same file by a relative path resumes
    records = main(
        tiny_argv(
            tmp_path / "run", scheduler="constant", model_config="model.json", max_steps=3, eval_every=3, resume=True
        )
    )
    assert [r["step"] for r in records] == [3]

    (tmp_path / "model.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}))
    with pytest.raises(
        ValueError,
        match=r"^--resume: --model-config 'model.json' differs from the config the "
        r"checkpoint was trained with \(rms_norm_eps 1e-06 -> 1e-05, rope_theta "
        r"\(unset\) -> 500000.0\)",
    ):
        main(tiny_argv(tmp_path / "run", scheduler="constant", model_config="model.json", max_steps=4, resume=True))


def test_resume_refuses_data_whose_contents_changed(tmp_path, tiny_argv):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{j % 50} and more words" for j in range(800)))
    main(tiny_argv(tmp_path / "run", data=corpus, max_steps=2, eval_every=2, val_fraction=0.25))
    corpus.write_text(corpus.read_text().replace("word1 ", "WORD1 "))  # same size, other contents
    with pytest.raises(
        ValueError,
        match=r"^--resume: --data '.*corpus.txt' is not the data the checkpoint was "
        r"trained on \(its contents changed",
    ):
        main(tiny_argv(tmp_path / "run", data=corpus, max_steps=3, val_fraction=0.25, resume=True))


def _as_if_trained_on(out: Path, world: int) -> None:
    """Rewrites ``out``'s newest checkpoint as a run of ``world`` processes would have saved it."""
    path = checkpoint.latest(out)
    payload = checkpoint.load(path)
    payload["config"]["world_size"] = world
    checkpoint.save(out, checkpoint.step_of(path), payload, keep=1)


def test_resume_refuses_another_world_size_naming_both_unless_allowed_then_records_it(tmp_path, tiny_argv):
    out = tmp_path / "run"
    main(tiny_argv(out, max_steps=2, eval_every=2))
    _as_if_trained_on(out, world=2)
    with pytest.raises(
        ValueError,
        match=r"^--resume: the checkpoint's run had another shape \(global batch \(sequences per step\) 8 -> 4, "
        r"world size 2 -> 1\); .* --allow-resume-changes",
    ):
        main(tiny_argv(out, max_steps=2, resume=True))

    main(tiny_argv(out, max_steps=3, eval_every=3, scheduler="cosine", resume=True, allow_resume_changes=True))
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 1
    assert config["history"] == [
        {
            "resumed_after_step": 2,
            "changed": {
                "world size": [2, 1],
                "global batch (sequences per step)": [8, 4],
                "schedule length (--max-steps)": [2, 3],
            },
        }
    ]


def test_resume_refuses_another_micro_batch_or_schedule_length_naming_both(tmp_path, tiny_argv):
    out = tmp_path / "run"
    main(tiny_argv(out, max_steps=2, eval_every=2))
    with pytest.raises(ValueError, match=r"another shape \(micro-batch \(--batch-size\) 4 -> 2\)"):
        main(tiny_argv(out, max_steps=2, batch_size=2, total_batch_size=4, resume=True))
    with pytest.raises(ValueError, match=r"another shape \(schedule length \(--max-steps\) 2 -> 5\)"):
        main(tiny_argv(out, max_steps=5, resume=True))
    assert not (out / outdir.LOCK_NAME).exists()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_as_data_is_refused_instead_of_hanging(tmp_path, tiny_argv, kind):
    if kind == "fifo":
        data = tmp_path / "corpus.txt"
        os.mkfifo(data)  # opening it for reading would wait for a writer forever
    else:
        data = tmp_path / "zeros.txt"
        data.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(ValueError, match=r"^--data '.*' is not a regular file \(a FIFO or a device"):
        main(tiny_argv(tmp_path / "run", data=data, max_steps=1))


def test_the_training_cli_refuses_an_absurd_model_size_before_building_anything(tmp_path, tiny_argv):
    config = {**json.loads((REPO / "configs" / "llama_tiny.json").read_text()), "num_hidden_layers": 10**12}
    (tmp_path / "huge.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"num_hidden_layers is 1000000000000 \(allowed: at most 10000\)"):
        main(tiny_argv(tmp_path / "run", model_config=tmp_path / "huge.json", max_steps=1))


# ---- 8. output directories ----------------------------------------------------------------------------
def test_a_fresh_run_refuses_a_folder_with_another_runs_metrics(tmp_path, tiny_argv):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(ValueError, match=r"already holds another run's metrics.jsonl; pass --resume"):
        main(tiny_argv(tmp_path / "run", max_steps=1))
    # --resume without a checkpoint starts over: the old lines are dropped, not appended to
    main(tiny_argv(tmp_path / "run", max_steps=2, eval_every=2, resume=True))
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_resume_drops_a_torn_last_metrics_line_and_names_the_file_of_a_bad_one(tmp_path, tiny_argv, capsys):
    argv = tiny_argv(tmp_path / "run", scheduler="constant", max_steps=2, eval_every=2, save_every=2)
    main(argv)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 4.')  # killed mid-write
    main(tiny_argv(tmp_path / "run", scheduler="constant", max_steps=3, eval_every=3, resume=True))
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2, 3]
    assert "dropped the unfinished last line" in capsys.readouterr().err

    metrics.write_text('{"step": 1}\nnot json\n' + metrics.read_text())
    with pytest.raises(ValueError, match=r"metrics.jsonl' line 2 is not JSON"):
        main(tiny_argv(tmp_path / "run", scheduler="constant", max_steps=4, eval_every=4, resume=True))


def _hold_lock(out: Path, locked, release) -> None:
    """In a child process: take ``out``'s lock, say so, hold it until told to let go."""
    outdir.acquire(out)
    locked.set()
    release.wait(60)


def test_a_folder_in_use_by_a_live_run_is_refused_and_a_stale_lock_taken_over(tmp_path, tiny_argv, capsys):
    import multiprocessing
    import socket

    fork = multiprocessing.get_context("fork")
    locked, release = fork.Event(), fork.Event()
    holder = fork.Process(target=_hold_lock, args=(tmp_path / "run", locked, release))
    holder.start()
    assert locked.wait(60)
    lock = tmp_path / "run" / outdir.LOCK_NAME
    with pytest.raises(ValueError, match=rf"is in use by another run \(process {holder.pid} on "):
        main(tiny_argv(tmp_path / "run", max_steps=1))
    assert lock.exists()
    release.set()
    holder.join()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid} {socket.gethostname()}\n")  # what a killed run leaves
    main(tiny_argv(tmp_path / "run", max_steps=1, eval_every=1))
    assert f"left by process {dead.pid} on {socket.gethostname()}, which no longer holds it" in capsys.readouterr().err
    assert not lock.exists()


def _race_for_lock(out: Path, start, results, done) -> None:
    """In a child process: wait for the start signal, try to take ``out``, report, keep what was taken."""
    start.wait()
    try:
        outdir.acquire(out)
        results.put("acquired")
    except ValueError:
        results.put("refused")
    done.wait(60)  # still holding until every racer has tried


def test_of_runs_started_together_on_a_stale_lock_exactly_one_gets_the_folder(tmp_path):
    """Taking over a stale lock is atomic: 4 processes released together, 25 times over."""
    import multiprocessing
    import socket

    fork = multiprocessing.get_context("fork")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for trial in range(25):
        out = tmp_path / f"trial{trial}"
        out.mkdir()
        (out / outdir.LOCK_NAME).write_text(f"{dead.pid} {socket.gethostname()}\n")
        start, results, done = fork.Barrier(4), fork.Queue(), fork.Event()
        racers = [fork.Process(target=_race_for_lock, args=(out, start, results, done)) for _ in range(4)]
        for racer in racers:
            racer.start()
        outcomes = sorted(results.get(timeout=60) for _ in racers)
        done.set()
        for racer in racers:
            racer.join()
        assert outcomes == ["acquired", "refused", "refused", "refused"], f"trial {trial}: {outcomes}"


def test_a_run_never_overwrites_a_config_json_that_is_not_a_runs(tmp_path, tiny_argv):
    model_folder = tmp_path / "hf_model"
    model_folder.mkdir()
    foreign = (REPO / "configs" / "llama_tiny.json").read_text()
    (model_folder / "config.json").write_text(foreign)
    with pytest.raises(ValueError, match=r"holds a config.json that is not a training run's"):
        main(tiny_argv(model_folder, max_steps=1))
    assert (model_folder / "config.json").read_text() == foreign
    assert sorted(p.name for p in model_folder.iterdir()) == ["config.json"]


def test_an_empty_output_dir_is_refused_not_the_current_folder(tmp_path, tiny_argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^Invalid --output-dir: ''"):
        main(tiny_argv("", max_steps=1))
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_output_dir_is_one_line(tmp_path, tiny_argv):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"^--output-dir '.*file/run' is not writable \(.*\); choose a folder"):
        main(tiny_argv(tmp_path / "file" / "run", max_steps=1))


def test_a_read_only_output_dir_is_one_line(tmp_path, tiny_argv, monkeypatch):
    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outdir, "_flock", denied)
    with pytest.raises(ValueError, match=r"^--output-dir '.*run' is not writable \(Permission denied\)"):
        main(tiny_argv(tmp_path / "run", max_steps=1))
