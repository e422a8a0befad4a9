"""Two CPU processes on gloo (torchrun), the loss computed in chunks: DDP keeps ranks identical
(INT8 weights included) and matches one process on the same global batch; FSDP2 trains every
optimizer of the registry but bitsandbytes' (refused with a clear error), GaLore under FSDP2
equals GaLore under DDP, and a Q-GaLore run resumes exactly from its gathered checkpoint. The
runs' checkpoints and an FSDP2 model's DCP folder export to Hugging Face with their logits."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_optim import available_optimizers
from lowmem_optim.groups import parse_target_modules
from tests.helpers.export_checks import assert_loads_with_the_training_models_logits
from train import checkpoint, distributed, main, outdir
from train.metrics import read_jsonl
from train.model import build_model, quantize_weights

REPO = Path(__file__).resolve().parents[2]
BASE = [
    "--model-config=configs/llama_tiny.json",
    "--lr=0.01",
    "--batch-size=2",
    "--seq-len=32",
    "--max-steps=4",
    "--eval-every=2",
    "--eval-batches=1",
    "--progress=False",
    "--loss-chunk-tokens=16",  # 2 x 32 tokens per rank: the loss in 4 chunks under DDP and FSDP2
]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            # the rendezvous store binds a port the kernel picks and keeps it: a port probed free
            # here could be taken by another test worker's gloo connection before torchrun binds it
            "--standalone",
            str(REPO / "tests" / "train" / "ddp_worker.py"),
            str(out),
            *BASE,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", ["preempted", "preempted_fsdp"])
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_rank0_saves_it(two_ranks, name):
    """DDP, and FSDP2 (every rank takes part in gathering the checkpoint that rank 0 writes)."""
    saved = two_ranks / name / "checkpoints" / "step_00000002.pt"
    said = [(two_ranks / f"{name}_rank{rank}.txt").read_text() for rank in range(2)]
    assert said == [
        f"preempted by a stop signal sent to another rank after step 2: saved {str(saved)!r}; "
        "continue the run with --resume",
        f"preempted by SIGTERM after step 2: saved {str(saved)!r}; continue the run with --resume",
    ]
    assert [p.name for p in checkpoint.saved(two_ranks / name)] == [saved.name]
    assert not (two_ranks / name / outdir.LOCK_NAME).exists()


def test_ddp_ranks_end_with_identical_parameters(two_ranks):
    rank0, rank1 = _load(two_ranks / "ddp_rank0.pt"), _load(two_ranks / "ddp_rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    fresh = build_model(
        str(REPO / "configs" / "llama_tiny.json"),
        dtype=torch.float32,
        device=torch.device("cpu"),
        seed=0,
        vocab_needed=257,
        seq_len=32,
    ).state_dict()
    assert all(not torch.equal(fresh[k], rank0[k]) for k in rank0 if k.endswith("proj.weight"))  # they trained


def test_ddp_matches_one_process_on_the_same_global_batch(two_ranks):
    one = main(
        BASE
        + [
            "--optimizer=galore_adamw",
            "--rank=8",
            "--update-proj-gap=2",
            "--batch-size=4",
            f"--output-dir={two_ranks / 'single'}",
        ]
    )
    ddp = read_jsonl(two_ranks / "ddp" / "metrics.jsonl")
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert ddp[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-5)
    single = checkpoint.load(checkpoint.latest(two_ranks / "single"))["model"]
    rank0 = _load(two_ranks / "ddp_rank0.pt")
    assert all(torch.allclose(single[k], rank0[k], atol=1e-5) for k in rank0)


def test_ddp_keeps_int8_weight_codes_identical_across_ranks(two_ranks):
    rank0, rank1 = _load(two_ranks / "ddp_int8_rank0.pt"), _load(two_ranks / "ddp_int8_rank1.pt")
    codes = [k for k in rank0 if k.endswith("weight_codes")]
    assert codes and all(rank0[k].dtype == torch.uint8 for k in codes)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    records = read_jsonl(two_ranks / "ddp_int8" / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]


def test_fsdp2_trains_q_galore_with_ranks_agreeing(two_ranks):
    rank0, rank1 = _load(two_ranks / "fsdp_rank0.pt"), _load(two_ranks / "fsdp_rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    records = read_jsonl(two_ranks / "fsdp" / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]
    saved = checkpoint.load(checkpoint.latest(two_ranks / "fsdp"))  # gathered whole on rank 0
    assert all(torch.equal(saved["model"][k], rank0[k]) for k in rank0)
    assert any(k.endswith("exp_avg_sq_codes") for s in saved["optimizer"]["state"].values() for k in s)


def test_fsdp2_resumes_from_a_gathered_checkpoint_exactly(two_ranks):
    full, resumed = (
        read_jsonl(two_ranks / "fsdp" / "metrics.jsonl"),
        read_jsonl(two_ranks / "fsdp_cut" / "metrics.jsonl"),
    )
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in full]
    for rank in (0, 1):
        a, b = _load(two_ranks / f"fsdp_rank{rank}.pt"), _load(two_ranks / f"fsdp_resumed_rank{rank}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)


def _fsdp_outcomes(two_ranks: Path) -> dict[str, dict]:
    import json

    return json.loads((two_ranks / "fsdp_optimizers_rank0.json").read_text())


@pytest.mark.parametrize("name", [n for n in available_optimizers() if n != "adamw8bit"])
def test_fsdp2_trains_every_optimizer(two_ranks, name):
    outcome = _fsdp_outcomes(two_ranks)[name]
    assert "refused" not in outcome, outcome["refused"]
    losses = outcome["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_fsdp2_galore_equals_ddp_on_the_same_global_batch(two_ranks):
    fsdp, ddp = _fsdp_outcomes(two_ranks)["galore_adamw"], read_jsonl(two_ranks / "ddp" / "metrics.jsonl")
    assert fsdp["losses"] == pytest.approx([r["loss"] for r in ddp], rel=1e-5)
    sharded, replicated = _load(two_ranks / "fsdp_galore_adamw_rank0.pt"), _load(two_ranks / "ddp_rank0.pt")
    assert all(torch.allclose(sharded[k], replicated[k], atol=1e-5) for k in replicated)


def test_fsdp2_refuses_bitsandbytes_with_a_clear_error(two_ranks):
    message = _fsdp_outcomes(two_ranks)["adamw8bit"]["refused"]
    assert message.startswith("--parallel fsdp: --optimizer adamw8bit cannot take FSDP2-sharded parameters")
    assert "(allowed: --parallel ddp, or an optimizer of lowmem_optim)" in message


def _model_holding(state: dict[str, torch.Tensor], int8: bool) -> torch.nn.Module:
    model = build_model(
        str(REPO / "configs" / "llama_tiny.json"),
        dtype=torch.float32,
        device=torch.device("cpu"),
        seed=1,  # other weights than the runs': the state must replace them all
        vocab_needed=257,
        seq_len=32,
    )
    if int8:
        quantize_weights(model, parse_target_modules("all-linear"))
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("source", ["ddp", "ddp_int8", "fsdp", "fsdp_dcp"])
def test_export_of_a_two_process_run_loads_in_transformers_with_its_logits(two_ranks, tmp_path, source):
    # ddp, ddp_int8, fsdp: the run's --output-dir (the loop's checkpoint, whole tensors); fsdp_dcp: the
    # FSDP2 model's DCP folder, each rank's rows in its own file
    argv = ["export", "--checkpoint", str(two_ranks / source), "--out", str(tmp_path / "hf")]
    if source == "fsdp_dcp":
        assert len(list((two_ranks / source).glob("*.distcp"))) == 2  # one file of rows per rank
        argv += ["--model-config", str(REPO / "configs" / "llama_tiny.json"), "--tokenizer", "bytes"]
    main(argv)
    held = _load(two_ranks / f"{source.removesuffix('_dcp')}_rank0.pt")  # what rank 0 held at the end
    trained = _model_holding(held, int8=source == "ddp_int8")
    assert_loads_with_the_training_models_logits(tmp_path / "hf", trained, torch.float32)


def test_teardown_meets_at_a_barrier_after_a_finished_run_and_not_after_a_failure(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    d = distributed.Dist(rank=0, world=2, local_rank=0, device=torch.device("cpu"), owns_group=True)
    distributed.teardown(d, finished=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.teardown(d, finished=False)  # a peer that failed would never reach a barrier
    assert calls == ["destroy"]
    calls.clear()
    distributed.teardown(distributed.Dist(0, 2, 0, torch.device("cpu"), owns_group=False))
    assert calls == []  # a group this run did not create is left to its owner
