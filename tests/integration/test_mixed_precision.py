"""Mixed precision with every optimizer of the registry.

bf16 autocast trains; fp16 autocast with ``torch.amp.GradScaler``: a step whose gradients hold
inf/NaN is skipped by the scaler and leaves weights AND optimizer state untouched (even when a
subspace refresh was due: the optimizer's step is never called), and ``scaler.unscale_`` then
``clip_grad_norm_`` clips the true gradients before the step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.helpers.tiny import (
    OPTIMIZERS,
    assert_same_state,
    lm_loss,
    make_optimizer,
    non_finite_state,
    optimizer_kwargs,
    snapshot,
    tiny_llama,
    token_batches,
    train,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_autocast_trains_close_to_float32(name):
    batches = token_batches(3)
    reference = tiny_llama()
    initial = snapshot(reference)
    expected = train(reference, make_optimizer(name, reference), batches)
    model = tiny_llama()
    optimizer = make_optimizer(name, model)
    losses = []
    for tokens in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not non_finite_state(optimizer)
    assert losses == pytest.approx(expected, abs=0.05)  # bf16 keeps ~3 significant digits of a ~4.8 loss
    # three steps move the loss by less than that tolerance: the weights' update tells a run that
    # trains from one that does not (bf16 runs here are 1-9% off float32's update)
    float32_update = torch.cat([(w - initial[k]).flatten() for k, w in snapshot(reference).items()])
    bf16_update = torch.cat([(w - initial[k]).flatten() for k, w in snapshot(model).items()])
    assert torch.linalg.vector_norm(bf16_update - float32_update) < 0.25 * torch.linalg.vector_norm(float32_update)


def _scaled_backward(model, tokens, scaler, device):
    with torch.autocast(device, dtype=torch.float16):
        loss = lm_loss(model, tokens)
    scaler.scale(loss).backward()
    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fp16_grad_scaler_skips_a_non_finite_step_leaving_weights_and_state_untouched(name, device):
    model = tiny_llama().to(device)
    refresh_every_step = {"update_proj_gap": 1} if "update_proj_gap" in optimizer_kwargs(name) else {}
    optimizer = make_optimizer(name, model, **refresh_every_step)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    first, second = token_batches(2)
    _scaled_backward(model, first.to(device), scaler, device)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()

    weights, state = snapshot(model), copy.deepcopy(optimizer.state_dict())
    _scaled_backward(model, second.to(device), scaler, device)
    # in a projected matrix, at a step where its refresh is due (gap 1)
    model.model.layers[0].self_attn.q_proj.weight.grad.view(-1)[0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    assert scaler.get_scale() == scale / 2
    for key, value in snapshot(model).items():
        assert torch.equal(value, weights[key]), key
    assert_same_state(optimizer.state_dict(), state)

    _scaled_backward(model, second.to(device), scaler, device)  # and training goes on
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(v, weights[k]) for k, v in snapshot(model).items())
    assert not non_finite_state(optimizer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fp16_unscale_then_clip_grad_norm_clips_the_true_gradient(name, device):
    model = tiny_llama().to(device)
    optimizer = make_optimizer(name, model)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    _scaled_backward(model, token_batches(1)[0].to(device), scaler, device)
    scaler.unscale_(optimizer)
    true_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
    assert math.isfinite(true_norm) and 0.1 < true_norm < 100  # unscaled: the scale 1024 is gone
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert clipped == pytest.approx(0.1, rel=1e-3)
    weights = snapshot(model)
    scaler.step(optimizer)  # steps with the clipped gradient, no second unscale
    scaler.update()
    assert scaler.get_scale() == 2.0**10
    assert any(not torch.equal(v, weights[k]) for k, v in snapshot(model).items())
    assert not non_finite_state(optimizer)
