"""The training loop: read it top to bottom.

    setup -> data -> model -> optimizer + schedule -> (resume) -> for each step:
        accumulate gradients over micro-batches -> clip -> step -> log -> evaluate -> save

Components live in their own files (config, data, model, optim, distributed, checkpoint,
metrics); this file only wires them, like nanoGPT's train.py.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lowmem_optim.tools.llama_config import SIZING_KEYS, load_llama_config
from train import RunStopped, checkpoint, distributed, outdir, preemption, resumption
from train.config import RESUMABLE_CHANGES, TrainConfig
from train.data import Data, fingerprint, run_data
from train.metrics import Metrics, peak_memory, perplexity
from train.model import count_parameters, pretrained_config, run_model
from train.optim import make_optimizer, make_scheduler, matrix_weights, optimizer_state_bytes, state_bytes


def accumulation_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step: --total-batch-size / (--batch-size x processes)."""
    per_micro = cfg.batch_size * world
    total = cfg.total_batch_size or per_micro
    if total % per_micro:
        raise ValueError(
            f"Invalid --total-batch-size: {total} (allowed: a multiple of --batch-size x processes "
            f"= {cfg.batch_size} x {world})"
        )
    return total // per_micro


def check_resumable(
    cfg: TrainConfig, model_config: dict[str, Any], data_fingerprint: str, resumed: dict[str, Any]
) -> None:
    """A resumed run must train the same thing: the same flags (only logging, saving, the
    length and the paths may change; the run's shape as :mod:`train.resumption` allows), the
    same model config contents and the same data."""
    saved = resumed["config"]
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(
            f"--resume: the checkpoint was trained with other settings ({diffs}); "
            "resume with the same settings or start a new --output-dir"
        )
    before = resumed["model_config"]
    keys = sorted(
        k for k in before.keys() | model_config.keys() if before.get(k, before) != model_config.get(k, before)
    )
    if keys:
        shown = [[repr(config[k]) if k in config else "(unset)" for config in (before, model_config)] for k in keys]
        diffs = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in zip(keys, shown))
        raise ValueError(
            f"--resume: --model-config {cfg.model_config!r} differs from the config the checkpoint was "
            f"trained with ({diffs}); resume with the same model or start a new --output-dir"
        )
    if resumed["data_fingerprint"] != data_fingerprint:
        raise ValueError(
            f"--resume: --data {cfg.data!r} is not the data the checkpoint was trained on (its contents "
            f"changed: {resumed['data_fingerprint']} -> {data_fingerprint}); resume with the same data "
            "or start a new --output-dir"
        )


def attach_layerwise(cfg: TrainConfig, optimizer: torch.optim.Optimizer, accum: int, d: distributed.Dist) -> Any:
    """Layer-wise updates (lowmem_optim.layerwise): each parameter stepped in its gradient hook.
    --grad-clip then clips each parameter's gradient by its own norm (a global norm would need
    every gradient before the first update). With accumulation, the projected parameters of our
    optimizers sum their projected gradients in --accumulation-buffer buffers (low-rank
    accumulation); other optimizers accumulate whole gradients, as without --layerwise."""
    import torch.distributed as torch_dist

    from lowmem_optim import layerwise

    buffer = cfg.accumulation_buffer if hasattr(optimizer, "finish_step") else "full"
    if accum > 1 and buffer != "full" and cfg.lowrank_flags().get("error_feedback") is not None:
        raise ValueError(
            f"--error-feedback {cfg.error_feedback} with --layerwise and {accum} micro-batches per step needs "
            f"--accumulation-buffer full: the feedback needs each step's whole gradient, which --accumulation-buffer "
            f"{buffer} never holds"
        )
    return layerwise.attach(
        optimizer,
        accumulation_steps=accum,
        max_grad_norm=cfg.grad_clip or None,
        process_group=torch_dist.group.WORLD if d.world > 1 else None,
        accumulation_buffer=buffer,
    )


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
    finished = False
    try:
        with preemption.handled():
            records = run(cfg, d).records
        finished = True
        return records
    finally:
        distributed.teardown(d, finished)


def run(cfg: TrainConfig, d: distributed.Dist) -> Trained:
    """The whole run in this process (``d`` from :func:`train.distributed.setup`)."""
    out = Path(cfg.output_dir)
    accum = accumulation_steps(cfg, d.world)
    with outdir.claimed(out, resume=cfg.resume) if d.is_main else nullcontext():
        distributed.barrier()
        return _run(cfg, d, out, accum)


