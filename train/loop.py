"""The training loop: read it top to bottom.

    setup -> data -> model -> optimizer + schedule -> (resume) -> for each step:
        accumulate gradients over micro-batches -> clip -> step -> log -> evaluate -> save

Components live in their own files (config, data, model, optim, distributed, checkpoint,
metrics); this file only wires them, like nanoGPT's train.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train import checkpoint, distributed
from train.config import RESUMABLE_CHANGES, TrainConfig
from train.data import Data, build_data
from train.metrics import Metrics, peak_memory
from train.model import build_model, count_parameters, quantize_weights
from train.optim import make_optimizer, make_scheduler, optimizer_state_bytes, target_modules


def accumulation_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step: --total-batch-size / (--batch-size x processes)."""
    per_micro = cfg.batch_size * world
    total = cfg.total_batch_size or per_micro
    if total % per_micro:
        raise ValueError(f"Invalid --total-batch-size: {total} (allowed: a multiple of --batch-size x processes "
                         f"= {cfg.batch_size} x {world})")
    return total // per_micro


def check_resumable(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    """A resumed run must train the same thing; only logging, saving and the length may change."""
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"--resume: the checkpoint was trained with other settings ({diffs}); "
                         "resume with the same settings or start a new --output-dir")


def attach_layerwise(optimizer: torch.optim.Optimizer, accum: int, grad_clip: float, d: distributed.Dist) -> Any:
    """Layer-wise updates (lowmem_optim.layerwise): each parameter stepped in its gradient hook.
    --grad-clip then clips each parameter's gradient by its own norm (a global norm would need
    every gradient before the first update)."""
    import torch.distributed as torch_dist

    from lowmem_optim import layerwise

    return layerwise.attach(optimizer, accumulation_steps=accum, max_grad_norm=grad_clip or None,
                            process_group=torch_dist.group.WORLD if d.world > 1 else None)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    """Mean loss over this rank's validation batches, averaged over ranks."""
    model.eval()
    losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.item() for b in batches]
    model.train()
    return distributed.mean_over_ranks(sum(losses) / len(losses), device)


