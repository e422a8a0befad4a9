"""Measure the peak memory of LLaMA training steps and compare it with the memory model.

Protocol (one JSON line per setup, appended to --out):
  * the flags are the training CLI's (``python -m train --help``; --dtype defaults to bfloat16
    here) and --device, --steps, --out; the model, its INT8 linear layers (--weight-bits 8),
    the optimizer and its layer-wise hooks (--layerwise) are built as ``python -m train``
    builds them (:func:`scripts.bench.toolkit.recipe`);
  * --steps training steps on random tokens (batch x seq, labels = inputs, the output object
    held through backward as a training loop holds it); the first step initializes the
    optimizer state and computes the first projections (use --proj-method randomized_svd on
    large models: an exact SVD of every LLaMA-7B matrix takes minutes);
  * CUDA (--device cuda): ``torch.cuda.empty_cache()`` and ``reset_peak_memory_stats()`` after
    construction and conversion (their transients are not counted, the weights are); reported
    ``max_memory_allocated`` and ``max_memory_reserved`` over all steps, and tokens/s over the
    steps after the first (``torch.cuda.synchronize`` around each);
  * CPU (--device cpu): the first step runs untracked; the last step runs under torch's
    ``torch.distributed._tools.mem_tracker.MemTracker`` (a dispatch mode that counts the bytes
    of every live tensor storage: parameters, buffers, gradients, optimizer state, activations,
    temporaries), given the model and optimizer with their state; reported its peak ``Total``
    as ``max_memory_allocated``. Not the process RSS: allocator caching and the Python heap are
    left out, as CUDA's allocated figure leaves them out. CPU attention runs SDPA's math path,
    which keeps the attention probabilities (batch x heads x seq^2 per layer) where the CUDA
    kernels the model assumes keep a logsumexp: use a short --seq-len on CPU, and
    --loss-chunk-tokens 0 when a micro-batch holds more tokens than a chunk (MemTracker
    refuses a module called once per chunk);
  * CPU with --cpu-peak step (the chunked loss against the whole one): the last step under
    :class:`lowmem_optim.tools.op_count.OpCounter` instead: ``peak_tensor_bytes``, the most bytes of
    the storages the step creates alive at once (not the weights and state made before it),
    ``peak_rss_bytes`` (:func:`scripts.bench.toolkit.peak_rss_above`; with
    ``MALLOC_MMAP_THRESHOLD_=65536`` the RSS follows the live tensors), ``step_s`` (under the
    counter) and ``predicted_step_bytes`` (the model's total minus weights, states, projections);
  * both: the optimizer-state bytes counted from the state tensors, and the prediction of
    ``lowmem_optim.tools.memory.estimate_memory`` for the same setup.

--vocab-size replaces the config's vocabulary (a large one makes the logits dominate a small model).

Usage:
  python -m scripts.bench.memory_measure --device cuda --model-config configs/llama_60m.json \
      --optimizer galore_adamw --rank 128 --batch-size 8 --seq-len 256 --out mem.jsonl
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from lowmem_optim.tools.llama_config import load_llama_config
from lowmem_optim.tools.op_count import OpCounter
from scripts.bench.toolkit import (
    median_seconds,
    peak_memory,
    peak_rss_above,
    predicted_memory,
    recipe,
    reset_peak_memory,
)
from train.config import TrainConfig, build_parser


def _training_step(model, opt, handle, tokens: torch.Tensor) -> None:
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    del out
    if handle is None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _cuda_peak(step: Callable[[], None], tokens: torch.Tensor, steps: int) -> dict:
    reset_peak_memory(tokens.device)
    times = [median_seconds(step, 1, tokens.device, warmup=0) for _ in range(steps)]
    steady, peaks = times[1:] or times, peak_memory(tokens.device)
    return {
        "device": torch.cuda.get_device_name(),
        "max_memory_allocated": peaks["peak_allocated_bytes"],
        "max_memory_reserved": peaks["peak_reserved_bytes"],
        "first_step_s": times[0],
        "tokens_per_s": tokens.numel() * len(steady) / sum(steady),
    }


def _memtracker_peak(step: Callable[[], None], model, opt) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    tracker_peak = {str(k).split(".")[-1]: v for k, v in peak.items()}
    return {"device": "cpu (MemTracker)", "max_memory_allocated": peak["Total"], "tracker_peak": tracker_peak}


def _counted_peak(step: Callable[[], None]) -> dict:
    counter = OpCounter()

    def counted_step() -> None:
        with counter:
            step()

    start = time.perf_counter()
    peak_rss = peak_rss_above(counted_step)
    elapsed = time.perf_counter() - start
    return {
        "device": "cpu (OpCounter)",
        "peak_tensor_bytes": counter.peak_bytes,
        "peak_rss_bytes": peak_rss,
        "step_s": elapsed,
    }


def measure(cfg: TrainConfig, device: torch.device, steps: int, cpu_peak: str = "memtracker") -> dict:
    predicted = predicted_memory(cfg).as_dict()
    model, opt, handle, _ = recipe(cfg, device)
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (cfg.batch_size, cfg.seq_len), device=device)
    step = partial(_training_step, model, opt, handle, tokens)
    if device.type == "cuda":
        peak = _cuda_peak(step, tokens, steps)
    else:  # the steps before the last untracked
        for _ in range(steps - 1):
            step()
        peak = _memtracker_peak(step, model, opt) if cpu_peak == "memtracker" else _counted_peak(step)
    tensors = [(key, value) for state in opt.state.values() for key, value in state.items() if torch.is_tensor(value)]
    proj = sum(value.numel() * value.element_size() for key, value in tensors if key.startswith("proj_"))
    result = {
        "config": cfg.to_dict(),
        "steps": steps,
        "torch": torch.__version__,
        **peak,
        "measured_optimizer_states_bytes": sum(value.numel() * value.element_size() for _, value in tensors) - proj,
        "measured_projections_bytes": proj,
        "predicted": predicted,
    }
    if "peak_tensor_bytes" in result:
        static = ("weights_bytes", "optimizer_states_bytes", "projections_bytes")
        result["predicted_step_bytes"] = predicted["total_bytes"] - sum(predicted[k] for k in static)
        result["predicted_over_measured"] = result["predicted_step_bytes"] / result["peak_tensor_bytes"]
    else:
        result["predicted_over_measured"] = predicted["total_bytes"] / result["max_memory_allocated"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.prog, parser.description = "python -m scripts.bench.memory_measure", __doc__.split("\n\n")[0]
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--cpu-peak", default="memtracker", choices=("memtracker", "step"))
    parser.add_argument("--vocab-size", type=int, help="replaces the config's vocab_size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True, help="JSON lines file the result is appended to")
    parser.set_defaults(dtype="bfloat16")
    args = vars(parser.parse_args(argv))
    device, steps, out = torch.device(args.pop("device")), args.pop("steps"), args.pop("out")
    cpu_peak, vocab = args.pop("cpu_peak"), args.pop("vocab_size")
    with tempfile.TemporaryDirectory() as tmp:
        if vocab is not None:
            config = {**load_llama_config(args["model_config"]), "vocab_size": vocab}
            args["model_config"] = str(Path(tmp) / f"{Path(args['model_config']).stem}_vocab{vocab}.json")
            Path(args["model_config"]).write_text(json.dumps(config))
        cfg = TrainConfig(**args)
        result = measure(cfg, device, steps, cpu_peak)
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
    gib, step = 2**30, "peak_tensor_bytes" in result
    reserved = f", reserved {result['max_memory_reserved'] / gib:.3f} GiB" if "max_memory_reserved" in result else ""
    speed = f", {result['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in result else ""
    measured = result["peak_tensor_bytes" if step else "max_memory_allocated"]
    predicted = result["predicted_step_bytes"] if step else result["predicted"]["total_bytes"]
    rss = f", step RSS {result['peak_rss_bytes'] / gib:.4f} GiB, {result['step_s']:.1f} s" if step else ""
    print(
        f"{Path(cfg.model_config).stem} {cfg.optimizer} b{cfg.batch_size}x{cfg.seq_len} w{cfg.weight_bits} "
        f"{cfg.dtype} ckpt={cfg.activation_checkpointing} lw={cfg.layerwise} chunk={cfg.loss_chunk_tokens}: "
        f"measured {'step ' if step else ''}{measured / gib:.4f} GiB{reserved}{rss}, "
        f"predicted {predicted / gib:.4f} GiB (x{result['predicted_over_measured']:.3f}){speed}",
        flush=True,
    )


if __name__ == "__main__":
    main()
