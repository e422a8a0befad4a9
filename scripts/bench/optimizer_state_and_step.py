"""Optimizer-state bytes and optimizer step time: torch AdamW vs ours vs galore-torch.

Protocol (the figures in docs/benchmarks.md come from this script, as printed):
- Model: HF ``LlamaForCausalLM`` from ``configs/llama_60m.json`` (GaLore's 60M: hidden 512,
  intermediate 1376, 8 layers, 8 heads, vocab 32000, untied head), float32 weights, on CPU.
- Low-rank groups: every linear layer of the decoder (attention and MLP; not the head),
  rank 128, scale 0.25, proj_type std; embeddings, head and norms full-rank AdamW (GaLore's
  recipe). Other hyperparameters at each class's defaults.
- Gradients: seeded standard-normal tensors assigned to every parameter (no forward/backward,
  so only the optimizer is timed).
- State bytes: sum of ``numel * element_size`` over every tensor in ``optimizer.state`` after
  the first step (including tensors held as attributes of objects in the state, where
  galore-torch keeps its projection matrices), divided by the number of model parameters;
  "retained" counts the distinct storages behind those tensors (a slice keeps its whole base
  tensor alive).
- Step time: one warm-up step, then the median wall time of ``--steps`` steps without a
  subspace refresh (update_proj_gap larger than the run) and of ``--steps`` steps that all
  refresh (update_proj_gap 1); reported as ratios to torch AdamW's median measured in the same
  run (``torch.set_num_threads`` as given).

Usage: python -m scripts.bench.optimizer_state_and_step [--steps 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import lowmem_optim
from scripts.bench.toolkit import llama, retained_bytes, state_bytes

RANK = 128


def groups(model: torch.nn.Module, gap: int) -> list[dict]:
    """The same partition for ours and galore-torch (galore-torch's keys)."""
    built = lowmem_optim.lowrank_param_groups(
        model, "all-linear", rank=RANK, update_proj_gap=gap, scale=0.25, proj_type="std"
    )
    return [{k: v for k, v in g.items() if k != "param_names"} for g in built]


def candidates() -> dict[str, callable]:
    import galore_torch

    return {
        "torch AdamW": lambda m, gap: torch.optim.AdamW(m.parameters()),
        "ours GaLoreAdamW": lambda m, gap: lowmem_optim.GaLoreAdamW(groups(m, gap)),
        "ours GaLoreAdafactor": lambda m, gap: lowmem_optim.GaLoreAdafactor(groups(m, gap)),
        "ours GaLoreAdamW8bit": lambda m, gap: lowmem_optim.GaLoreAdamW8bit(groups(m, gap)),
        "galore-torch GaLoreAdamW": lambda m, gap: galore_torch.GaLoreAdamW(
            groups(m, gap), no_deprecation_warning=True
        ),
        "galore-torch GaLoreAdafactor": lambda m, gap: galore_torch.GaLoreAdafactor(groups(m, gap)),
        "galore-torch GaLoreAdamW8bit": lambda m, gap: galore_torch.GaLoreAdamW8bit(groups(m, gap)),
    }


def set_grads(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def time_steps(model, opt, steps: int) -> float:
    times = []
    for step in range(steps):
        set_grads(model, step + 1)
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = llama()
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for name, make in candidates().items():
        print(f"running {name} ...", flush=True)
        row = {"optimizer": name}
        try:
            opt = make(model, 10**6)
            set_grads(model, 0)
            opt.step()  # warm-up; creates the state (and the one refresh at step 1)
            row["state_bytes"] = state_bytes(opt)
            row["retained_bytes"] = retained_bytes(opt)
            row["state_bytes_per_param"] = row["state_bytes"] / n_params
            row["step_s"] = time_steps(model, opt, args.steps)
            refresh_opt = make(model, 1)
            set_grads(model, 0)
            refresh_opt.step()
            row["refresh_step_s"] = time_steps(model, refresh_opt, args.steps)
        except Exception as err:  # a peer that cannot run here is reported, not hidden
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:120]
        rows.append(row)
        model = llama()  # fresh weights for the next candidate
    base = next(r for r in rows if r["optimizer"] == "torch AdamW")
    print(
        f"LLaMA-60M shape ({n_params / 1e6:.1f}M params), rank {RANK}, CPU fp32, {args.threads} threads, "
        f"median of {args.steps} steps, torch {torch.__version__}\n"
    )
    print("| optimizer | state bytes/param | state MiB | retained MiB | step vs AdamW | refresh step vs AdamW |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['optimizer']} | not run: {r['error']} | | | | |")
            continue
        print(
            f"| {r['optimizer']} | {r['state_bytes_per_param']:.3f} | {r['state_bytes'] / 2**20:.1f} | "
            f"{r['retained_bytes'] / 2**20:.1f} | "
            f"{r['step_s'] / base['step_s']:.2f}x | {r['refresh_step_s'] / base['step_s']:.2f}x |"
        )
    print(f"\ntorch AdamW median step: {base['step_s'] * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n_params": n_params, "rows": rows, "threads": args.threads, "steps": args.steps}, f, indent=1)


if __name__ == "__main__":
    main()
