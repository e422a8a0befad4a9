"""HF transformers Trainer with every optimizer of the registry: train, checkpoint, resume.

Both ways in: an optimizer built beforehand (``optimizers=(optimizer, scheduler)``) and one the
Trainer builds (``optimizer_cls_and_kwargs`` from :func:`lowmem_optim.integrations.hf.trainer_optimizer`).
The Trainer writes ``optimizer.pt`` and reads it back with ``torch.load(weights_only=True)``;
the resumed run must reproduce the uninterrupted run's losses and weights exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowmem_optim.integrations.hf import trainer_optimizer
from lowmem_optim.registry import LOWRANK_OPTIMIZERS
from tests.helpers.tiny import (
    OPTIMIZERS,
    explicit_lr,
    make_optimizer,
    optimizer_kwargs,
    snapshot,
    tiny_llama,
    token_batches,
)

STEPS, SAVE_AT = 4, 2


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.rows = torch.cat(token_batches(STEPS))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def run_trainer(name: str, way: str, output_dir, resume_from=None, model_seed: int = 0, **trainer_args):
    """Train the tiny LLaMA with ``name`` for STEPS steps (checkpoint every SAVE_AT); returns
    (per-step losses, trainer)."""
    from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

    class Recording(Trainer):
        losses: list[float] = []

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.losses.append(loss.item())
            return loss

    model = tiny_llama(seed=model_seed)
    args = TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        max_steps=STEPS,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=SAVE_AT,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **trainer_args,
    )
    hparams = optimizer_kwargs(name, **explicit_lr(name, 1e-2))
    if way == "optimizers":
        optimizer = make_optimizer(name, model, **explicit_lr(name, 1e-2))
        ways = {"optimizers": (optimizer, get_cosine_schedule_with_warmup(optimizer, 1, STEPS))}
    else:
        ways = {"optimizer_cls_and_kwargs": trainer_optimizer(name, **hparams)}
    trainer = Recording(model=model, args=args, train_dataset=Tokens(), **ways)
    trainer.losses = []
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer.losses, trainer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_trainer_resumed_from_a_checkpoint_repeats_the_uninterrupted_run(name, tmp_path):
    """The uninterrupted run gets the optimizer built beforehand (``optimizers=``); the resumed
    run lets the Trainer build it (``optimizer_cls_and_kwargs``) and loads ``optimizer.pt`` into
    it: equal losses and weights cover both ways in, and the checkpoint between them."""
    losses, full = run_trainer(name, "optimizers", tmp_path / "full")
    assert len(losses) == STEPS and all(map(math.isfinite, losses))
    resumed, again = run_trainer(
        name,
        "optimizer_cls_and_kwargs",
        tmp_path / "resumed",
        model_seed=1,
        resume_from=str(tmp_path / "full" / f"checkpoint-{SAVE_AT}"),
    )
    assert type(again.optimizer.optimizer) is type(full.optimizer.optimizer)  # the Trainer wraps it for accelerate
    assert resumed == losses[SAVE_AT:]
    final = snapshot(full.model)
    for key, value in snapshot(again.model).items():
        assert torch.equal(value, final[key]), key


@pytest.mark.parametrize("name", sorted(LOWRANK_OPTIMIZERS))
def test_trainer_factory_selects_low_rank_matrices_like_optim_target_modules(name):
    from lowmem_optim.integrations.hf import TrainerOptimizerFactory

    model = tiny_llama()
    factory_cls, kwargs = trainer_optimizer(
        name, **optimizer_kwargs(name, target_modules=["self_attn"], **explicit_lr(name, 1e-2))
    )
    optimizer = factory_cls()(model, **kwargs)
    low = [n for g in optimizer.param_groups if g.get("rank") for n in g["param_names"]]
    assert low == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"]
    assert isinstance(factory_cls(), TrainerOptimizerFactory)


def test_trainer_factory_refuses_a_relative_step_size_the_trainer_schedule_cannot_scale():
    with pytest.raises(ValueError, match=r"HF Trainer: .*galore_adafactor.*lr=None.*LR scheduler"):
        factory_cls, kwargs = trainer_optimizer("galore_adafactor", rank=4)
        factory_cls()(tiny_llama(), **kwargs)
