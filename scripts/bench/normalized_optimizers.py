"""AuON vs Hybrid-AuON vs Muon vs AdamW: optimizer step time, state bytes, loss on a small LLaMA.

Protocol (the figures in docs/benchmarks.md come from this script, as printed):

``steptime``: one float32 weight matrix per shape (default 4096x4096 and 4096x11008) on
``--device``, a seeded standard-normal gradient, each optimizer at its defaults (torch.optim.AdamW
for AdamW). One warm-up step, then the median wall time of ``--repeats`` steps
(``torch.cuda.synchronize`` around each on CUDA), reported in seconds and as a ratio to AdamW's
median from the same run. State bytes: every tensor in ``optimizer.state`` after the steps,
divided by the matrix's number of entries.

``loss``: HF ``LlamaForCausalLM`` from a config (hidden 128, intermediate 352, 2 layers, 4 heads,
untied head), byte-level tokens (vocab 257) of the offline built-in corpus (docstrings of the
Python standard library, ``train.data``), windows of 64 tokens, batch 16, ``--steps`` steps
(default 500) of a fixed seeded window order, no warm-up or schedule, no weight decay anywhere,
float32 on ``--device``. AuON / Hybrid-AuON / Muon update the decoder's linear weights
(``normalized_param_groups``, "all-linear"); embeddings, head and norms get their AdamW rule at
``--adamw-lr``. Each optimizer runs over its lr grid; reported: the mean held-out loss over the
last 10% of the tokens (16 batches) after the budget, and the optimizer-state bytes per model
parameter. "AuON low-rank" runs AuON inside a rank-32 SVD subspace (refresh every 50 steps,
scale 1).

Usage:
  python scripts/bench/normalized_optimizers.py steptime [--repeats 2] [--threads 2] [--device cpu]
  python scripts/bench/normalized_optimizers.py loss [--steps 500] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lowmem_optim

STEP_OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "AdamW": lambda params: torch.optim.AdamW(params),
    "AuON": lambda params: lowmem_optim.AuON(params),
    "HybridAuON": lambda params: lowmem_optim.HybridAuON(params),
    "Muon": lambda params: lowmem_optim.Muon(params),
}

#: lr grids searched for the loss comparison (matrix lr; AdamW: its only lr)
LR_GRID: dict[str, list[float]] = {
    "AdamW": [3e-4, 1e-3, 3e-3, 1e-2],
    "AuON": [0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.24],
    "HybridAuON": [0.005, 0.01, 0.02, 0.05],
    "Muon": [0.0025, 0.005, 0.01, 0.02, 0.05],
    "AuON low-rank": [0.005, 0.01, 0.02, 0.05, 0.1],
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steptime(shapes: list[tuple[int, int]], repeats: int, device: torch.device) -> None:
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
        f"median of {repeats} steps after 1 warm-up"
    )
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        w0 = torch.randn(shape, generator=gen).mul_(0.02).to(device)
        grad = torch.randn(shape, generator=gen).to(device)
        medians: dict[str, float] = {}
        bytes_per: dict[str, float] = {}
        for name, make in STEP_OPTIMIZERS.items():
            w = nn.Parameter(w0.clone())
            opt = make([w])
            times = []
            for i in range(repeats + 1):
                w.grad = grad.clone()
                _sync(device)
                start = time.perf_counter()
                opt.step()
                _sync(device)
                if i:
                    times.append(time.perf_counter() - start)
            medians[name] = statistics.median(times)
            bytes_per[name] = state_bytes(opt) / w.numel()
            del opt, w
        print(f"\n{shape[0]}x{shape[1]}")
        print("| optimizer | step (s) | vs AdamW | state bytes/entry |\n|---|---|---|---|")
        for name, t in medians.items():
            print(f"| {name} | {t:.4f} | {t / medians['AdamW']:.2f}x | {bytes_per[name]:.2f} |")


# ---- loss on a small LLaMA ------------------------------------------------------------------
SEQ, BATCH, VAL_BATCHES = 64, 16, 16


def corpus() -> torch.Tensor:
    from train.data import ByteTokenizer, builtin_corpus, pack, read_documents

    return pack(read_documents(builtin_corpus()), ByteTokenizer()).long()


def small_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def make_optimizer(name: str, model: nn.Module, lr: float, adamw_lr: float) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    common = dict(lr=lr, weight_decay=0.0, adamw_lr=adamw_lr, adamw_weight_decay=0.0)
    if name == "AuON low-rank":
        groups = lowmem_optim.normalized_param_groups(model, rank=32, update_proj_gap=50, scale=1.0)
        return lowmem_optim.AuON(groups, **common)
    return getattr(lowmem_optim, name)(lowmem_optim.normalized_param_groups(model), **common)


def train_run(
    name: str, lr: float, tokens: torch.Tensor, steps: int, adamw_lr: float, device: torch.device
) -> tuple[float, float]:
    split = int(0.9 * len(tokens))
    train_windows = tokens[:split][: (split // SEQ) * SEQ].view(-1, SEQ).to(device)
    val_windows = tokens[split:][: VAL_BATCHES * BATCH * SEQ].view(-1, SEQ).to(device)
    order = torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(0)).to(device)
    model = small_llama().to(device)
    opt = make_optimizer(name, model, lr, adamw_lr)
    for step in range(steps):
        idx = order[(step * BATCH) % len(order) :][:BATCH]
        batch = train_windows[idx]
        opt.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    with torch.no_grad():
        val = statistics.mean(model(input_ids=b, labels=b).loss.item() for b in val_windows.split(BATCH))
    params = sum(p.numel() for p in model.parameters())
    return val, state_bytes(opt) / params


def loss(steps: int, adamw_lr: float, only: list[str] | None, lrs: list[float] | None, device: torch.device) -> None:
    tokens = corpus()
    print(
        f"tokens {len(tokens):,} (bytes), model hidden 128 x 2 layers, seq {SEQ}, batch {BATCH}, steps {steps}, "
        f"aux AdamW lr {adamw_lr}, device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    print("| optimizer | lr | held-out loss | state bytes/param |\n|---|---|---|---|")
    for name, grid in LR_GRID.items():
        if only and name not in only:
            continue
        for lr in lrs or grid:
            start = time.perf_counter()
            val, per_param = train_run(name, lr, tokens, steps, adamw_lr, device)
            print(
                f"| {name} | {lr:g} | {val:.4f} | {per_param:.2f} |  ({time.perf_counter() - start:.0f} s)", flush=True
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    st = sub.add_parser("steptime")
    st.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"])
    st.add_argument("--repeats", type=int, default=2)
    lo = sub.add_parser("loss")
    lo.add_argument("--steps", type=int, default=500)
    lo.add_argument("--adamw-lr", type=float, default=1e-3)
    lo.add_argument("--only", nargs="*", help="optimizer names from the grid (default: all)")
    lo.add_argument("--lrs", nargs="*", type=float, help="these lrs instead of each optimizer's grid")
    for p in (st, lo):
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "steptime":
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes]
        steptime(shapes, args.repeats, torch.device(args.device))
    else:
        loss(args.steps, args.adamw_lr, args.only, args.lrs, torch.device(args.device))


if __name__ == "__main__":
    main()
