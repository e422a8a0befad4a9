"""A training recipe's step against the floor: tokens/s as a fraction of it, peak memory, and where the time goes.

Protocol (one process, the recipe's own flags: those of ``python -m train``):
- The floor: the same model (``--model-config``), bfloat16 weights, ``--activation-checkpointing``
  as given, the same micro-batch (``--batch-size`` x ``--seq-len``), no optimizer: every gradient
  is dropped by a post-accumulate hook as it arrives. What no optimizer of this kind can beat.
- Ours: the model and optimizer as ``python -m train`` builds them from the flags (INT8 weights,
  the optimizer and its groups, layer-wise hooks, accumulation over ``--total-batch-size``).
- Both: random tokens (seeded; labels = inputs), ``--max-steps`` steps each; step 1 (for ours: the
  first subspace refresh of every matrix) is reported alone, tokens/s and the split are over the
  steps after it. CUDA: ``torch.cuda.synchronize()`` around each step,
  ``reset_peak_memory_stats()`` after building, ``max_memory_allocated`` and
  ``max_memory_reserved`` over the steps (with the memory model's prediction for ours); the split
  comes from CUDA events recorded around
  forward, backward (layer-wise updates run inside it), the optimizer's per-parameter update and,
  within it, the projector's refresh / project / back-project, the inner rule, the INT8
  dequantize and apply_update (nested parts are included in their parents). CPU: wall time.
- Written to ``<--output-dir>/step_split.json`` and printed. No checkpoint, no data set.

Usage (the 7B recipe, its flags unchanged):
  ENTRY=scripts.bench.step_split STEPS=4 bash scripts/pretrain_llama7b.sh --proj-method=randomized_svd
  SMOKE=1 ENTRY=scripts.bench.step_split bash scripts/pretrain_llama7b.sh   # tiny, on CPU
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from lowmem_optim.engine import ComposedOptimizer
from lowmem_optim.projection import PROJECTORS
from lowmem_optim.quant.int8_linear import Int8Weight
from lowmem_optim.rules import RULES
from lowmem_optim.tools.llama_config import load_llama_config
from scripts.bench.toolkit import peak_memory, predicted_memory, recipe, reset_peak_memory, sync
from train.config import TrainConfig, parse_args
from train.model import run_model


class PartTimer:
    """Seconds spent in named parts: CUDA events on CUDA (no host wait while recording), wall time elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._marks: dict[str, list[Any]] = defaultdict(list)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            stop.record()
            self._marks[name].append((start, stop))
        else:
            begin = time.perf_counter()
            yield
            self._marks[name].append(time.perf_counter() - begin)

    def wrapped(self, owner: type, attr: str, name: str) -> contextlib.AbstractContextManager:
        """``owner.attr`` timed as ``name`` while the returned context is open."""
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return original(*args, **kwargs)

        return mock.patch.object(owner, attr, timed)

    def seconds(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1000 for k, v in self._marks.items()}
        return {k: sum(v) for k, v in self._marks.items()}

    def clear(self) -> None:
        self._marks.clear()


def _run_steps(
    step: Callable[[], None], steps: int, tokens_per_step: int, device: torch.device, timer: PartTimer
) -> dict[str, Any]:
    """Step 1 alone, then tokens/s and the split over the others."""
    sync(device)
    begin = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - begin
    timer.clear()
    begin = time.perf_counter()
    for _ in range(steps - 1):
        step()
    sync(device)
    elapsed = time.perf_counter() - begin
    timed = max(steps - 1, 1)
    return {
        "first_step_s": first,
        "step_s": elapsed / timed,
        "tokens_per_s": tokens_per_step * timed / elapsed,
        "parts_s_per_step": {k: v / timed for k, v in sorted(timer.seconds().items())},
        **peak_memory(device),
    }


def _tokens(cfg: TrainConfig, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=g).to(device)


def floor(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Forward and backward of the same model and micro-batch in bfloat16, gradients dropped."""
    vocab = load_llama_config(cfg.model_config)["vocab_size"]
    model = run_model(dataclasses.replace(cfg, dtype="bfloat16", weight_bits=16, init_from=None), device, vocab)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    tokens = _tokens(cfg, vocab, device)
    timer = PartTimer(device)

    def step() -> None:
        with timer.part("forward"):
            loss = model(input_ids=tokens, labels=tokens).loss
        with timer.part("backward"):
            loss.backward()

    reset_peak_memory(device)
    return _run_steps(step, cfg.max_steps, cfg.batch_size * cfg.seq_len, device, timer)


def ours(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The recipe's model, optimizer and stepping, each part timed."""
    model, optimizer, handle, accum = recipe(cfg, device)
    tokens = _tokens(cfg, load_llama_config(cfg.model_config)["vocab_size"], device)
    timer = PartTimer(device)

    def step() -> None:
        for _ in range(accum):
            with timer.part("forward"):
                loss = model(input_ids=tokens, labels=tokens).loss
            with timer.part("backward"):
                (loss / accum).backward()
        if handle is None:
            with timer.part("optimizer.step"):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    parts = {
        (ComposedOptimizer, "step_param"): "update",
        (Int8Weight, "dequantized"): "int8 dequantize",
        (Int8Weight, "apply_update"): "int8 apply_update",
    }
    for kind, registry in (("projector", PROJECTORS), ("rule", RULES)):
        for cls in registry.values():
            for attr in ("refresh", "project", "back_project", "update"):
                owner = next((k for k in cls.__mro__ if attr in k.__dict__), None)
                if owner is not None:
                    parts[owner, attr] = f"{kind} {attr}"
    reset_peak_memory(device)
    with contextlib.ExitStack() as stack:
        for (owner, attr), name in parts.items():
            stack.enter_context(timer.wrapped(owner, attr, name))
        out = _run_steps(step, cfg.max_steps, cfg.batch_size * cfg.seq_len * accum, device, timer)
    if handle is not None:
        handle.remove()
    out["accumulation_steps"] = accum
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the training CLI sets it
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": cfg.to_dict(),
    }
    result["floor"] = floor(cfg, device)
    result["ours"] = ours(cfg, device)
    result["tokens_per_s_vs_floor"] = result["ours"]["tokens_per_s"] / result["floor"]["tokens_per_s"]
    result["predicted_peak_bytes"] = predicted_memory(cfg).total_bytes
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_split.json").write_text(json.dumps(result, indent=1))
    gib = 2.0**30
    for name in ("floor", "ours"):
        r = result[name]
        peak = (
            "" if r["peak_allocated_bytes"] is None else f", peak allocated {r['peak_allocated_bytes'] / gib:.2f} GiB"
        )
        peak += "" if r["peak_reserved_bytes"] is None else f", reserved {r['peak_reserved_bytes'] / gib:.2f} GiB"
        first = f"first {r['first_step_s']:.2f} s"
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, step {r['step_s']:.3f} s ({first}){peak}")
        for part, seconds in r["parts_s_per_step"].items():
            print(f"    {part:<24} {seconds:.4f} s/step")
    predicted = result["predicted_peak_bytes"] / gib
    print(f"ours / floor: {result['tokens_per_s_vs_floor']:.3f}; memory model's peak for ours: {predicted:.3f} GiB")
    return result


if __name__ == "__main__":
    main()
