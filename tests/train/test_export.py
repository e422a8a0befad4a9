"""``python -m train export`` (:mod:`train.export`) from a one-process checkpoint: the folder loads in
``transformers`` with the training model's logits (float32 and bfloat16, INT8 weights included, sharded or
not), carries a tokenizer that gives the run's ids, and bad sources or targets are refused in one line;
``python -m train eval`` (:mod:`train.evaluate`) of a checkpoint and of its export gives the run's last
val_loss. DDP and FSDP2 (DCP) sources: tests/train/test_distributed.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.export_checks import assert_loads_with_the_training_models_logits
from tests.helpers.tiny_run import REPO
from tests.helpers.tiny_run import tiny_argv as _tiny_argv
from train import distributed, main
from train.config import parse_args
from train.data import BYTE_EOS_TOKEN, ByteTokenizer
from train.loop import run
from train.metrics import read_jsonl


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Two tiny 3-step runs, float32 weights and INT8 weights: (output dir, model as trained)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    flags = {
        "fp32": ("adamw", {}),
        "int8": ("q_galore_adamw8bit", {"weight_bits": 8}),
    }
    trained = {}
    for name, (optimizer, more) in flags.items():
        argv = _tiny_argv(root / name, optimizer, max_steps=3, eval_every=3, **more)
        trained[name] = (root / name, run(parse_args(argv), distributed.setup()).model)
    return trained


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_loads_in_transformers_with_the_training_models_logits(runs, tmp_path, weights, dtype):
    out_dir, model = runs[weights]
    written = main(["export", "--checkpoint", str(out_dir), "--out", str(tmp_path / "hf"), "--dtype", dtype])
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(written)
    assert_loads_with_the_training_models_logits(tmp_path / "hf", model, getattr(torch, dtype))


def test_int8_weights_are_exported_dequantized_not_as_codes(runs, tmp_path):
    from safetensors.torch import load_file

    main(["export", "--checkpoint", str(runs["int8"][0]), "--out", str(tmp_path / "hf")])
    names = load_file(tmp_path / "hf" / "model.safetensors").keys()
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not [n for n in names if "codes" in n or "scale" in n or "zero" in n]


def test_a_model_past_the_shard_size_is_sharded_with_an_index(runs, tmp_path):
    out_dir, model = runs["fp32"]
    written = main(["export", "--checkpoint", str(out_dir), "--out", str(tmp_path / "hf"), "--max-shard-size", "100KB"])
    shards = [n for n in written if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors" not in written
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert_loads_with_the_training_models_logits(tmp_path / "hf", model, torch.float32)


def test_the_byte_tokenizer_is_written_as_an_hf_tokenizer_with_the_same_ids(runs, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    main(["export", "--checkpoint", str(runs["fp32"][0]), "--out", str(tmp_path / "hf")])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = f"plain ASCII, tabs\tand newlines\n, Grüße, 日本語, a NUL \x00 and {BYTE_EOS_TOKEN} as text"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == ByteTokenizer().encode(text).tolist()
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == ByteTokenizer.vocab_size and tokenizer.eos_token_id == ByteTokenizer.eos_token_id
    assert AutoConfig.from_pretrained(tmp_path / "hf").eos_token_id == ByteTokenizer.eos_token_id
    assert GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == ByteTokenizer.eos_token_id


def test_eval_of_a_checkpoint_and_of_its_export_is_the_runs_last_val_loss(runs, tmp_path):
    out_dir, _ = runs["int8"]
    last = read_jsonl(out_dir / "metrics.jsonl")[-1]
    from_checkpoint = main(["eval", "--model", str(out_dir)])
    assert from_checkpoint["val_loss"] == last["val_loss"] and from_checkpoint["val_ppl"] == last["val_ppl"]
    main(["export", "--checkpoint", str(out_dir), "--out", str(tmp_path / "hf")])
    settings = ["--seq-len=32", "--batch-size=4", "--eval-batches=2"]  # the run's; a folder has the defaults
    from_folder = main(["eval", "--model", str(tmp_path / "hf"), *settings])
    assert from_folder["val_loss"] == last["val_loss"]
    assert from_folder["tokenizer"] == str(tmp_path / "hf")  # the folder's own tokenizer, the same ids


def test_an_existing_non_empty_out_is_refused_without_overwrite_and_replaced_with_it(runs, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    argv = ["export", "--checkpoint", str(runs["fp32"][0]), "--out", str(out)]
    with pytest.raises(ValueError, match=r"--out .* exists and is not empty \(allowed: --overwrite"):
        main(argv)
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
    main([*argv, "--overwrite"])
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match=r"--checkpoint .*notes' is not a checkpoint \(allowed: a step_\*\.pt"):
        main(["export", "--checkpoint", str(tmp_path / "notes"), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_a_corrupt_checkpoint_is_refused_in_one_line_by_the_command(runs, tmp_path):
    good = next((runs["fp32"][0] / "checkpoints").glob("step_*.pt"))
    bad = tmp_path / good.name
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    (tmp_path / (good.name + ".sha256")).write_text((good.parent / (good.name + ".sha256")).read_text())
    done = subprocess.run(
        [sys.executable, "-m", "train", "export", "--checkpoint", str(bad), "--out", str(tmp_path / "hf")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "is corrupt: its contents do not match the SHA-256" in done.stderr
    assert not (tmp_path / "hf").exists()


def test_a_dcp_folder_needs_its_model_config_and_a_truncated_one_is_refused(runs, tmp_path):
    import torch.distributed.checkpoint as dcp

    _, model = runs["fp32"]
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    argv = ["export", "--checkpoint", str(tmp_path / "dcp"), "--out", str(tmp_path / "hf")]
    with pytest.raises(ValueError, match=r"is a DCP folder, which holds no model config: pass --model-config"):
        main(argv)
    argv += ["--model-config", str(REPO / "configs" / "llama_tiny.json")]
    main(argv)
    assert_loads_with_the_training_models_logits(tmp_path / "hf", model, torch.float32)
    (shard,) = (tmp_path / "dcp").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"--checkpoint .*dcp': DCP could not read it"):
        main([*argv[:4], str(tmp_path / "hf2"), *argv[5:]])
