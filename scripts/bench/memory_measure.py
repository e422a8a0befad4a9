"""Measure the peak memory of LLaMA training steps and compare it with the memory model.

Protocol (one JSON line per setup, appended to --out):
  * the model is built as the training CLI builds it (``train.model.build_model``: HF
    LlamaForCausalLM from the config, directly on the device in --dtype, non-reentrant
    activation checkpointing when asked), converted to INT8 linear layers for --weight-bits 8,
    and the optimizer is ``lowmem_optim.build_optimizer`` over it (layer-wise hooks with
    --layerwise);
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
    kernels the model assumes keep a logsumexp: use a short --seq-len on CPU;
  * both: the optimizer-state bytes counted from the state tensors, and the prediction of
    ``lowmem_optim.memory.estimate_memory`` for the same setup.

Usage:
  python -m scripts.bench.memory_measure --device cuda --model-config configs/llama_60m.json \
      --optimizer galore_adamw --rank 128 --batch-size 8 --seq-len 256 --out mem.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowmem_optim import build_optimizer, layerwise
from lowmem_optim.memory import TrainingSetup, estimate_memory
from lowmem_optim.registry import LOWRANK_OPTIMIZERS
from train.model import build_model, quantize_weights


def _build(args: argparse.Namespace, setup: TrainingSetup, config: dict, device: torch.device):
    model = build_model(
        args.model_config,
        dtype=setup.torch_dtype(),
        device=device,
        seed=0,
        vocab_needed=config["vocab_size"],
        seq_len=args.seq_len,
        activation_checkpointing=args.activation_checkpointing,
        loss_chunk_tokens=args.loss_chunk_tokens,
    )
    if args.weight_bits == 8:
        quantize_weights(model, "all-linear")
    extra = {}
    if args.optimizer in LOWRANK_OPTIMIZERS:
        extra = {"rank": args.rank, "proj_bits": args.proj_bits, "update_proj_gap": args.update_proj_gap}
        if args.proj_method:
            extra["proj_method"] = args.proj_method
    opt = build_optimizer(args.optimizer, model, lr=1e-4, **extra)
    handle = layerwise.attach(opt) if args.layerwise else None
    model.train()
    return model, opt, handle


def _training_step(model, opt, handle, tokens: torch.Tensor) -> None:
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    del out
    if handle is None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _cuda_peak(model, opt, handle, tokens: torch.Tensor, steps: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        _training_step(model, opt, handle, tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    return {
        "device": torch.cuda.get_device_name(),
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "max_memory_reserved": torch.cuda.max_memory_reserved(),
        "first_step_s": times[0],
        "tokens_per_s": tokens.numel() * len(steady) / sum(steady),
    }


def _cpu_peak(model, opt, handle, tokens: torch.Tensor, steps: int) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    for _ in range(steps - 1):
        _training_step(model, opt, handle, tokens)
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        _training_step(model, opt, handle, tokens)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {
        "device": "cpu (MemTracker)",
        "max_memory_allocated": peak["Total"],
        "tracker_peak": {str(k).split(".")[-1]: v for k, v in peak.items()},
    }


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    setup = TrainingSetup(
        args.optimizer,
        rank=args.rank,
        weight_bits=args.weight_bits,
        dtype=args.dtype,
        proj_bits=args.proj_bits,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        activation_checkpointing=args.activation_checkpointing,
        layerwise=args.layerwise,
        loss_chunk_tokens=args.loss_chunk_tokens,
    )
    config = json.loads(Path(args.model_config).read_text())
    predicted = estimate_memory(config, setup).as_dict()
    model, opt, handle = _build(args, setup, config, device)
    tokens = torch.randint(0, config["vocab_size"], (args.batch_size, args.seq_len), device=device)
    peak = (_cuda_peak if device.type == "cuda" else _cpu_peak)(model, opt, handle, tokens, args.steps)
    states = proj = 0
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                nbytes = value.numel() * value.element_size()
                proj, states = (proj + nbytes, states) if key.startswith("proj_") else (proj, states + nbytes)
    result = {
        "model_config": args.model_config,
        "optimizer": args.optimizer,
        "rank": args.rank,
        "weight_bits": args.weight_bits,
        "proj_bits": args.proj_bits,
        "dtype": str(setup.torch_dtype()),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "activation_checkpointing": args.activation_checkpointing,
        "layerwise": args.layerwise,
        "loss_chunk_tokens": args.loss_chunk_tokens,
        "proj_method": args.proj_method,
        "steps": args.steps,
        "torch": torch.__version__,
        **peak,
        "measured_optimizer_states_bytes": states,
        "measured_projections_bytes": proj,
        "predicted": predicted,
    }
    result["predicted_over_measured"] = predicted["total_bytes"] / result["max_memory_allocated"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--model-config", required=True)
    parser.add_argument("--optimizer", required=True)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--weight-bits", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="default: float32 for --weight-bits 32, else bfloat16")
    parser.add_argument("--proj-bits", type=int)
    parser.add_argument("--proj-method")
    parser.add_argument("--update-proj-gap", type=int, default=500)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--layerwise", action="store_true")
    parser.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=TrainingSetup.loss_chunk_tokens,
        help="tokens per chunk of the loss (0: unchunked; CPU: MemTracker refuses a module called "
        "once per chunk, so use 0 when the micro-batch has more tokens than a chunk)",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = measure(args)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    gib = 2**30
    reserved = f", reserved {result['max_memory_reserved'] / gib:.3f} GiB" if "max_memory_reserved" in result else ""
    speed = f", {result['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in result else ""
    print(
        f"{Path(args.model_config).stem} {args.optimizer} b{args.batch_size}x{args.seq_len} w{args.weight_bits} "
        f"ckpt={args.activation_checkpointing} lw={args.layerwise}: "
        f"measured {result['max_memory_allocated'] / gib:.4f} GiB{reserved}, "
        f"predicted {result['predicted']['total_bytes'] / gib:.4f} GiB "
        f"(x{result['predicted_over_measured']:.3f}){speed}",
        flush=True,
    )


if __name__ == "__main__":
    main()
