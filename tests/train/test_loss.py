"""The chunked causal-LM loss (train/loss.py) equals HF's loss and gradients (float32), with
ignored labels, activation checkpointing and INT8 weights; the head's gradient hook fires once,
after the last chunk, so layer-wise updates step as ordinary training does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmem_optim import build_optimizer, layerwise
from lowmem_optim.quant.int8_linear import quantize_linear_layers
from train.loss import chunked_causal_lm_loss
from train.model import build_model

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "llama_tiny.json")
BATCH, SEQ = 3, 32


def _model(chunk: int, activation_checkpointing: bool = False, int8: bool = False) -> torch.nn.Module:
    model = build_model(
        TINY,
        dtype=torch.float32,
        device=torch.device("cpu"),
        seed=0,
        vocab_needed=512,
        seq_len=SEQ,
        activation_checkpointing=activation_checkpointing,
        loss_chunk_tokens=chunk,
    )
    if int8:
        quantize_linear_layers(model, "all-linear")
    return model.train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 3:11] = -100  # ignored labels count in neither the sum nor the divisor
    labels[2, -1] = -100
    return ids, labels


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids, labels = _batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("chunk", [1, 7, 32, BATCH * SEQ - 1])
@pytest.mark.parametrize(("activation_checkpointing", "int8"), [(False, False), (True, False), (True, True)])
def test_chunked_loss_and_gradients_equal_hf_loss(chunk, activation_checkpointing, int8):
    model = _model(chunk, activation_checkpointing, int8)
    chunked, chunked_grads = _loss_and_grads(model)
    model.loss_chunk_tokens = 0
    reference, reference_grads = _loss_and_grads(model)
    assert chunked.logits is None and reference.logits is not None  # the chunked path ran
    torch.testing.assert_close(chunked.loss, reference.loss, rtol=1e-6, atol=0)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_micro_batch_within_one_chunk_takes_hf_loss():
    model = _model(BATCH * SEQ)
    ids, labels = _batch()
    assert model(input_ids=ids, labels=labels).logits is not None
    assert model(input_ids=ids).loss is None  # no labels: HF's forward, logits for generation


def test_head_gradient_hook_fires_once_after_the_last_chunk():
    model = _model(10)
    model.loss_chunk_tokens = 0
    _, reference = _loss_and_grads(model)
    model.loss_chunk_tokens = 10
    seen = []
    model.lm_head.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    _loss_and_grads(model)
    assert len(seen) == 1  # BATCH * SEQ / 10 -> 10 chunks, one hook call
    torch.testing.assert_close(seen[0], reference["lm_head.weight"], rtol=1e-5, atol=1e-7)


def test_layerwise_updates_with_chunked_loss_equal_unchunked():
    trained = []
    for chunk in (0, 10):
        model = _model(chunk, activation_checkpointing=True)
        optimizer = build_optimizer("galore_adamw", model, lr=1e-2, rank=8)
        handle = layerwise.attach(optimizer)
        for _ in range(2):
            ids, labels = _batch()
            model(input_ids=ids, labels=labels).loss.backward()
        handle.remove()
        trained.append(dict(model.named_parameters()))
    for name, p in trained[0].items():
        torch.testing.assert_close(trained[1][name], p, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_refuses_a_chunk_below_one_token():
    with pytest.raises(ValueError, match="chunk_tokens: 0"):
        chunked_causal_lm_loss(torch.zeros(1, 2, 4), torch.nn.Linear(4, 8), torch.zeros(1, 2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="loss_chunk_tokens: -1"):
        _model(-1)


def test_training_loss_is_the_same_chunked_and_unchunked(run_tiny):
    whole = run_tiny("whole", "galore_adamw", loss_chunk_tokens=0)
    chunked = run_tiny("chunked", "galore_adamw", loss_chunk_tokens=48)  # 4 x 32 tokens: 3 chunks
    assert [r["loss"] for r in chunked] == pytest.approx([r["loss"] for r in whole], rel=1e-5)
    assert chunked[-1]["val_loss"] == pytest.approx(whole[-1]["val_loss"], rel=1e-5)
