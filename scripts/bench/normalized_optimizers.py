"""AuON vs Hybrid-AuON vs Muon vs AdamW: optimizer step time and state bytes of one matrix.

Protocol (the figures in docs/benchmarks.md come from this script, as printed): one float32
weight matrix per shape (default 4096x4096 and 4096x11008) on ``--device``, a seeded
standard-normal gradient, each optimizer at its defaults (torch.optim.AdamW for AdamW). One
warm-up step, then the median wall time of ``--repeats`` steps (the device synchronized around
each), reported in seconds and as a ratio to AdamW's median from the same run. State bytes:
every tensor in ``optimizer.state`` after the steps, divided by the matrix's number of entries.
Their loss after a training budget is a sweep (docs/benchmarks.md, "AuON, Hybrid-AuON and Muon").

    python -m scripts.bench.normalized_optimizers [--repeats 2] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import lowmem_optim
from scripts.bench.toolkit import median_seconds, state_bytes

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "AdamW": lambda params: torch.optim.AdamW(params),
    "AuON": lambda params: lowmem_optim.AuON(params),
    "HybridAuON": lambda params: lowmem_optim.HybridAuON(params),
    "Muon": lambda params: lowmem_optim.Muon(params),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
        f"median of {args.repeats} steps after 1 warm-up"
    )
    for shape in [tuple(int(d) for d in s.split("x")) for s in args.shapes]:
        gen = torch.Generator().manual_seed(0)
        w0 = torch.randn(shape, generator=gen).mul_(0.02).to(device)
        grad = torch.randn(shape, generator=gen).to(device)
        print(f"\n{shape[0]}x{shape[1]}\n| optimizer | step (s) | vs AdamW | state bytes/entry |\n|---|---|---|---|")
        medians: dict[str, float] = {}
        for name, make in OPTIMIZERS.items():
            w = nn.Parameter(w0.clone())
            optimizer = make([w])
            new_grad = lambda w=w, grad=grad: setattr(w, "grad", grad.clone())  # noqa: E731
            medians[name] = median_seconds(optimizer.step, args.repeats, device, before=new_grad)
            print(
                f"| {name} | {medians[name]:.4f} | {medians[name] / medians['AdamW']:.2f}x | "
                f"{state_bytes(optimizer) / w.numel():.2f} |"
            )


if __name__ == "__main__":
    main()
