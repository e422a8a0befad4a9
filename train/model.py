"""The model: HF ``transformers``' LlamaForCausalLM built from a config JSON in ``configs/``,
with the chunked loss of :mod:`train.loss`.

Built from the config, with the seed set first so every rank and every run with that seed
starts from the same weights; or, with ``--init-from``, loaded by ``from_pretrained`` from a
``save_pretrained`` folder whose config it is built from. The weights are created directly in the
training dtype on the training device: a 7B model in bf16 never exists in fp32 first.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from lowmem_optim.groups import parse_target_modules
from lowmem_optim.tools.llama_config import check_seq_len, load_llama_config
from train.loss import CHUNK_TOKENS, chunked_causal_lm_loss

if TYPE_CHECKING:
    from train.config import TrainConfig


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class LlamaWithChunkedLoss(LlamaForCausalLM):
    """HF's ``LlamaForCausalLM`` (same parameters, state dict and config) whose
    ``forward(input_ids=..., labels=...)`` computes the loss with :func:`chunked_causal_lm_loss`
    when the micro-batch has more than ``loss_chunk_tokens`` tokens; its output then has no
    logits. Any other call (no labels, ``loss_chunk_tokens`` 0, more arguments such as an
    attention mask) is HF's forward. Going through ``forward`` keeps DDP's and FSDP2's hooks."""

    def __init__(self, config: LlamaConfig, loss_chunk_tokens: int = CHUNK_TOKENS) -> None:
        super().__init__(config)
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, input_ids=None, labels=None, **kwargs):
        chunked = labels is not None and input_ids is not None and not kwargs
        if not (chunked and 0 < self.loss_chunk_tokens < labels.numel()):
            return super().forward(input_ids=input_ids, labels=labels, **kwargs)
        hidden = self.model(input_ids=input_ids).last_hidden_state
        return CausalLMOutputWithPast(loss=chunked_causal_lm_loss(hidden, self.lm_head, labels, self.loss_chunk_tokens))


def build_model(
    config_path: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    vocab_needed: int,
    seq_len: int,
    activation_checkpointing: bool = False,
    loss_chunk_tokens: int = CHUNK_TOKENS,
    init_from: str | None = None,
) -> nn.Module:
    """A freshly initialised LlamaForCausalLM in ``dtype`` on ``device``, or with the weights of
    the ``save_pretrained`` folder ``init_from`` (loaded by ``transformers``, every weight
    required) when given.

    The config is read by :func:`lowmem_optim.tools.llama_config.load_llama_config`; ``vocab_needed``
    (the tokenizer's size) and ``seq_len`` are checked against it, and whatever else
    ``transformers`` rejects is a one-line ValueError naming the file. Its loss is computed in
    chunks of ``loss_chunk_tokens`` tokens (:mod:`train.loss`; 0: HF's loss over the whole
    micro-batch).
    """
    if loss_chunk_tokens < 0:
        raise ValueError(f"Invalid loss_chunk_tokens: {loss_chunk_tokens!r} (allowed: an int >= 0)")
    raw = load_llama_config(config_path)
    check_seq_len(raw, seq_len, config_path)
    if vocab_needed > raw["vocab_size"]:
        raise ValueError(
            f"the tokenizer has {vocab_needed} ids but {config_path} has vocab_size {raw['vocab_size']}; "
            "use a config with a larger vocab_size or a smaller --tokenizer"
        )
    try:
        config = LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
        config.use_cache = False  # training never reuses keys/values; the cache would only hold memory
        torch.manual_seed(seed)
        if init_from is None:
            with _default_dtype(dtype), torch.device(device):
                model = LlamaWithChunkedLoss(config, loss_chunk_tokens)
    except (TypeError, ValueError, KeyError, AttributeError) as err:  # a key transformers does not accept
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--model-config {config_path!r} is rejected by transformers' LLaMA model ({type(err).__name__}: {first})"
        ) from err
    if init_from is not None:
        model = _load_pretrained(init_from, config, dtype, loss_chunk_tokens).to(device)
    if activation_checkpointing:
        # non-reentrant checkpointing works with DDP, FSDP2 and gradient hooks (layer-wise updates);
        # transformers renamed the method (the older name warns from 5.2x on, older 5.x lack the new)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _load_pretrained(folder: str, config: LlamaConfig, dtype: torch.dtype, loss_chunk_tokens: int) -> nn.Module:
    try:
        model, info = LlamaWithChunkedLoss.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            loss_chunk_tokens=loss_chunk_tokens,
            local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError) as err:  # no weights file, unreadable safetensors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--init-from {folder!r}: transformers could not load its weights ({first})") from err
    problems = [f"{kind} {sorted(info[kind])[:3]}" for kind in ("missing_keys", "unexpected_keys") if info[kind]]
    if problems or info["mismatched_keys"]:
        raise ValueError(
            f"--init-from {folder!r} holds other weights than its config.json describes "
            f"({'; '.join(problems) or 'mismatched shapes'})"
        )
    return model


