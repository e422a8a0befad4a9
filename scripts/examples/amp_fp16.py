"""GaLore under fp16 autocast with torch.amp.GradScaler, gradient clipping included (CPU or CUDA).

    python scripts/examples/amp_fp16.py [--optimizer galore_adamw] [--device cpu]

The scaler skips any step whose gradients overflowed: the optimizer is then not called, so
weights and optimizer state stay as they were (and no subspace refresh sees an inf). The
script forces one overflow at step 3 to show it.
"""

from __future__ import annotations

import argparse

import torch
from tiny import tiny_llama, token_rows

from lowmem_optim import build_optimizer
from lowmem_optim.registry import LOWRANK_OPTIMIZERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="galore_adamw")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = tiny_llama().to(args.device)
    lowrank = {"rank": 8, "update_proj_gap": 2} if args.optimizer in LOWRANK_OPTIMIZERS else {}
    optimizer = build_optimizer(args.optimizer, model, lr=1e-2, **lowrank)
    scaler = torch.amp.GradScaler(args.device)
    for step, tokens in enumerate(token_rows(8 * 8).split(8), start=1):
        tokens = tokens.to(args.device)
        with torch.autocast(args.device, dtype=torch.float16):
            loss = model(input_ids=tokens, labels=tokens).loss
        scaler.scale(loss).backward()
        if step == 3:
            next(model.parameters()).grad.view(-1)[0] = float("inf")  # an overflow, as fp16 produces them
        scaler.unscale_(optimizer)  # true gradients, so that clipping sees their real norm
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped when the gradients hold inf/NaN
        scaler.update()
        optimizer.zero_grad()
        print(
            f"step {step}: loss {loss.item():.4f}  grad norm {norm.item():.3g}  scale {scale:g}"
            + ("  (skipped: overflow)" if scaler.get_scale() < scale else "")
        )


if __name__ == "__main__":
    main()
