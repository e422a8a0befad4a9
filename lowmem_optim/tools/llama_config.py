"""LLaMA model configs (HF ``LlamaConfig`` JSON files): the one loader of both command lines.

A config must state what sizes the model: ``hidden_size``, ``intermediate_size``,
``num_hidden_layers``, ``num_attention_heads``, ``vocab_size`` and ``max_position_embeddings``
are required ints >= 1 (``transformers`` would otherwise fill them in silently: a file with
only ``hidden_size`` became a 32-layer model with a 32000-token vocabulary). The attention must
split evenly: ``hidden_size`` into ``num_attention_heads`` heads (unless ``head_dim`` is given),
of an even size for the rotary embedding, and ``num_attention_heads`` into
``num_key_value_heads`` groups. Every refusal is one line naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the keys that size a LLaMA model: required in every config
SIZING_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)


#: a larger model is a typo, not a model (the largest trained ones have about 2e12): refused before
#: anything is built or summed per layer, which would hang or exhaust the memory
MAX_PARAMETERS = 10**14
#: the deepest trained models have a few hundred layers; tools that walk the layers (the memory
#: model's skeleton) take seconds at this bound
MAX_LAYERS = 10_000


def approximate_parameters(config: dict[str, Any]) -> int:
    """Weights of the embedding, the output head and the decoder layers (attention as four
    hidden x hidden matrices, the MLP as three hidden x intermediate ones), in plain Python ints."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    return 2 * config["vocab_size"] * hidden + config["num_hidden_layers"] * (4 * hidden * hidden + 3 * hidden * inter)


def load_llama_config(path: str | Path, flag: str = "--model-config") -> dict[str, Any]:
    """The config JSON at ``path``, checked as the module docstring says; ValueError otherwise."""
    where = f"{flag} {str(path)!r}"
    file = Path(path)
    if not file.is_file():
        shipped = ", ".join(sorted(str(p) for p in Path("configs").glob("llama_*.json"))) or "configs/llama_*.json"
        raise ValueError(f"{where} is not a file (shipped configs: {shipped})")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} is not readable JSON: {err}") from err
    if not isinstance(config, dict) or config.get("model_type") != "llama":
        raise ValueError(f'{where} is not a LLaMA config (expected "model_type": "llama")')
    missing = [k for k in SIZING_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"{where} lacks {', '.join(missing)} (required: {', '.join(SIZING_KEYS)}; nothing that "
            "sizes the model is filled in by default)"
        )
    for key in (*SIZING_KEYS, "num_key_value_heads", "head_dim"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {key} is {value!r} (allowed: an int >= 1)")
    if config["num_hidden_layers"] > MAX_LAYERS:
        raise ValueError(f"{where}: num_hidden_layers is {config['num_hidden_layers']} (allowed: at most {MAX_LAYERS})")
    parameters = approximate_parameters(config)
    if parameters > MAX_PARAMETERS:
        raise ValueError(
            f"{where}: the model would have about {parameters:.2e} parameters (allowed: at most "
            f"{MAX_PARAMETERS:.0e}; check num_hidden_layers, hidden_size, intermediate_size and vocab_size)"
        )
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if config.get("head_dim") is None and hidden % heads:
        raise ValueError(
            f"{where}: hidden_size {hidden} does not split into num_attention_heads {heads} heads "
            "(allowed: hidden_size a multiple of num_attention_heads, or an explicit head_dim)"
        )
    if head_dim % 2:
        raise ValueError(
            f"{where}: the head size is {head_dim}, odd (allowed: an even head size, which the rotary "
            "embedding rotates in pairs; set hidden_size / num_attention_heads or head_dim)"
        )
    if heads % kv:
        raise ValueError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv} "
            "(allowed: num_key_value_heads dividing num_attention_heads)"
        )
    return config


def check_seq_len(config: dict[str, Any], seq_len: int, path: str | Path) -> None:
    """ValueError naming ``--seq-len`` when it exceeds the config's ``max_position_embeddings``."""
    if seq_len > config["max_position_embeddings"]:
        raise ValueError(
            f"--seq-len {seq_len} exceeds max_position_embeddings {config['max_position_embeddings']} of {path}"
        )