#: keys of a model config that belong to the tokenizer, not the model's shape
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def pretrained_config(folder: str, model_config: str | None) -> str:
    """The config.json of the ``save_pretrained`` folder ``folder`` (``--init-from``), after
    checking that ``model_config`` (``--model-config``, if given) says nothing else: every key
    it sets but the token ids (the tokenizer's) must have the folder's value. ValueError naming
    both values otherwise."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"--init-from {folder!r} has no config.json (allowed: a local save_pretrained LLaMA folder)")
    own = load_llama_config(path, flag="--init-from")
    if model_config:
        filled = LlamaConfig.from_dict(own).to_dict()
        given = load_llama_config(model_config)
        for key in sorted(set(given) - {"model_type", *TOKEN_ID_KEYS}):
            theirs = own.get(key, filled.get(key, "(unset)"))
            if theirs != given[key]:
                raise ValueError(
                    f"--init-from {folder!r} has {key} {theirs!r} but --model-config {model_config!r} has "
                    f"{given[key]!r} (allowed: a matching --model-config, or none: the folder's config is used)"
                )
    return str(path)


#: values per scale and zero point of the INT8 weights (Q-GaLore's group size)
INT8_GROUP_SIZE = 256


def quantize_weights(model: nn.Module, target_modules: str | list[str]) -> nn.Module:
    """INT8 weights (Q-GaLore) in the linear layers ``target_modules`` selects, in place
    (:mod:`lowmem_optim.quant.int8_linear`: codes + per-group scale and zero, groups of
    :data:`INT8_GROUP_SIZE`).
    Their updates are applied by the optimizer through ``apply_update``, so only this
    package's optimizers can train them (checked when the optimizer is built)."""
    from lowmem_optim.quant.int8_linear import quantize_linear_layers

    return quantize_linear_layers(model, target_modules=target_modules, group_size=INT8_GROUP_SIZE)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_model(cfg: TrainConfig, device: torch.device, vocab_needed: int, config_path: str | None = None) -> nn.Module:
    """The model as ``python -m train`` builds it from ``cfg`` (from ``--init-from``'s weights where
    given; INT8 weights with ``--weight-bits 8``, quantized from those), not yet wrapped.
    ``config_path``: the config read (``--init-from``'s own where given; default ``--model-config``)."""
    model = build_model(
        config_path or cfg.model_config,
        dtype=getattr(torch, cfg.torch_dtype_name),
        device=device,
        seed=cfg.seed,
        vocab_needed=vocab_needed,
        seq_len=cfg.seq_len,
        activation_checkpointing=cfg.activation_checkpointing,
        loss_chunk_tokens=cfg.loss_chunk_tokens,
        init_from=cfg.init_from,
    )
    if cfg.weight_bits == 8:
        model = quantize_weights(model, parse_target_modules(cfg.target_modules))
    return model
