"""bfloat16 weights: the update is back-projected in bfloat16, and training is as good as in float32.

Before, the low-rank update N of the 8-bit and Adafactor rules was back-projected in float32
(a float32 m x n update per matrix); now P N runs in the weight's dtype. The training loss of a
tiny LLaMA in bfloat16 must stay within the spread that seeds give to the float32 back-projection.
"""

from __future__ import annotations

import pytest
import torch

from lowmem_optim.engine import param_step
from lowmem_optim.quant import groupwise, int8_linear
from lowmem_optim.quant.int8_linear import quantize_linear_layers
from lowmem_optim.registry import build_optimizer
from lowmem_optim.tools.op_count import OpCounter, as_one_op
from tests.helpers.tiny import VOCAB, optimizer_kwargs, tiny_llama, token_batches

STEPS = 20


def _final_loss(name: str, seed: int) -> float:
    model = tiny_llama(seed).to(torch.bfloat16)
    fixed_lr = {"relative_step": False, "scale_parameter": False} if name == "galore_adafactor" else {}
    optimizer = build_optimizer(name, model, lr=1e-2, **fixed_lr, **optimizer_kwargs(name, update_proj_gap=4))
    losses = []
    for tokens in token_batches(STEPS, seed=seed + 1):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return sum(losses[-4:]) / 4


@pytest.mark.parametrize("name", ["q_galore_adamw8bit", "galore_adafactor"])
def test_bf16_back_projection_trains_within_seed_noise_of_the_float32_one(name, monkeypatch):
    bf16 = [_final_loss(name, seed) for seed in (0, 1)]
    monkeypatch.setattr(param_step, "back_projection_dtype", lambda param, update: update.dtype)  # the float32 path
    fp32 = [_final_loss(name, seed) for seed in (0, 1)]
    start = float(torch.log(torch.tensor(float(VOCAB))))
    assert max(bf16) < start - 0.5  # it trains
    noise = abs(fp32[0] - fp32[1])
    assert all(abs(a - b) <= max(noise, 0.05) for a, b in zip(bf16, fp32)), (bf16, fp32)


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_no_float32_matrix_sized_temporary_in_a_bf16_step_without_a_refresh(int8, monkeypatch):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(96, 64, bias=False, dtype=torch.bfloat16))
    if int8:
        quantize_linear_layers(model)
        # as CUDA runs it: the re-quantization is one fused pass (float32 in registers), counted as one op
        monkeypatch.setattr(int8_linear, "_fusable", lambda codes, group_size: codes.numel() % group_size == 0)
        monkeypatch.setitem(
            groupwise._COMPILED, groupwise.requantize_rows_, as_one_op(groupwise.requantize_rows_, "fused requantize")
        )
    optimizer = build_optimizer("q_galore_adamw8bit", model, rank=8, update_proj_gap=10**6, min_8bit_size=0)
    weight = model[0].weight
    for _ in range(2):  # the second step: no refresh
        weight.grad = torch.empty(64, 96, dtype=torch.bfloat16, device="meta")
        with OpCounter() as counter:
            optimizer.step()
    assert counter.largest_numel[torch.bfloat16] == 64 * 96  # the update P N, in bf16
    assert counter.largest_numel[torch.float32] <= 8 * 96  # the 8-bit moments and N (rank x 96)