def _run(cfg: TrainConfig, d: distributed.Dist, out: Path, accum: int) -> Trained:
    """Builds the run (or restores it from its newest checkpoint) and trains it."""
    config_path = pretrained_config(cfg.init_from, cfg.model_config) if cfg.init_from else cfg.model_config
    model_config = load_llama_config(config_path)
    data_fingerprint = fingerprint(cfg.data)

    # ---- resume or start: the newest intact checkpoint, which must have trained the same thing ----
    last = _resume_point(out, d) if cfg.resume else None
    resumed = checkpoint.load(last, verified=True) if last is not None else None
    changed = {}
    if resumed is not None:
        check_resumable(cfg, model_config, data_fingerprint, resumed)
        changed = resumption.check(resumed["config"], cfg.to_dict(), d.world, allowed=cfg.allow_resume_changes)

    # ---- data, model, optimizer, schedule ----
    data = run_data(cfg, d.rank, d.world, d.device)
    model = _build_model(cfg, d, data, config_path)
    n_params = count_parameters(model)
    matrices = matrix_weights(model, cfg)
    # layer-wise steps run inside backward, before DDP would all-reduce: their hooks average
    # each gradient over the ranks themselves, so the model is not wrapped in DDP
    model = model if cfg.layerwise else distributed.wrap(model, cfg.parallel, d)
    optimizer = _build_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)

    start = _restore(resumed, model, optimizer, scheduler, data) if resumed is not None else 0
    del resumed  # the loaded tensors now live in the model and optimizer

    if d.device.type == "cuda":  # peak memory counts training, not building and converting the model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d.device)

    run_config = {
        **cfg.to_dict(),
        "world_size": d.world,
        "accumulation_steps": accum,
        "n_params": n_params,
        "matrix_params": sum(p.numel() for p in matrices),
        "tokenizer": data.tokenizer.name,
        "model": _model_config(model),
        "history": resumption.history(out, start, changed) if cfg.resume and d.is_main else [],
    }
    metrics = Metrics(
        out,
        run_config,
        enabled=d.is_main,
        wandb_mode=cfg.wandb,
        project=cfg.wandb_project,
        run_name=cfg.run_name or out.name,
        resume_step=start if cfg.resume else None,
    )
    wiring = Wiring(
        cfg=cfg,
        d=d,
        out=out,
        accum=accum,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=data,
        metrics=metrics,
        progress=_progress_bar(cfg, start, enabled=d.is_main),
        model_config=model_config,
        data_fingerprint=data_fingerprint,
        matrices=matrices,
    )
    layerwise = attach_layerwise(cfg, optimizer, accum, d) if cfg.layerwise else None
    try:
        _loop(wiring, start, last)
    finally:
        if layerwise is not None:
            layerwise.remove()
        data.train.close()
        wiring.progress.close()
        metrics.close()
    return Trained(metrics.records, model, optimizer)


def _build_model(cfg: TrainConfig, d: distributed.Dist, data: Data, config_path: str) -> nn.Module:
    """The model as configured (:func:`train.model.run_model`), its vocabulary sized for the data."""
    return run_model(cfg, d.device, data.tokenizer.vocab_size, config_path)


