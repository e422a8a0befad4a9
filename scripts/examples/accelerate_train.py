"""GaLore with HF accelerate: prepare, train, save_state, and resume with load_state (CPU, offline).

python scripts/examples/accelerate_train.py [--optimizer galore_adamw] [--rank 8]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from accelerate import Accelerator
from tiny import tiny_llama, token_rows
from transformers import get_cosine_schedule_with_warmup

from lowmem_optim import build_optimizer
from lowmem_optim.registry import LOWRANK_OPTIMIZERS

STEPS, SAVE_AT = 8, 4


def run(optimizer_name: str, rank: int, state_dir: str, resume: bool) -> list[float]:
    accelerator = Accelerator(cpu=True)
    model = tiny_llama()
    lowrank = {"rank": rank, "update_proj_gap": 2} if optimizer_name in LOWRANK_OPTIMIZERS else {}
    optimizer = build_optimizer(optimizer_name, model, lr=1e-2, **lowrank)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, STEPS)
    loader = torch.utils.data.DataLoader(token_rows(8 * STEPS), batch_size=8)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    step = 0
    if resume:
        accelerator.load_state(state_dir)  # weights, optimizer state (our state is tensors and numbers), scheduler
        loader, step = accelerator.skip_first_batches(loader, SAVE_AT), SAVE_AT
    losses = []
    for tokens in loader:
        loss = model(input_ids=tokens, labels=tokens).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        step += 1
        if step == SAVE_AT and not resume:
            accelerator.save_state(state_dir)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="galore_adamw")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state_dir:
        full = run(args.optimizer, args.rank, state_dir, resume=False)
        resumed = run(args.optimizer, args.rank, state_dir, resume=True)
    print(f"{args.optimizer}: losses {[round(x, 4) for x in full]}")
    print(f"resumed after step {SAVE_AT}: {[round(x, 4) for x in resumed]}")
    assert resumed == full[SAVE_AT:], "resume diverged"


if __name__ == "__main__":
    main()
