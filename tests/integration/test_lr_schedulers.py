"""LR schedulers (torch's and transformers') with every optimizer of the registry.

Each param group gets its own base lr (the low-rank group twice the full-rank group's); the
schedule must scale each group from its own base lr, the optimizer must step with the
scheduled value in every group (including the low-rank ones), and the scheduler's state must
resume together with the optimizer's through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io

import pytest
import torch

from tests.helpers.tiny import OPTIMIZERS, explicit_lr, make_optimizer, snapshot, tiny_llama, token_batches, train

STEPS, SAVE_AT, LR = 4, 2, 1e-2


def cosine_torch(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)


def cosine_with_warmup_transformers(optimizer):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=STEPS)


SCHEDULES = [cosine_torch, cosine_with_warmup_transformers]


def build(name, schedule, seed: int = 0):
    model = tiny_llama(seed)
    optimizer = make_optimizer(name, model, **explicit_lr(name, LR))
    for i, group in enumerate(optimizer.param_groups):  # per-group base lrs: LR, 2 LR, ...
        group["lr"] = LR * (i + 1)
    return model, optimizer, schedule(optimizer)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_scheduler_scales_each_group_from_its_own_lr_and_resumes_with_the_optimizer(name, schedule):
    model, optimizer, scheduler = build(name, schedule)
    batches = token_batches(STEPS)
    lrs = []
    for tokens in batches:
        lrs.append([group["lr"] for group in optimizer.param_groups])
        train(model, optimizer, [tokens], scheduler)
    factors = [lr[0] / LR for lr in lrs]
    assert len(set(factors)) > 1  # the schedule does change the lr
    for step_lrs, factor in zip(lrs, factors):
        assert step_lrs == pytest.approx([LR * (i + 1) * factor for i in range(len(step_lrs))], rel=1e-12)

    first, optimizer2, scheduler2 = build(name, schedule, seed=1)
    first.load_state_dict(tiny_llama(0).state_dict())
    train(first, optimizer2, batches[:SAVE_AT], scheduler2)
    buffer = io.BytesIO()
    torch.save(
        {"optimizer": optimizer2.state_dict(), "scheduler": scheduler2.state_dict(), "model": first.state_dict()},
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed, optimizer3, scheduler3 = build(name, schedule, seed=2)
    resumed.load_state_dict(checkpoint["model"])
    optimizer3.load_state_dict(checkpoint["optimizer"])
    scheduler3.load_state_dict(checkpoint["scheduler"])
    assert [g["lr"] for g in optimizer3.param_groups] == lrs[SAVE_AT]
    train(resumed, optimizer3, batches[SAVE_AT:], scheduler3)
    final = snapshot(model)
    for key, value in snapshot(resumed).items():
        assert torch.equal(value, final[key]), key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_group_steps_with_the_scheduled_lr_zero_during_warmup(name):
    model, optimizer, scheduler = build(name, cosine_with_warmup_transformers)
    assert all(group["lr"] == 0 for group in optimizer.param_groups)  # warmup starts at 0
    weights = snapshot(model)
    train(model, optimizer, token_batches(1), scheduler)
    for key, value in snapshot(model).items():
        assert torch.equal(value, weights[key]), key
    train(model, optimizer, token_batches(1, seed=2), scheduler)
    assert all(not torch.equal(value, weights[key]) for key, value in snapshot(model).items())
