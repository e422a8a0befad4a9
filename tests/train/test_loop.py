"""The training loop (:mod:`train.loop`) through the CLI: every registered optimizer trains, the
output files are well-formed, bad input gives a clear error, INT8 weights, wandb offline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_optim import available_optimizers
from lowmem_optim.registry import LOWRANK_OPTIMIZERS
from train import checkpoint
from train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
STEP_KEYS = {"step", "loss", "lr", "tokens_per_s", "peak_mem_bytes", "opt_state_bytes", "matrix_state_bytes"}


@pytest.mark.parametrize("optimizer", available_optimizers())
def test_every_registered_optimizer_lowers_the_loss_and_writes_wellformed_metrics(run_tiny, tmp_path, optimizer):
    records = run_tiny("run", optimizer)
    assert records[-1]["loss"] < records[0]["loss"] - 0.2, [r["loss"] for r in records]

    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert lines == json.loads(json.dumps(records))
    assert [r["step"] for r in lines] == list(range(1, 9))
    for r in lines:
        assert STEP_KEYS <= r.keys()
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in STEP_KEYS)
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 and r["opt_state_bytes"] > 0
        assert ("val_loss" in r) == (r["step"] in (4, 8))
        if "val_loss" in r:
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert lines[-1]["val_loss"] < lines[3]["val_loss"]

    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["optimizer"] == optimizer and config["max_steps"] == 8 and config["world_size"] == 1
    if optimizer in LOWRANK_OPTIMIZERS:  # the point of the low-rank state: below AdamW's two fp32 moments
        assert lines[-1]["opt_state_bytes"] < 8 * config["n_params"]


def test_adamw_state_bytes_are_its_two_moments_and_step_counters(run_tiny, tmp_path):
    records = run_tiny("run", "adamw", max_steps=1, eval_every=1)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    n_tensors = 2 + 1 + config["model"]["num_hidden_layers"] * 9  # embed, head, norm; 7 linears + 2 norms a layer
    assert records[-1]["opt_state_bytes"] == 8 * config["n_params"] + 4 * n_tensors
    # the selected matrices: 7 linear layers a decoder layer, their moments and step counters
    n_matrices = config["model"]["num_hidden_layers"] * 7
    assert config["matrix_params"] < config["n_params"]
    assert records[-1]["matrix_state_bytes"] == 8 * config["matrix_params"] + 4 * n_matrices


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"model-config": "configs/llama_nope.json"}, "--model-config 'configs/llama_nope.json' is not a file"),
        ({"optimizer": "sgdx"}, "Invalid --optimizer: 'sgdx' (allowed: adamw"),
        (
            {"optimizer": "galore_adamw", "rank": 64},
            "Invalid --rank: 64 is >= min(rows, cols) of every low-rank matrix",
        ),
        ({"optimizer": "galore_adamw", "rank": None}, "--rank is required for --optimizer galore_adamw"),
        ({"data": "/nonexistent/corpus"}, "--data '/nonexistent/corpus' does not exist"),
        ({"total-batch-size": 6}, "Invalid --total-batch-size: 6 (allowed: a multiple of --batch-size"),
        ({"seq-len": 512}, "--seq-len 512 exceeds max_position_embeddings 256"),
        ({"dtype": "float8"}, "Invalid --dtype: 'float8' (allowed: float32"),
        ({"weight-bits": 8}, "--weight-bits 8: --optimizer adamw writes into its parameters and cannot update INT8"),
        (
            {"parallel": "fsdp", "layerwise": True},
            "--layerwise with --parallel fsdp is not supported (allowed: --parallel ddp",
        ),
        (
            {"parallel": "fsdp", "weight-bits": 8},
            "--weight-bits 8 with --parallel fsdp is not supported (allowed: --parallel",
        ),
    ],
)
def test_bad_input_names_the_flag_and_what_is_allowed(tmp_path, tiny_argv, flags, message):
    from train import main

    with pytest.raises(ValueError) as err:
        main(tiny_argv(tmp_path / "run", **flags))
    assert message in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_module_entry_point_exits_2_with_one_error_line(tmp_path, tiny_argv):
    result = subprocess.run(
        [sys.executable, "-m", "train", *tiny_argv(tmp_path / "run", optimizer="nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: Invalid --optimizer: 'nope'")
    assert not Path(tmp_path / "run").exists()


def test_int8_weights_train_layerwise_and_are_saved_as_codes(run_tiny, tmp_path):
    records = run_tiny("run", "galore_adamw8bit", weight_bits=8, layerwise=True, max_steps=6, eval_every=6)
    assert records[-1]["loss"] < records[0]["loss"] - 0.2
    saved = checkpoint.load(checkpoint.latest(tmp_path / "run"))["model"]
    assert saved["model.layers.0.mlp.up_proj.weight_codes"].dtype == torch.uint8
    assert "model.layers.0.mlp.up_proj.weight" not in saved and "lm_head.weight" in saved


def test_wandb_without_an_api_key_logs_offline_with_config_and_layer_statistics(
    run_tiny, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_tiny("run", "galore_adamw", wandb="online", max_steps=2, eval_every=2)
    assert "no WANDB_API_KEY, logging offline" in capsys.readouterr().err
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()
    for key in (b"update_proj_gap", b"val_loss", b"opt_state_bytes", b"layers/model.layers.0.mlp.up_proj.weight/gap"):
        assert key in data


@pytest.mark.parametrize(
    ("buffer", "stored_as"), [("float32", (torch.float32,)), ("8bit", (torch.uint8, torch.float32))]
)  # 8bit: the codes and a float32 scale per block
def test_layerwise_accumulation_sums_projected_gradients_in_buffers(run_tiny, monkeypatch, buffer, stored_as):
    """--layerwise with 2 micro-batches per step: the handle accumulates in low-rank buffers of
    --accumulation-buffer's precision (and the run trains)."""
    from lowmem_optim import layerwise

    handles = []
    remove = layerwise.LayerwiseHandle.remove

    def record_and_remove(handle):  # the loop removes its handle at the end, which frees the buffers
        handles.append(
            (handle, handle.buffer_bytes(), {tuple(t.dtype for t in b.tensors) for b in handle.buffers.values()})
        )
        remove(handle)

    monkeypatch.setattr(layerwise.LayerwiseHandle, "remove", record_and_remove)
    records = run_tiny(
        "run", "galore_adamw", layerwise=True, total_batch_size=8, accumulation_buffer=buffer, max_steps=6, save=False
    )
    ((handle, buffer_bytes, dtypes),) = handles
    assert handle.lowrank and handle.accumulation_steps == 2 and handle.accumulation_buffer == buffer
    assert buffer_bytes > 0 and dtypes == {stored_as}
    assert records[-1]["loss"] < records[0]["loss"] - 0.2


def test_layerwise_accumulation_refuses_error_feedback_naming_the_flags(run_tiny):
    with pytest.raises(ValueError, match="--error-feedback float32 with --layerwise .* --accumulation-buffer full"):
        run_tiny("run", "dct_adamw", layerwise=True, total_batch_size=8, error_feedback="float32", max_steps=1)