def _build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the (possibly wrapped) model's parameters; with FSDP2 the error names
    the sharding when the optimizer cannot take sharded parameters."""
    try:
        optimizer = make_optimizer(cfg, distributed.unwrap(model))
        if distributed.is_sharded(model):
            distributed.check_shardable(optimizer)
    except ValueError as err:
        if distributed.is_sharded(model):
            raise ValueError(
                f"--parallel fsdp: --optimizer {cfg.optimizer} cannot take FSDP2-sharded parameters: {err}"
            ) from err
        raise
    return optimizer


def _restore(
    resumed: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, data: Data
) -> int:
    """Loads a checkpoint's model, optimizer, schedule, data position and RNG; its step."""
    distributed.load_full_state_dicts(model, optimizer, resumed["model"], resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    data.train.load_state_dict(resumed["data"])
    checkpoint.set_rng_state(resumed["rng"])
    return int(resumed["step"])


@dataclass
class Wiring:
    """What the loop drives, built once by :func:`_run`."""

    cfg: TrainConfig
    d: distributed.Dist
    out: Path
    accum: int  # micro-batches per optimizer step
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Data
    metrics: Metrics
    progress: Any  # a tqdm bar
    model_config: dict[str, Any]  # saved with each checkpoint, checked on --resume
    data_fingerprint: str
    matrices: list[torch.Tensor]  # the weights --target-modules selects (train.optim.matrix_weights)


def _loop(w: Wiring, start: int, last_good: Path | None) -> None:
    """Steps ``start + 1 .. cfg.max_steps``. The loss stays on the device: it is read (one sync)
    only on logging and saving steps, together with the first step since the previous read whose
    loss was not finite, so a step costs no host sync (``--on-nonfinite skip`` syncs each step)."""
    cfg, d = w.cfg, w.d
    tokens_per_step = cfg.batch_size * cfg.seq_len * w.accum * d.world
    skip = cfg.on_nonfinite == "skip"
    first_bad = torch.zeros((), dtype=torch.int64, device=d.device)  # 0: every loss since the last read was finite
    skipped = 0
    w.model.train()
    clock, steps_timed = time.perf_counter(), 0
    for step in range(start + 1, cfg.max_steps + 1):
        lr = w.optimizer.param_groups[0]["lr"]
        try:
            loss = train_step(w)
        except FloatingPointError as err:  # a subspace refresh met non-finite gradients
            raise RunStopped(f"step {step}: {err}. {_last_good(last_good)}") from err
        if loss is None:
            skipped += 1
            loss = torch.full((), math.nan, device=d.device)
        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss), step, first_bad)
        w.scheduler.step()
        steps_timed += 1

        stop_signal = preemption.requested(d) if step < cfg.max_steps else None
        evaluating = step % cfg.eval_every == 0 or step == cfg.max_steps
        logging = evaluating or step % cfg.log_every == 0
        saving = cfg.save and (
            (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps or stop_signal is not None
        )
        if not (logging or saving or stop_signal):
            continue
        loss_value, bad_step = _read_loss(loss, first_bad, d)  # the one sync of this interval
        first_bad.zero_()
        if logging:
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            elapsed = time.perf_counter() - clock
            record: dict[str, Any] = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "tokens_per_s": steps_timed * tokens_per_step / elapsed,
                **{k: distributed.max_over_ranks(v, d.device) for k, v in peak_memory(d.device).items()},
                "opt_state_bytes": optimizer_state_bytes(w.optimizer),
                "matrix_state_bytes": state_bytes(w.optimizer, w.matrices),
            }
            if skip:
                record["skipped_steps"], skipped = skipped, 0
            if evaluating and not (bad_step and not skip):
                _evaluate_into(w, record)
            w.metrics.log(record)
            w.progress.update(step - w.progress.n)
            w.progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if bad_step and not skip:
            raise RunStopped(
                f"step {bad_step}: the loss is not finite; stopped without saving. {_last_good(last_good)} "
                "(continue from it with --resume, e.g. with a lower --lr; or pass --on-nonfinite skip "
                "to skip such steps)"
            )
        if saving:
            last_good = _save(w, step, last_good)
        if stop_signal:
            saved = f"saved {str(last_good)!r}" if saving else "not saved (--save False)"
            raise preemption.RunPreempted(
                f"preempted by {stop_signal} after step {step}: {saved}; continue the run with --resume"
            )
        clock, steps_timed = time.perf_counter(), 0  # tokens/s covers training only, not evaluation and saving


def step_inputs(
    cfg: TrainConfig, d: distributed.Dist, accum: int, model: nn.Module, optimizer: Any, *, stream: Any
) -> SimpleNamespace:
    """What :func:`train_step` reads of a :class:`Wiring`, for a probe that runs the loop's own step
    outside the loop (:mod:`train.memory_trace`, ``scripts/bench/recipe_step.py``); ``stream``: the
    training batches (``next_batch()``)."""
    data = SimpleNamespace(train=stream)
    return SimpleNamespace(cfg=cfg, d=d, accum=accum, model=model, optimizer=optimizer, data=data)


def train_step(w: Wiring) -> torch.Tensor | None:
    """One optimizer step over ``w.accum`` micro-batches; its mean loss, still on the device
    (None: skipped under ``--on-nonfinite skip``, its loss or gradients not finite). Reads only
    what :func:`step_inputs` holds, so a probe of the step runs this one."""
    cfg, d, accum, model, optimizer = w.cfg, w.d, w.accum, w.model, w.optimizer
    loss_sum = torch.zeros((), dtype=torch.float32, device=d.device)
    for micro in range(accum):
        batch = w.data.train.next_batch().to(d.device)
        with distributed.gradient_sync(model, enabled=micro == accum - 1):
            loss = model(input_ids=batch, labels=batch).loss
            (loss / accum).backward()
        loss_sum += loss.detach().float()
    loss = loss_sum / accum
    if cfg.layerwise:  # every parameter was stepped (and clipped) inside backward
        return loss
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
    stepping = cfg.on_nonfinite == "stop" or _finite_step(model, loss, grad_norm)
    if stepping:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss if stepping else None