@dataclass
class Trained:
    records: list[dict[str, Any]]  # the metrics records (rank 0; empty on other ranks)
    model: nn.Module  # as trained: wrapped in DDP, or sharded by FSDP2
    optimizer: torch.optim.Optimizer


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train as ``cfg`` says; returns the metrics records (on rank 0; empty on other ranks)."""
    d = distributed.setup()
    try:
        return run(cfg, d).records
    finally:
        distributed.teardown(d)


def run(cfg: TrainConfig, d: distributed.Dist) -> Trained:
    """The whole run in this process (``d`` from :func:`train.distributed.setup`)."""
    out = Path(cfg.output_dir)
    accum = accumulation_steps(cfg, d.world)
    dtype = getattr(torch, cfg.torch_dtype_name)

    # ---- resume or start: never train over someone's checkpoints by accident ----
    last = checkpoint.latest(out)
    if last is not None and not cfg.resume:
        raise ValueError(f"{str(out)!r} already holds checkpoints ({last.name}); pass --resume to continue "
                         "that run, or choose another --output-dir")
    resumed = checkpoint.load(last) if last is not None else None
    if resumed is not None:
        check_resumable(cfg, resumed["config"])

    # ---- data, model, optimizer, schedule ----
    data: Data = build_data(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                            val_fraction=cfg.val_fraction, eval_batches=cfg.eval_batches, rank=d.rank, world=d.world,
                            device=d.device)
    model = build_model(cfg.model_config, dtype=dtype, device=d.device, seed=cfg.seed,
                        vocab_needed=data.tokenizer.vocab_size, seq_len=cfg.seq_len,
                        activation_checkpointing=cfg.activation_checkpointing)
    if cfg.weight_bits == 8:
        model = quantize_weights(model, target_modules(cfg.target_modules))
    n_params = count_parameters(model)
    # layer-wise steps run inside backward, before DDP would all-reduce: their hooks average
    # each gradient over the ranks themselves, so the model is not wrapped in DDP
    model = model if cfg.layerwise else distributed.wrap(model, cfg.parallel, d)
    try:
        optimizer = make_optimizer(cfg, distributed.unwrap(model))
        if distributed.is_sharded(model):
            distributed.check_shardable(optimizer)
    except ValueError as err:
        if distributed.is_sharded(model):
            raise ValueError(f"--parallel fsdp: --optimizer {cfg.optimizer} cannot take FSDP2-sharded parameters: "
                             f"{err}") from err
        raise
    scheduler = make_scheduler(cfg, optimizer)
    layerwise = attach_layerwise(optimizer, accum, cfg.grad_clip, d) if cfg.layerwise else None

    start = 0
    if resumed is not None:
        distributed.load_full_state_dicts(model, optimizer, resumed["model"], resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        data.train.load_state_dict(resumed["data"])
        checkpoint.set_rng_state(resumed["rng"])
        start = int(resumed["step"])
        del resumed  # the loaded tensors now live in the model and optimizer

    if d.device.type == "cuda":  # peak memory counts training, not building and converting the model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d.device)

    run_config = {**cfg.to_dict(), "world_size": d.world, "accumulation_steps": accum, "n_params": n_params,
                  "tokenizer": data.tokenizer.name, "model": _model_config(model)}
    metrics = Metrics(out, run_config, enabled=d.is_main, wandb_mode=cfg.wandb, project=cfg.wandb_project,
                      run_name=cfg.run_name or out.name, resume_step=start if start else None)
    progress = _progress_bar(cfg, start, enabled=d.is_main)
    tokens_per_step = cfg.batch_size * cfg.seq_len * accum * d.world

    # ---- the loop ----
    model.train()
    clock, steps_timed = time.perf_counter(), 0
    for step in range(start + 1, cfg.max_steps + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = 0.0
        for micro in range(accum):
            batch = data.train.next_batch().to(d.device)
            with distributed.gradient_sync(model, enabled=micro == accum - 1):
                loss = model(input_ids=batch, labels=batch).loss
                (loss / accum).backward()
            loss_sum += loss.item()
        if layerwise is None:  # layer-wise: every parameter was stepped (and clipped) in backward
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        steps_timed += 1

        evaluating = step % cfg.eval_every == 0 or step == cfg.max_steps
        logging = evaluating or step % cfg.log_every == 0
        saving = cfg.save and ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps)
        if logging:
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            elapsed = time.perf_counter() - clock
            record: dict[str, Any] = {
                "step": step,
                "loss": distributed.mean_over_ranks(loss_sum / accum, d.device),
                "lr": lr,
                "tokens_per_s": steps_timed * tokens_per_step / elapsed,
                **{k: distributed.max_over_ranks(v, d.device) for k, v in peak_memory(d.device).items()},
                "opt_state_bytes": optimizer_state_bytes(optimizer),
            }
            if evaluating:
                record["val_loss"] = evaluate(model, data.val, d.device)
                record["val_ppl"] = math.exp(min(record["val_loss"], 80.0))  # exp overflows past ~709
                if hasattr(optimizer, "layer_stats"):
                    metrics.log_layers(step, optimizer.layer_stats())
            metrics.log(record)
            progress.update(step - progress.n)
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if saving:
            model_state, optim_state = distributed.full_state_dicts(model, optimizer)
            if d.is_main:
                checkpoint.save(out, step, {
                    "step": step, "model": model_state, "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(), "data": data.train.state_dict(),
                    "rng": checkpoint.rng_state(), "config": cfg.to_dict(),
                }, keep=cfg.keep_checkpoints)
            distributed.barrier()
        if logging or saving:  # tokens/s covers training only, not evaluation and saving
            clock, steps_timed = time.perf_counter(), 0

    if layerwise is not None:
        layerwise.remove()
    data.train.close()
    progress.close()
    metrics.close()
    return Trained(metrics.records, model, optimizer)


def _model_config(model: nn.Module) -> dict[str, Any]:
    config = distributed.unwrap(model).config
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "max_position_embeddings")
    return {k: getattr(config, k) for k in keys}


def _progress_bar(cfg: TrainConfig, start: int, *, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=start, disable=not (enabled and cfg.progress),
                dynamic_ncols=True, desc=Path(cfg.output_dir).name)
