"""A training recipe's step measured: peak memory against the memory model, time per part, and
tokens/s against the floor.

Protocol (one process; the flags of ``python -m train``, ``--dtype`` bfloat16 unless given, and
``--device``, ``--floor``, ``--cpu-peak``, ``--vocab-size``, which replaces the config's vocabulary):
- Ours: model and optimizer as ``python -m train`` builds them (:func:`scripts.bench.toolkit.recipe`:
  INT8 weights, optimizer groups, layer-wise hooks, accumulation over ``--total-batch-size``).
  The floor (``--floor``): the same model and micro-batch in bfloat16, no optimizer, every gradient
  dropped as it arrives (a post-accumulate hook): what no optimizer of this kind can beat.
- Both: ``--max-steps`` runs of the training loop's own step (:func:`train.loop.train_step`:
  micro-batches, loss, backward, clipping and ``optimizer.step`` as ``--layerwise`` and the flags
  say) on one seeded batch of random tokens (labels = inputs). Step 1
  (ours: optimizer state, every matrix's first subspace) is reported alone; tokens/s and the
  split over the steps after it, from CUDA events (CPU: wall time) around
  forward, backward (with the layer-wise updates), the per-parameter update and, within it, the
  projector's refresh / project / back-project, the rule, the INT8 dequantize and apply_update
  (a nested part counts in its parent too).
- CUDA: synchronized around each step; ``max_memory_allocated`` and ``max_memory_reserved`` over
  all steps, counted from ``empty_cache()`` and ``reset_peak_memory_stats()`` after building.
- CPU, ``--cpu-peak memtracker``: the last step, untimed, under torch's ``MemTracker`` (every live
  tensor storage, not the RSS: as CUDA's allocated figure): its peak ``Total`` as the peak
  allocated. CPU attention keeps the probabilities (batch x heads x seq^2 a layer) where CUDA
  keeps a logsumexp: use a short ``--seq-len``, and ``--loss-chunk-tokens 0`` above one chunk a
  micro-batch (MemTracker refuses a module called once per chunk).
- CPU, ``--cpu-peak step``: the last step under :class:`lowmem_optim.tools.op_count.OpCounter`:
  ``peak_tensor_bytes`` (the most bytes of the storages the step creates alive at once),
  ``peak_rss_bytes`` (:func:`scripts.bench.toolkit.peak_rss_above`; the RSS follows the live
  tensors with ``MALLOC_MMAP_THRESHOLD_=65536``), ``counted_step_s``; the prediction: the memory
  model's total less weights, states and projections.
- Ours also: its optimizer-state and projection bytes, and the estimate of
  :func:`lowmem_optim.tools.memory.estimate_memory`. One JSON line appended to
  ``<--output-dir>/recipe_step.jsonl``, a summary printed; no checkpoint.

Usage (ENTRY runs the 7B recipe's flags; SMOKE=1 on llama_tiny, on CPU):
  ENTRY=scripts.bench.recipe_step STEPS=4 bash scripts/pretrain_llama7b.sh --floor --proj-method=randomized_svd
  python -m scripts.bench.recipe_step --device cpu --cpu-peak memtracker --model-config configs/llama_small.json \
      --optimizer adamw --batch-size 4 --seq-len 64 --max-steps 2 --output-dir runs/memory_model
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from lowmem_optim.engine import ComposedOptimizer
from lowmem_optim.projection import PROJECTORS
from lowmem_optim.quant.int8_linear import Int8Weight
from lowmem_optim.rules import RULES
from lowmem_optim.tools.llama_config import load_llama_config
from lowmem_optim.tools.op_count import OpCounter
from scripts.bench.toolkit import peak_memory, peak_rss_above, predicted_memory, recipe, reset_peak_memory, sync
from train import distributed
from train.config import TrainConfig, build_parser
from train.loop import step_inputs, train_step
from train.model import run_model
from train.optim import state_bytes


class PartTimer:
    """Seconds spent in named parts: CUDA events on CUDA (no host wait while recording), wall time elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, list[tuple[Any, Any]]] = defaultdict(list)

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = self._now()
        yield
        self.marks[name].append((start, self._now()))

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1000 for k, v in self.marks.items()}
        return {k: sum(b - a for a, b in v) for k, v in self.marks.items()}

    def patches(self, model: torch.nn.Module, optimizer: Any) -> list[contextlib.AbstractContextManager]:
        """Patches that time, while open, the model's forward, the backward of the loss (with
        the layer-wise updates inside it), ``optimizer.step``, the optimizer's per-parameter
        update, the INT8 weight's passes and every projector's and rule's methods."""
        parts = {
            (type(model), "forward"): "forward",
            (torch.Tensor, "backward"): "backward",
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
        if optimizer is not None:
            parts[type(optimizer), "step"] = "optimizer.step"

        def timed(method: Callable, name: str) -> Callable:
            def run(*args: Any, **kwargs: Any) -> Any:
                with self.part(name):
                    return method(*args, **kwargs)

            return run

        return [mock.patch.object(k, a, timed(getattr(k, a), name)) for (k, a), name in parts.items()]


def _run(cfg: TrainConfig, device: torch.device, built: tuple, cpu_peak: str | None = None) -> dict[str, Any]:
    """``--max-steps`` steps of the training loop's own step (:func:`train.loop.train_step`) over
    ``built`` (model, optimizer, layer-wise hooks, accumulation steps, as
    :func:`scripts.bench.toolkit.recipe` returns them) on seeded random tokens: step 1 alone,
    tokens/s and the split over the others, and with ``cpu_peak`` the last step untimed under
    MemTracker or OpCounter."""
    model, optimizer, _, accum = built
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, model.config.vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen).to(device)
    stream = SimpleNamespace(next_batch=lambda: tokens)  # the loop's training stream: one batch over and over
    wiring = step_inputs(cfg, distributed.Dist.one_process(device), accum, model, optimizer, stream=stream)
    step = partial(train_step, wiring)
    timer = PartTimer(device)
    reset_peak_memory(device)
    with contextlib.ExitStack() as stack:
        for patch in timer.patches(model, optimizer):
            stack.enter_context(patch)
        sync(device)
        begin = time.perf_counter()
        step()
        sync(device)
        first, timed = time.perf_counter() - begin, cfg.max_steps - 1 - (cpu_peak is not None)
        timer.marks.clear()
        begin = time.perf_counter()
        for _ in range(timed):
            step()
        sync(device)
        elapsed = time.perf_counter() - begin
    out = {
        "first_step_s": first,
        "step_s": elapsed / timed if timed else None,
        "tokens_per_s": cfg.batch_size * cfg.seq_len * accum * timed / elapsed if timed else None,
        "parts_s_per_step": {k: v / timed for k, v in sorted(timer.seconds().items())},
        **peak_memory(device),
    }
    if cpu_peak == "memtracker":
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        out.update(
            peak_allocated_bytes=peak["Total"], memtracker_peak={str(k).split(".")[-1]: v for k, v in peak.items()}
        )
    elif cpu_peak == "step":
        counter, begin = OpCounter(), time.perf_counter()

        def counted_step() -> None:
            with counter:
                step()

        out.update(peak_rss_bytes=peak_rss_above(counted_step), peak_tensor_bytes=counter.peak_bytes)
        out["counted_step_s"] = time.perf_counter() - begin
    return out


