"""Python overhead of layer-wise low-rank accumulation per micro-batch, at LLaMA-7B's parameter count.

Protocol (one process, CPU, one thread):
- Model: LLaMA-7B's parameter layout at toy width: an embedding, 32 blocks of 7 linear layers
  (q, k, v, o, gate, up, down) and 2 norm weights, a final norm and an output head: 291
  parameters (as LLaMA-7B), 224 of them projected. Width ``--width`` (16), so the arithmetic is
  negligible and the time is the Python around it.
- Optimizer: ``GaLoreAdamW`` over ``lowrank_param_groups(model, rank=--rank)`` with
  ``update_proj_gap`` larger than the run (one refresh, in the warm-up step), attached with
  ``layerwise.attach(accumulation_steps=4, accumulation_buffer="float32")``.
- Timed: ``--steps`` training steps of 4 micro-batches after one warm-up step; per step, this
  process's CPU time (``time.process_time``: less disturbed than wall time by other processes
  on the machine) over its 4 ``loss.backward()`` calls (the hooks run inside them: the first
  micro-batch begins the step, the last finishes it). The baseline is the same backward with no
  optimizer attached (gradients dropped after each backward). Reported: the median over steps,
  divided by 4 (per micro-batch), of each, and their difference (the hooks' cost per micro-batch).
- Forward and loss are outside the timed region; random tokens, seeded.

Usage: python -m scripts.bench.hook_overhead [--steps 10] [--width 16] [--rank 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lowmem_optim import GaLoreAdamW, layerwise, lowrank_param_groups

ACCUMULATION_STEPS = 4
LAYERS = 32
VOCAB = 64
TOKENS = 8


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(width)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width, bias=False) for _ in range(4))
        self.mlp_norm = nn.RMSNorm(width)
        self.gate_proj, self.up_proj = nn.Linear(width, 2 * width, bias=False), nn.Linear(width, 2 * width, bias=False)
        self.down_proj = nn.Linear(2 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.o_proj(self.q_proj(h) * self.k_proj(h) + self.v_proj(h))
        h = self.mlp_norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class SkeletonLlama(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(LAYERS))
        self.norm = nn.RMSNorm(width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return nn.functional.cross_entropy(self.lm_head(self.norm(x)), tokens)


def backward_seconds(model: nn.Module, steps: int, handle: layerwise.LayerwiseHandle | None) -> float:
    """Median over the timed steps (after one warm-up step) of a step's backward CPU time, per micro-batch."""
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        total = 0.0
        for _ in range(ACCUMULATION_STEPS):
            loss = model(torch.randint(VOCAB, (TOKENS,), generator=generator)) / ACCUMULATION_STEPS
            start = time.process_time()
            loss.backward()
            total += time.process_time() - start
            if handle is None:
                model.zero_grad(set_to_none=True)
        times.append(total / ACCUMULATION_STEPS)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = SkeletonLlama(args.width)
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
