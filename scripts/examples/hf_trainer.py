"""GaLore (or any optimizer of the registry) inside HF transformers' Trainer, offline on CPU.

    python scripts/examples/hf_trainer.py [--optimizer galore_adamw] [--rank 8]

Trains a tiny LLaMA built from a config on synthetic tokens for 8 steps with a checkpoint at
step 4, then resumes from that checkpoint in a second Trainer and checks the last losses agree.
"""

from __future__ import annotations

import argparse
import inspect
import tempfile

import torch
from tiny import tiny_llama, token_rows
from transformers import Trainer, TrainingArguments

from lowmem_optim.integrations.hf import trainer_optimizer
from lowmem_optim.registry import LOWRANK_OPTIMIZERS, get_optimizer_class


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.rows = token_rows()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def train(out: str, optimizer: str, rank: int, resume: str | None = None) -> list[float]:
    model = tiny_llama()
    args = TrainingArguments(
        output_dir=out,
        use_cpu=True,
        report_to="none",
        max_steps=8,
        save_steps=4,
        per_device_train_batch_size=8,
        logging_steps=1,
        disable_tqdm=True,
        optim_target_modules=["attn", "mlp"],
    )
    hparams = {"rank": rank, "update_proj_gap": 2} if optimizer in LOWRANK_OPTIMIZERS else {}
    if "relative_step" in inspect.signature(get_optimizer_class(optimizer)).parameters:
        hparams["relative_step"] = False  # the Trainer's LR schedule needs a number in lr
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        optimizer_cls_and_kwargs=trainer_optimizer(
            optimizer, lr=1e-2, target_modules=args.optim_target_modules, **hparams
        ),
    )
    trainer.train(resume_from_checkpoint=resume)
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="galore_adamw")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        full = train(out + "/full", args.optimizer, args.rank)
        resumed = train(out + "/resumed", args.optimizer, args.rank, resume=out + "/full/checkpoint-4")
    print(f"{args.optimizer}: losses {full}")
    print(f"resumed from step 4: {resumed[-4:]} (uninterrupted: {full[-4:]})")
    assert resumed[-4:] == full[-4:], "resume diverged"


if __name__ == "__main__":
    main()
