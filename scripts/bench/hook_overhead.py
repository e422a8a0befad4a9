"""Python overhead of layer-wise low-rank accumulation per micro-batch, at LLaMA-7B's parameter count.

Protocol (one process, CPU, one thread):
- Model: HF ``LlamaForCausalLM`` from ``configs/llama_7b.json`` at toy width: hidden
  ``--width`` (16), MLP 2 x width, one attention head, vocab 64: LLaMA-7B's 291 parameters (an
  embedding, 32 blocks of 7 linear layers and 2 norm weights, a final norm, an output head), 224
  of them projected, so the arithmetic is negligible and the time is the Python around it.
- Optimizer: ``GaLoreAdamW`` over ``lowrank_param_groups(model, rank=--rank)`` with
  ``update_proj_gap`` larger than the run (one refresh, in the warm-up step), attached with
  ``layerwise.attach(accumulation_steps=4, accumulation_buffer="float32")``.
- Timed (:func:`scripts.bench.toolkit.median_seconds`): ``--steps`` training steps of 4
  micro-batches after one warm-up step; per step, this process's CPU time (``time.process_time``:
  less disturbed than wall time by other processes on the machine) over its 4
  ``loss.backward()`` calls (the hooks run inside them: the first micro-batch begins the step,
  the last finishes it). The baseline is the same backward with no optimizer attached (gradients
  dropped after each backward). Reported: the median over steps, divided by 4 (per
  micro-batch), of each, and their difference (the hooks' cost per micro-batch).
- Forward and loss are outside the timed region (the step's 4 forwards run ahead of its 4
  backwards); random tokens, seeded.

Usage: python -m scripts.bench.hook_overhead [--steps 10] [--width 16] [--rank 4]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lowmem_optim import GaLoreAdamW, layerwise, lowrank_param_groups
from scripts.bench.toolkit import LLAMA_7B, llama, median_seconds

ACCUMULATION_STEPS = 4
VOCAB = 64
TOKENS = 8


def backward_seconds(model: nn.Module, steps: int, handle: layerwise.LayerwiseHandle | None) -> float:
    """Median over the timed steps (after one warm-up step) of a step's backward CPU time, per micro-batch."""
    generator = torch.Generator().manual_seed(0)
    losses: list[torch.Tensor] = []

    def forwards() -> None:  # untimed: the step's micro-batches, each loss with its graph
        tokens = [torch.randint(VOCAB, (1, TOKENS), generator=generator) for _ in range(ACCUMULATION_STEPS)]
        losses[:] = [model(input_ids=t, labels=t).loss / ACCUMULATION_STEPS for t in tokens]

    def backwards() -> None:
        for loss in losses:
            loss.backward()
            if handle is None:
                model.zero_grad(set_to_none=True)

    return median_seconds(backwards, steps, "cpu", before=forwards, clock=time.process_time) / ACCUMULATION_STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = llama(
        LLAMA_7B,
        hidden_size=args.width,
        intermediate_size=2 * args.width,
        num_attention_heads=1,
        num_key_value_heads=1,
        vocab_size=VOCAB,
    )
    baseline = backward_seconds(model, args.steps, None)

    optimizer = GaLoreAdamW(lowrank_param_groups(model, rank=args.rank, update_proj_gap=10 * (args.steps + 2)), lr=1e-3)
    projected = sum(len(g["params"]) for g in optimizer.param_groups if g.get("rank") is not None)
    handle = layerwise.attach(optimizer, accumulation_steps=ACCUMULATION_STEPS, accumulation_buffer="float32")
    hooked = backward_seconds(model, args.steps, handle)
    handle.remove()

    print(
        f"parameters {sum(1 for _ in model.parameters())} (projected {projected}), width {args.width}, "
        f"rank {args.rank}, {ACCUMULATION_STEPS} micro-batches per step, {args.steps} timed steps"
    )
    print(f"backward without optimizer:         {1e3 * baseline:8.2f} ms per micro-batch")
    print(f"backward with low-rank accumulation: {1e3 * hooked:8.2f} ms per micro-batch")
    print(f"hooks' overhead:                     {1e3 * (hooked - baseline):8.2f} ms per micro-batch")


if __name__ == "__main__":
    main()
