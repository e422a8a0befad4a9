"""The training and memory command lines read model configs and ``--target-modules`` alike,
refuse the same setups, and report bad input in one line naming the flag or file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lowmem_optim.tools.cli import main as memory_main
from train import main as train_main

REPO = Path(__file__).resolve().parents[2]
TINY = json.loads((REPO / "configs" / "llama_tiny.json").read_text())


def _memory(*flags: str, config: str | Path = REPO / "configs" / "llama_tiny.json", optimizer: str = "galore_adamw"):
    return memory_main(
        [
            "memory",
            "--model-config",
            str(config),
            "--optimizer",
            optimizer,
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            *flags,
        ]
    )


def _write(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "model.json"
    path.write_text(json.dumps({k: v for k, v in {**TINY, **changes}.items() if v is not None}))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {
                k: None
                for k in (
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "vocab_size",
                    "max_position_embeddings",
                    "num_key_value_heads",
                )
            },
            "lacks intermediate_size, num_hidden_layers, num_attention_heads, vocab_size, "
            "max_position_embeddings (required",
        ),
        ({"hidden_size": -64}, ": hidden_size is -64 (allowed: an int >= 1)"),
        (
            {"hidden_size": 60, "num_attention_heads": 7, "num_key_value_heads": 7},
            ": hidden_size 60 does not split into num_attention_heads 7 heads",
        ),
        ({"hidden_size": 60, "num_attention_heads": 4}, ": the head size is 15, odd"),
        ({"num_key_value_heads": 3}, ": num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ],
)
def test_both_clis_refuse_an_incomplete_or_impossible_model_config_naming_file_and_key(
    tmp_path, tiny_argv, capsys, changes, message
):
    path = _write(tmp_path, **changes)
    with pytest.raises(ValueError) as err:
        train_main(tiny_argv(tmp_path / "run", model_config=path))
    assert str(err.value).startswith(f"--model-config {str(path)!r}") and message in str(err.value)
    assert "\n" not in str(err.value)
    assert _memory(config=path) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_key_transformers_rejects_is_one_line_naming_the_file(tmp_path, tiny_argv):
    path = _write(tmp_path, rope_scaling={"rope_type": "no-such-scaling"})
    with pytest.raises(ValueError, match=rf"^--model-config '{path}' is rejected by transformers' LLaMA model"):
        train_main(tiny_argv(tmp_path / "run", model_config=path))


@pytest.mark.parametrize("spec", ["self_attn", "re:.*attn.*", "q_proj,v_proj", "all-linear"])
def test_both_clis_accept_the_same_target_modules(tmp_path, run_tiny, spec):
    assert _memory("--rank", "8", "--target-modules", spec) == 0
    run_tiny("run", "galore_adamw", target_modules=spec, max_steps=1, eval_every=1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (".*attn.*", "Invalid --target-modules: '.*attn.*'; a regular expression is written re:.*attn.*"),
        ("re:([", "Invalid --target-modules: 're:([' is not a valid regular expression"),
        (",", "Invalid --target-modules: ','"),
    ],
)
def test_both_clis_refuse_the_same_target_modules(tmp_path, tiny_argv, capsys, spec, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        train_main(tiny_argv(tmp_path / "run", "galore_adamw", target_modules=spec))
    assert _memory("--rank", "8", "--target-modules", spec) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "optimizer", "message"),
    [
        (("--seq-len", "512"), "galore_adamw", "--seq-len 512 exceeds max_position_embeddings 256"),
        (("--rank", "64"), "galore_adamw", "Invalid --rank: 64 is >= min(rows, cols) of every low-rank matrix"),
        (("--weight-bits", "8"), "adamw", "--weight-bits 8: --optimizer adamw writes into its parameters"),
    ],
)
def test_the_memory_cli_refuses_what_training_refuses(tmp_path, tiny_argv, capsys, flags, optimizer, message):
    argv = dict(zip((f.lstrip("-") for f in flags[::2]), flags[1::2]))
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        train_main(tiny_argv(tmp_path / "run", optimizer, **argv))
    rank = () if "--rank" in flags or optimizer == "adamw" else ("--rank", "8")
    assert _memory(*flags, *rank, optimizer=optimizer) == 2
    assert message in capsys.readouterr().err


def test_both_help_texts_document_the_target_modules_syntax(capsys):
    from train.config import build_parser

    with pytest.raises(SystemExit):
        memory_main(["memory", "--help"])
    memory_help = " ".join(capsys.readouterr().out.split())
    train_help = " ".join(build_parser().format_help().split())
    for text in (memory_help, train_help):
        assert "re:<regex> (a full match of module names" in text and "separated name fragments" in text


def test_a_tokenizer_that_cannot_be_loaded_is_one_line(tmp_path, tiny_argv, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait
    with pytest.raises(ValueError) as err:
        train_main(tiny_argv(tmp_path / "run", tokenizer="nosuch/tok"))
    assert str(err.value).startswith("--tokenizer 'nosuch/tok' could not be loaded (") and "\n" not in str(err.value)


def test_a_jsonl_text_that_is_not_a_string_is_one_line(tmp_path, tiny_argv):
    (tmp_path / "data.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"data.jsonl' line 2: 'text' is int '5' \(allowed: a string\)"):
        train_main(tiny_argv(tmp_path / "run", data=tmp_path / "data.jsonl"))


def test_memory_model_chunks_the_loss_as_training_does_by_default():
    from lowmem_optim.tools.cli import _parser
    from lowmem_optim.tools.memory import TrainingSetup
    from train.config import TrainConfig

    trained = TrainConfig(model_config="configs/llama_tiny.json").loss_chunk_tokens
    memory = _parser().parse_args(
        ["memory", "--model-config", "x", "--optimizer", "adamw", "--batch-size", "1", "--seq-len", "1"]
    )
    assert trained == TrainingSetup.loss_chunk_tokens == memory.loss_chunk_tokens > 0
