"""GaLore with a torch.compile'd model (inductor by default), next to the same run in eager mode.

    python scripts/examples/compile.py [--optimizer galore_adamw] [--backend inductor]

Compile the model, not the optimizer: our optimizers' ``step`` is marked
``torch.compiler.disable`` and runs eagerly even inside a compiled function (Dynamo's trace of
it graph-broke at every host read of the step counter and gave a wrong result).
"""

from __future__ import annotations

import argparse

import torch
from tiny import tiny_llama, token_rows

from lowmem_optim import build_optimizer
from lowmem_optim.registry import LOWRANK_OPTIMIZERS


def train(model: torch.nn.Module, forward, optimizer_name: str, steps: int = 6) -> list[float]:
    lowrank = {"rank": 8, "update_proj_gap": 2} if optimizer_name in LOWRANK_OPTIMIZERS else {}
    optimizer = build_optimizer(optimizer_name, model, lr=1e-2, **lowrank)
    losses = []
    for tokens in token_rows(8 * steps).split(8):
        loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="galore_adamw")
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    eager_model = tiny_llama()
    eager = train(eager_model, eager_model, args.optimizer)
    model = tiny_llama()
    compiled = train(model, torch.compile(model, backend=args.backend), args.optimizer)
    gap = max(abs(a - b) for a, b in zip(eager, compiled))
    print(f"eager    {[round(x, 5) for x in eager]}\ncompiled {[round(x, 5) for x in compiled]}\nmax |diff| {gap:.2e}")


if __name__ == "__main__":
    main()
