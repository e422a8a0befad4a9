"""accelerate with every optimizer of the registry: ``prepare`` trains, and ``save_state`` /
``load_state`` resume the run exactly (weights, optimizer state, LR scheduler)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.tiny import OPTIMIZERS, explicit_lr, make_optimizer, snapshot, tiny_llama, token_batches

STEPS, SAVE_AT = 4, 2


def run_accelerate(name: str, save_dir, load_dir=None, model_seed: int = 0):
    """STEPS steps (or the rest after ``load_dir``'s state); returns (losses, unwrapped model)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from transformers import get_cosine_schedule_with_warmup

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per run in this process
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = tiny_llama(seed=model_seed)
    optimizer = make_optimizer(name, model, **explicit_lr(name, 1e-2))
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, STEPS)
    loader = torch.utils.data.DataLoader(torch.cat(token_batches(STEPS)), batch_size=4)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    done = 0
    if load_dir is not None:
        accelerator.load_state(str(load_dir))
        loader, done = accelerator.skip_first_batches(loader, SAVE_AT), SAVE_AT
    losses = []
    for tokens in loader:
        loss = model(input_ids=tokens, labels=tokens).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        done += 1
        if done == SAVE_AT:
            accelerator.save_state(str(save_dir))
    return losses, accelerator.unwrap_model(model)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_accelerate_load_state_resumes_the_run_exactly(name, tmp_path):
    losses, model = run_accelerate(name, tmp_path / "state")
    assert len(losses) == STEPS and all(map(math.isfinite, losses))
    resumed, again = run_accelerate(name, tmp_path / "unused", load_dir=tmp_path / "state", model_seed=1)
    assert resumed == losses[SAVE_AT:]
    final = snapshot(model)
    for key, value in snapshot(again).items():
        assert torch.equal(value, final[key]), key
