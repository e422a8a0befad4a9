"""The examples' tiny LLaMA (built from a config, no download) and synthetic token data."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, SEQ = 256, 32


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=SEQ,
        )
    )


def token_rows(n: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` arithmetic token sequences (random start and stride): learnable, so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 8, (n, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB
