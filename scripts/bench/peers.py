"""Peer benchmark: our optimizers and the peers' on the same model, data, seed and step budget.

    pip install -e ".[bench]"      # galore-torch, apollo-torch, torchao: benchmark only
    python -m scripts.bench.peers --out runs/bench/peers

Protocol (CPU, one intra-op thread so that CPU time measures the work rather than the
contention of a shared machine): a LLaMA of hidden 128, 4 layers, 4 heads, intermediate 352,
vocab 512, float32, built with seed 0; the builtin corpus (``--data builtin``: stdlib
docstrings, byte tokenizer), batch 16 x 64 tokens, the same batches in the same order for
every optimizer; ``--steps`` steps (default 100) with 10% linear warm-up then cosine decay to
10% of the peak lr (the training CLI's schedule); no weight decay; eps 1e-8; the low-rank group
is every linear layer of the decoder (``all-linear``: not the embeddings or the head), rank 32,
refresh gap 25, scale 0.25. Peak learning rates follow the papers' 60M recipes, one per family
(``LR``); ours are built exactly as ``python -m train`` builds them.

Figures: optimizer-state bytes: the storages kept alive by every tensor the optimizer holds for
the parameters (in its state, in projector objects, inside tensor subclasses), each storage
once, and the tensors' own numel x element size (they differ when a state tensor is a view of
a larger matrix); CPU time of ``optimizer.step()`` (and of the whole training step) after the
first ``--skip-timing`` steps, which carry torch.compile costs; their ratio to torch AdamW; final
validation loss over 8 held-out batches. A peer that cannot be imported or fails to run is
listed as not run, with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_optim import available_optimizers, lowrank_param_groups
from scripts.bench.toolkit import retained_bytes, state_bytes
from train.config import TrainConfig
from train.data import build_data
from train.loop import evaluate
from train.model import build_model
from train.optim import make_optimizer, make_scheduler

MODEL = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "vocab_size": 512,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
}
BATCH, SEQ, EVAL_BATCHES, SEED = 16, 64, 8, 0
RANK, GAP, SCALE = 32, 25, 0.25
#: peak lr per family: full-rank Adam 1e-3 and low-rank (GaLore, APOLLO) 1e-2 as in GaLore's and
#: APOLLO's 60M runs; Muon 0.02 (Keller Jordan's default); AuON 0.1 (its tuned range 0.05-0.24)
LR = {"adam": 1e-3, "lowrank": 1e-2, "muon": 0.02, "auon": 0.1}
#: registry names that are the peers' own classes (torch AdamW, bitsandbytes AdamW8bit): run once, as peers
PEER_NAMES = {"adamw", "adamw8bit"}


@dataclass
class Result:
    name: str
    lr: float
    state_bytes: int | None = None
    logical_state_bytes: int | None = None
    step_cpu_s: float | None = None
    train_step_cpu_s: float | None = None
    final_val_loss: float | None = None
    wall_s: float | None = None
    not_run: str | None = None


def _lowrank_groups(model: nn.Module, **keys: Any) -> list[dict[str, Any]]:
    return lowrank_param_groups(
        model, "all-linear", rank=RANK, update_proj_gap=GAP, scale=SCALE, proj_type="std", **keys
    )


def peers() -> dict[str, tuple[float, Callable[[nn.Module, float], torch.optim.Optimizer]]]:
    """Peer name -> (peak lr, constructor); imports happen inside, so a missing peer fails alone."""

    def torch_adamw(m, lr):
        return torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)

    def bnb_adamw8bit(m, lr):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(m.parameters(), lr=lr, weight_decay=0.0)

    def torchao(cls_name):
        def build(m, lr):
            import torchao.optim

            return getattr(torchao.optim, cls_name)(m.parameters(), lr=lr, weight_decay=0.0)

        return build

    def galore_adamw(m, lr):
        import galore_torch

        return galore_torch.GaLoreAdamW(_lowrank_groups(m), lr=lr, weight_decay=0.0, eps=1e-8)

    def galore_adafactor(m, lr):
        import galore_torch

        # fixed lr under the schedule, as GaLore's script (and our CLI) builds it
        return galore_torch.GaLoreAdafactor(
            _lowrank_groups(m), lr=lr, relative_step=False, scale_parameter=False, warmup_init=False
        )

    def apollo(rank, scale_type, scale):
        def build(m, lr):
            import apollo_torch

            groups = lowrank_param_groups(
                m,
                "all-linear",
                rank=rank,
                update_proj_gap=GAP,
                scale=scale,
                proj_type="std",
                proj="random",
                scale_type=scale_type,
            )
            return apollo_torch.APOLLOAdamW(groups, lr=lr, weight_decay=0.0, eps=1e-8)

        return build

    return {
        "torch AdamW": (LR["adam"], torch_adamw),
        "bitsandbytes AdamW8bit": (LR["adam"], bnb_adamw8bit),
        "torchao AdamW8bit": (LR["adam"], torchao("AdamW8bit")),
        "torchao AdamW4bit": (LR["adam"], torchao("AdamW4bit")),
        "galore-torch GaLoreAdamW": (LR["lowrank"], galore_adamw),
        "galore-torch GaLoreAdafactor": (LR["lowrank"], galore_adafactor),
        # APOLLO's README settings: rank as GaLore, channel-wise scaling, scale 1; Mini: rank 1, tensor, 128
        "apollo-torch APOLLO": (LR["lowrank"], apollo(RANK, "channel", 1.0)),
        "apollo-torch APOLLO-Mini": (LR["lowrank"], apollo(1, "tensor", 128.0)),
    }


def _config(optimizer: str, lr: float, steps: int, model_config: str) -> TrainConfig:
    return TrainConfig(
        model_config=model_config,
        optimizer=optimizer,
        lr=lr,
        rank=RANK,
        update_proj_gap=GAP,
        scale=SCALE,
        weight_decay=0.0,
        max_steps=steps,
        warmup_steps=steps // 10,
        batch_size=BATCH,
        seq_len=SEQ,
        seed=SEED,
    )


def ours(steps: int, model_config: str) -> dict[str, tuple[float, Callable[[nn.Module, float], torch.optim.Optimizer]]]:
    """Every registry optimizer except the peers' classes, built as the training CLI builds it."""
    from lowmem_optim.registry import LOWRANK_OPTIMIZERS

    def family(name: str) -> str:
        if name in LOWRANK_OPTIMIZERS:
            return "lowrank"
        return "muon" if name == "muon" else "auon" if "auon" in name else "adam"

    return {
        f"lowmem_optim {name}": (
            LR[family(name)],
            lambda m, lr, name=name: make_optimizer(_config(name, lr, steps, model_config), m),
        )
        for name in available_optimizers()
        if name not in PEER_NAMES
    }


def run_one(name: str, lr: float, build: Callable, data: Any, steps: int, skip: int, model_config: str) -> Result:
    model = build_model(
        model_config,
        dtype=torch.float32,
        device=torch.device("cpu"),
        seed=SEED,
        vocab_needed=data.tokenizer.vocab_size,
        seq_len=SEQ,
    )
    data.train.load_state_dict({"position": 0})
    step_cpu = train_cpu = 0.0
    wall = time.perf_counter()
    try:
        optimizer = build(model, lr)
        scheduler = make_scheduler(_config("adamw", lr, steps, model_config), optimizer)
        for step in range(1, steps + 1):
            t0 = time.thread_time()
            batch = data.train.next_batch()
            model(input_ids=batch, labels=batch).loss.backward()
            t1 = time.thread_time()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            t2 = time.thread_time()
            if step > skip:
                step_cpu += t2 - t1
                train_cpu += t2 - t0
    except Exception as err:  # a peer that does not install or run here: listed with the reason
        return Result(name, lr, not_run=f"{type(err).__name__}: {err}"[:200])
    timed = steps - skip
    return Result(
        name,
        lr,
        state_bytes=retained_bytes(optimizer),
        logical_state_bytes=state_bytes(optimizer),
        step_cpu_s=step_cpu / timed,
        train_step_cpu_s=train_cpu / timed,
        final_val_loss=evaluate(model, data.val, torch.device("cpu")),
        wall_s=time.perf_counter() - wall,
    )


def markdown(results: list[Result]) -> str:
    base = next((r for r in results if r.name == "torch AdamW" and not r.not_run), None)

    def ratio(value: float, of: str) -> str:
        return f"{value / getattr(base, of):.2f}" if base else "-"

    lines = [
        "| optimizer | peak lr | state (KiB) | state / AdamW | tensor bytes (KiB) | optimizer step (ms CPU) "
        "| step time / AdamW | train step / AdamW | final val loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.not_run:
            lines.append(f"| {r.name} | {r.lr:g} | not run: {r.not_run} | | | | | | |")
            continue
        lines.append(
            f"| {r.name} | {r.lr:g} | {r.state_bytes / 1024:.1f} | {ratio(r.state_bytes, 'state_bytes')} "
            f"| {r.logical_state_bytes / 1024:.1f} | {r.step_cpu_s * 1e3:.2f} "
            f"| {ratio(r.step_cpu_s, 'step_cpu_s')} | {ratio(r.train_step_cpu_s, 'train_step_cpu_s')} "
            f"| {r.final_val_loss:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--skip-timing", type=int, default=5, help="first steps left out of the timings")
    parser.add_argument("--only", nargs="*", default=None, help="run only these names (substring match)")
    parser.add_argument("--out", default="runs/bench/peers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_config = out / "model.json"
    model_config.write_text(json.dumps(MODEL, indent=2))
    data = build_data("builtin", None, SEQ, BATCH, seed=SEED, val_fraction=0.05, eval_batches=EVAL_BATCHES)
    candidates = {**peers(), **ours(args.steps, str(model_config))}
    (out / "results.jsonl").write_text("")
    results = []
    for name, (lr, build) in candidates.items():
        if args.only and not any(s in name for s in args.only):
            continue
        result = run_one(name, lr, build, data, args.steps, args.skip_timing, str(model_config))
        results.append(result)
        print(json.dumps(vars(result)), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(vars(result)) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
