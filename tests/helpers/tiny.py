"""Shared pieces of the integration tests: a tiny LLaMA, synthetic tokens, and every optimizer
of the registry built with small-model hyperparameters.

The optimizer list is read from :mod:`lowmem_optim.registry`, so an optimizer registered later
is covered by every stack test without editing them. Low-rank optimizers get rank 4 and a
refresh every 2 steps (so a few steps cross a refresh, also across a resume); 8-bit rules get
``min_8bit_size=0`` (so the tiny moments really are uint8 codes).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from lowmem_optim.registry import LOWRANK_OPTIMIZERS, available_optimizers, build_optimizer, get_optimizer_class

VOCAB, SEQ, BATCH = 128, 16, 4

#: every registered optimizer, baselines (``adamw``, ``adamw8bit``) included
OPTIMIZERS: list[str] = available_optimizers()

#: the optimizers of this package (the registry minus torch's and bitsandbytes' baselines)
OURS: list[str] = [name for name in OPTIMIZERS if get_optimizer_class(name).__module__.startswith("lowmem_optim")]


def tiny_llama(seed: int = 0):
    """A 2-layer LLaMA (hidden 32, vocab 128) with seeded weights; no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def token_batches(n: int, batch: int = BATCH, seed: int = 1) -> list[torch.Tensor]:
    """``n`` batches of arithmetic sequences (start and stride random): learnable, so losses fall."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, batch, 1), generator=g)
    stride = torch.randint(1, 8, (n, batch, 1), generator=g)
    return list((start + stride * torch.arange(SEQ)) % VOCAB)


def optimizer_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Hyperparameters for ``build_optimizer(name, ...)`` on the tiny model."""
    accepted = inspect.signature(get_optimizer_class(name)).parameters
    kwargs: dict[str, Any] = {}
    if name in LOWRANK_OPTIMIZERS:
        kwargs.update(rank=4, update_proj_gap=2)
    if "min_8bit_size" in accepted:
        kwargs["min_8bit_size"] = 0
    kwargs.update(overrides)
    return kwargs


def explicit_lr(name: str, lr: float) -> dict[str, Any]:
    """``lr=lr``, plus ``relative_step=False`` for optimizers whose default step size is relative
    (Adafactor): an LR scheduler needs a number in ``group['lr']``."""
    accepted = inspect.signature(get_optimizer_class(name)).parameters
    return {"lr": lr, "relative_step": False} if "relative_step" in accepted else {"lr": lr}


def make_optimizer(name: str, model: torch.nn.Module, **overrides: Any):
    return build_optimizer(name, model, **optimizer_kwargs(name, **overrides))


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def train(model: torch.nn.Module, optimizer, batches: list[torch.Tensor], scheduler=None) -> list[float]:
    """Plain loop: one optimizer step per batch; the losses."""
    losses = []
    for tokens in batches:
        loss = lm_loss(model, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def assert_same_state(actual: Any, expected: Any, where: str = "state") -> None:
    """Two optimizer ``state_dict()`` trees hold the same keys, values and dtypes (NaN == NaN)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (where, set(actual) ^ set(expected))
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}/{key}")
    elif torch.is_tensor(expected):
        assert torch.is_tensor(actual) and actual.dtype == expected.dtype, (where, actual, expected.dtype)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), (where, actual)
    else:
        assert actual == expected, (where, actual, expected)


def non_finite_state(optimizer) -> list[str]:
    """Names of floating state tensors holding inf/NaN."""
    bad = []
    for pid, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                bad.append(f"{pid}/{key}")
    return bad


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
