"""The model: HF ``transformers``' LlamaForCausalLM built from a config JSON in ``configs/``.

Built from the config (never ``from_pretrained``), with the seed set first so every rank and
every run with that seed starts from the same weights. The weights are created directly in the
training dtype on the training device: a 7B model in bf16 never exists in fp32 first.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_model_config(path: str) -> dict[str, Any]:
    """The config JSON at ``path``; ValueError when it is missing or not a LLaMA config."""
    file = Path(path)
    if not file.is_file():
        shipped = ", ".join(sorted(str(p) for p in Path("configs").glob("llama_*.json"))) or "configs/llama_*.json"
        raise ValueError(f"--model-config {path!r} is not a file (shipped configs: {shipped})")
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--model-config {path!r} is not readable JSON: {err}") from err
    if not isinstance(config, dict) or config.get("model_type") != "llama":
        raise ValueError(f"--model-config {path!r} is not a LLaMA config (expected \"model_type\": \"llama\")")
    return config


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    config_path: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    vocab_needed: int,
    seq_len: int,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """A freshly initialised LlamaForCausalLM in ``dtype`` on ``device``.

    ``vocab_needed`` (the tokenizer's size) and ``seq_len`` are checked against the config.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = load_model_config(config_path)
    config = LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    if vocab_needed > config.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_needed} ids but {config_path} has vocab_size {config.vocab_size}; "
                         "use a config with a larger vocab_size or a smaller --tokenizer")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds max_position_embeddings {config.max_position_embeddings} "
                         f"of {config_path}")
    config.use_cache = False  # training never reuses keys/values; the cache would only hold memory
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    if activation_checkpointing:
        # non-reentrant checkpointing works with DDP, FSDP2 and gradient hooks (layer-wise updates);
        # transformers renamed the method (the older name warns from 5.2x on, older 5.x lack the new)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def quantize_weights(model: nn.Module, target_modules: str | list[str]) -> nn.Module:
    """INT8 weights (Q-GaLore) in the linear layers ``target_modules`` selects, in place
    (:mod:`lowmem_optim.quant.int8_linear`: codes + per-group scale and zero, group size 256).
    Their updates are applied by the optimizer through ``apply_update``, so only this
    package's optimizers can train them (checked when the optimizer is built)."""
    from lowmem_optim.quant.int8_linear import quantize_linear_layers

    return quantize_linear_layers(model, target_modules=target_modules, group_size=256)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
