"""What an exported folder must satisfy, shared by the export tests of every source."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

#: a batch of byte-tokenizer ids (0-256), the same in every test
BATCH = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=BATCH).logits


def assert_loads_with_the_training_models_logits(folder: Path, trained: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder)`` (no network) loads in ``dtype`` and gives
    exactly the logits of ``trained`` with its weights rounded to ``dtype`` (INT8 layers: their
    compute dtype, which the forward dequantizes to), i.e. of the training model built in ``dtype``."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    reference = copy.deepcopy(trained).to(dtype)
    # a model built in bfloat16 keeps its rotary frequencies in float32, as transformers loads them
    reference.model.rotary_emb = copy.deepcopy(trained.model.rotary_emb)
    assert torch.equal(logits(loaded), logits(reference))
    return loaded