def _evaluate_into(w: Wiring, record: dict[str, Any]) -> None:
    """Adds the validation loss and perplexity to ``record``; logs the optimizer's per-layer
    statistics where it keeps them."""
    record["val_loss"] = evaluate(w.model, w.data.val, w.d.device)
    record["val_ppl"] = perplexity(record["val_loss"])
    if hasattr(w.optimizer, "layer_stats"):
        w.metrics.log_layers(record["step"], w.optimizer.layer_stats())


def _save(w: Wiring, step: int, last_good: Path | None) -> Path | None:
    """Saves step ``step`` if the weights and optimizer state are finite; the new last good
    checkpoint (rank 0 writes it; every rank returns its path)."""
    if not _state_is_finite(w.model, w.optimizer, w.d):
        raise RunStopped(
            f"step {step}: the weights or optimizer state are not finite; not saved. {_last_good(last_good)}"
        )
    model_state, optim_state = distributed.full_state_dicts(w.model, w.optimizer)
    if w.d.is_main:
        try:
            payload = {
                "step": step,
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": w.scheduler.state_dict(),
                "data": w.data.train.state_dict(),
                "rng": checkpoint.rng_state(),
                "config": {**w.cfg.to_dict(), "world_size": w.d.world},
                "model_config": w.model_config,
                "data_fingerprint": w.data_fingerprint,
            }
            last_good = checkpoint.save(w.out, step, payload, keep=w.cfg.keep_checkpoints)
        except OSError as err:  # a full disk, no permission: the previous checkpoints are intact
            raise RunStopped(f"step {step}: {err.strerror or err}") from err
        except ValueError as err:  # the file read back does not match what was written
            raise RunStopped(f"step {step}: {err}") from err
    distributed.barrier()
    return checkpoint.path_of(w.out, step)


def _resume_point(out: Path, d: distributed.Dist) -> Path | None:
    """The newest intact checkpoint (rank 0 verifies, the others take its answer); newer corrupt
    ones are named on stderr and left as they are."""
    found: list[Any] = [None, None]
    if d.is_main:
        try:
            path, failures = checkpoint.newest_intact(out)
            found = [str(path) if path else None, None]
            for reason in failures:
                print(f"note: skipping a corrupt checkpoint: {reason}", file=sys.stderr)
            if failures and path is not None:
                print(f"note: resuming from {str(path)!r}, the newest intact checkpoint", file=sys.stderr)
        except ValueError as err:
            found = [None, str(err)]
    found = distributed.broadcast_from_main(found)
    if found[1] is not None:
        raise ValueError(found[1])
    return Path(found[0]) if found[0] else None


def _read_loss(loss: torch.Tensor, first_bad: torch.Tensor, d: distributed.Dist) -> tuple[float, int]:
    """(this step's loss averaged over ranks, the first step since the previous read whose loss
    was not finite on some rank, or 0): one device-to-host copy, one collective."""
    pair = torch.stack([loss.double(), torch.where(first_bad == 0, math.inf, first_bad.double())])
    rows = distributed.gather_from_ranks(pair).tolist()
    bad = min(row[1] for row in rows)
    return sum(row[0] for row in rows) / len(rows), 0 if math.isinf(bad) else int(bad)


def _finite_step(model: nn.Module, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    """Whether this step's loss and gradients are finite on every rank (``--on-nonfinite skip``:
    one sync per step)."""
    if grad_norm is None:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device))
    return bool(distributed.gather_from_ranks(finite.double().reshape(1)).min())


@torch.no_grad()
def _state_is_finite(model: nn.Module, optimizer: torch.optim.Optimizer, d: distributed.Dist) -> bool:
    """Whether every float tensor of the weights (this rank's shards) and of the optimizer state
    is finite: one sync. (Plain numbers in the state are bookkeeping, e.g. a NaN "none yet".)"""
    checks = []
    states = [distributed.unwrap(model).state_dict(), *optimizer.state.values()]
    for value in (v for state in states for v in state.values()):
        local = value.to_local() if hasattr(value, "to_local") else value
        if torch.is_tensor(local) and local.is_floating_point() and local.numel():
            checks.append(torch.isfinite(local).all().to(d.device))
    finite = torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool, device=d.device)
    return bool(distributed.gather_from_ranks(finite.double().reshape(1)).min())


def _last_good(path: Path | None) -> str:
    return f"Last good checkpoint: {str(path)!r}" if path is not None else "Last good checkpoint: none yet"


def _model_config(model: nn.Module) -> dict[str, Any]:
    config = distributed.unwrap(model).config
    return {k: getattr(config, k) for k in SIZING_KEYS}


def _progress_bar(cfg: TrainConfig, start: int, *, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=cfg.max_steps,
        initial=start,
        disable=not (enabled and cfg.progress),
        dynamic_ncols=True,
        desc=Path(cfg.output_dir).name,
    )