def floor(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Forward and backward of the same model and micro-batch in bfloat16, gradients dropped."""
    vocab = load_llama_config(cfg.model_config)["vocab_size"]
    model = run_model(dataclasses.replace(cfg, dtype="bfloat16", weight_bits=16, init_from=None), device, vocab)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    # to the loop's step, a model whose gradients are consumed inside backward is layer-wise
    return _run(dataclasses.replace(cfg, layerwise=True), device, (model, None, None, 1))


def ours(cfg: TrainConfig, device: torch.device, cpu_peak: str | None = None) -> dict[str, Any]:
    """The recipe's model, optimizer and stepping, each part timed, and the bytes of its state."""
    built = recipe(cfg, device)
    out = _run(cfg, device, built, cpu_peak)
    _, optimizer, handle, accum = built
    if handle is not None:
        handle.remove()
    proj = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k[:5] == "proj_")
    out.update(accumulation_steps=accum, optimizer_states_bytes=state_bytes(optimizer) - proj, projections_bytes=proj)
    return out


def measure(cfg: TrainConfig, device: torch.device, with_floor: bool, cpu_peak: str | None) -> dict[str, Any]:
    """Ours (and the floor), with the memory model's prediction for ours."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the training CLI sets it
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": cfg.to_dict(),
    }
    if with_floor:
        result["floor"] = floor(cfg, device)
    result["ours"] = mine = ours(cfg, device, cpu_peak)
    if with_floor and mine["tokens_per_s"] and result["floor"]["tokens_per_s"]:
        result["tokens_per_s_vs_floor"] = mine["tokens_per_s"] / result["floor"]["tokens_per_s"]
    result["predicted"] = predicted = predicted_memory(cfg).as_dict()
    if "peak_tensor_bytes" in mine:  # the step alone: the weights, states and projections made before it left out
        static = ("weights_bytes", "optimizer_states_bytes", "projections_bytes")
        predicted["step_bytes"] = predicted["total_bytes"] - sum(predicted[k] for k in static)
        result["predicted_over_measured"] = predicted["step_bytes"] / mine["peak_tensor_bytes"]
    elif mine["peak_allocated_bytes"] is not None:
        result["predicted_over_measured"] = predicted["total_bytes"] / mine["peak_allocated_bytes"]
    return result


PEAKS = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_tensor_bytes", "peak_rss_bytes")


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n / 2**30:.3f} GiB)"


def _print_summary(result: dict[str, Any]) -> None:
    for name in [name for name in ("floor", "ours") if name in result]:
        r = result[name]
        speed = "" if r["step_s"] is None else f"{r['tokens_per_s']:.0f} tokens/s, step {r['step_s']:.3f} s, "
        peaks = [f", peak {k.split('_')[1]} {_size(r[k])}" for k in PEAKS if r.get(k) is not None]
        counted = f", counted step {r['counted_step_s']:.1f} s" if "counted_step_s" in r else ""
        print(f"{name}: {speed}first step {r['first_step_s']:.2f} s{''.join(peaks)}{counted}")
        for part, seconds in r["parts_s_per_step"].items():
            print(f"    {part:<24} {seconds:.4f} s/step")
    if "tokens_per_s_vs_floor" in result:
        print(f"ours / floor: {result['tokens_per_s_vs_floor']:.3f}")
    predicted, ratio = result["predicted"], result.get("predicted_over_measured")
    which = "step_bytes" if "step_bytes" in predicted else "total_bytes"
    measured = "not measured: CPU without --cpu-peak" if ratio is None else f"x{ratio:.3f} the measured"
    print(f"memory model for ours ({which}): {_size(predicted[which])} ({measured})", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    parser.prog, parser.description = "python -m scripts.bench.recipe_step", __doc__.split("\n\n")[0]
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--floor", action="store_true", help="also run the floor (bf16, no optimizer)")
    parser.add_argument("--cpu-peak", choices=("memtracker", "step"), help="CPU: the last step's peak, measured so")
    parser.add_argument("--vocab-size", type=int, help="replaces the config's vocab_size")
    parser.set_defaults(dtype="bfloat16")
    args = vars(parser.parse_args(argv))
    device, with_floor, cpu_peak, vocab = (args.pop(k) for k in ("device", "floor", "cpu_peak", "vocab_size"))
    if cpu_peak is not None and device != "cpu":
        parser.error(f"Invalid --cpu-peak: {cpu_peak} (allowed with --device cpu only: CUDA reads its allocator)")
    if cpu_peak is not None and args["max_steps"] < 2:
        parser.error(f"Invalid --max-steps: {args['max_steps']} (allowed with --cpu-peak: 2 or more)")
    with tempfile.TemporaryDirectory() as tmp:
        if vocab is not None:
            path = Path(tmp) / f"{Path(args['model_config']).stem}_vocab{vocab}.json"
            path.write_text(json.dumps({**load_llama_config(args["model_config"]), "vocab_size": vocab}))
            args["model_config"] = str(path)
        cfg = TrainConfig(**args)
        result = measure(cfg, torch.device(device), with_floor, cpu_peak)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "recipe_step.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    _print_summary(result)
    return result


if __name__ == "__main__":
    main()
