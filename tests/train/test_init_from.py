"""``--init-from DIR``: a save_pretrained folder's weights, config and tokenizer start a run (INT8 weights
quantized from them), the export of such a run round-trips, and a --model-config or --seq-len that
contradicts the folder is refused naming both values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_optim.quant.int8_linear import quantize_linear_layers
from tests.helpers.tiny_run import REPO
from tests.helpers.tiny_run import tiny_argv as _tiny_argv
from train import main
from train.data import BYTE_EOS_TOKEN, ByteTokenizer, build_data
from train.model import INT8_GROUP_SIZE


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """An export of a tiny 3-step run: a save_pretrained folder with the byte tokenizer."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pretrained")
    main(_tiny_argv(root / "run", max_steps=3, eval_every=3))
    main(["export", "--checkpoint", str(root / "run"), "--out", str(root / "hf")])
    return root / "hf"


def _from(pretrained: Path, out: Path, optimizer: str = "adamw", **flags) -> list[dict]:
    argv = _tiny_argv(out, optimizer, max_steps=1, eval_every=1, init_from=pretrained, **flags)
    return main([a for a in argv if not a.startswith("--model-config=")])


@pytest.mark.parametrize("optimizer", ["adamw", "galore_adamw"])
def test_a_run_started_from_a_folder_exports_back_to_the_same_model(pretrained, tmp_path, optimizer):
    from transformers import AutoTokenizer

    _from(pretrained, tmp_path / "run", optimizer, lr=0.0)  # a step that moves nothing
    out = tmp_path / "hf"
    main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    before, after = load_file(pretrained / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads(
        (pretrained / "config.json").read_text()
    )
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (pretrained / "tokenizer.json").read_bytes()
    text = f"the same ids, {BYTE_EOS_TOKEN} included"
    ids = [AutoTokenizer.from_pretrained(f, local_files_only=True)(text)["input_ids"] for f in (pretrained, out)]
    assert ids[0] == ids[1] == ByteTokenizer().encode(text).tolist()
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config["tokenizer"] == str(pretrained)  # the folder's own tokenizer...
    assert main(["eval", "--model", str(tmp_path / "run")])["tokenizer"] == str(pretrained)  # ...also after it


def test_int8_weights_are_quantized_from_the_folders_weights(pretrained, tmp_path):
    from transformers import AutoModelForCausalLM

    records = _from(pretrained, tmp_path / "run", "q_galore_adamw8bit", weight_bits=8)
    reference = quantize_linear_layers(
        AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True), group_size=INT8_GROUP_SIZE
    )
    data = build_data("builtin", str(pretrained), 32, 4, seed=0, val_fraction=0.05, eval_batches=2)
    batch = data.train.next_batch()
    with torch.no_grad():
        first_loss = reference(input_ids=batch, labels=batch).loss.item()
    assert records[0]["loss"] == first_loss  # step 1's loss: before any update


def test_a_matching_model_config_is_accepted(pretrained, tmp_path):
    # the token ids differ (the folder's are its tokenizer's): they are not the model's shape
    records = main(_tiny_argv(tmp_path / "run", max_steps=1, eval_every=1, init_from=pretrained))
    assert len(records) == 1


def test_a_model_config_that_contradicts_the_folder_is_refused_naming_both_values(pretrained, tmp_path):
    small = REPO / "configs" / "llama_small.json"
    other = json.loads(small.read_text())["hidden_size"]
    argv = _tiny_argv(tmp_path / "run", max_steps=1, init_from=pretrained, model_config=small)
    with pytest.raises(ValueError, match=rf"--init-from .* has hidden_size 64 but --model-config .* has {other}"):
        main(argv)


def test_a_seq_len_past_the_folders_positions_is_refused_naming_both_values(pretrained, tmp_path):
    argv = _tiny_argv(tmp_path / "run", max_steps=1, init_from=pretrained, seq_len=512)
    with pytest.raises(ValueError, match=r"--seq-len 512 exceeds max_position_embeddings 256 of .*config\.json"):
        main([a for a in argv if not a.startswith("--model-config=")])
