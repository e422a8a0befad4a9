"""Measure the peak CUDA memory of LLaMA training steps and compare it with the memory model.

Protocol (one JSON line per setup, appended to --out):
  * the model is built as the training CLI builds it (``train.model.build_model``: HF
    LlamaForCausalLM from the config, directly on the GPU in --dtype, non-reentrant activation
    checkpointing when asked), converted to INT8 linear layers for --weight-bits 8, and the
    optimizer is ``lowmem_optim.build_optimizer`` over it (layer-wise hooks with --layerwise);
  * then ``torch.cuda.empty_cache()`` and ``reset_peak_memory_stats()``: construction and
    conversion transients are not counted, the weights are;
  * --steps training steps on random tokens (batch x seq, labels = inputs, the output object
    held through backward as a training loop holds it); the first step initializes the
    optimizer state and computes the first projections (use --proj-method randomized_svd on
    large models: an exact SVD of every LLaMA-7B matrix takes minutes);
  * reported: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over all steps,
    the optimizer-state bytes counted from the state tensors, the prediction of
    ``lowmem_optim.memory.estimate_memory`` for the same setup, and tokens/s over the steps after
    the first (wall clock, ``torch.cuda.synchronize`` around them).

Usage (needs a CUDA GPU):
  python scripts/bench/memory_measure.py --model-config configs/llama_60m.json \
      --optimizer galore_adamw --rank 128 --batch-size 8 --seq-len 256 --out mem.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lowmem_optim import build_optimizer, layerwise  # noqa: E402
from lowmem_optim.memory import TrainingSetup, estimate_memory  # noqa: E402
from lowmem_optim.registry import LOWRANK_OPTIMIZERS  # noqa: E402
from train.model import build_model, quantize_weights  # noqa: E402


def measure(args: argparse.Namespace, device: torch.device = torch.device("cuda")) -> dict:
    setup = TrainingSetup(args.optimizer, rank=args.rank, weight_bits=args.weight_bits, dtype=args.dtype,
                          proj_bits=args.proj_bits, batch_size=args.batch_size, seq_len=args.seq_len,
                          activation_checkpointing=args.activation_checkpointing, layerwise=args.layerwise)
    config = json.loads(Path(args.model_config).read_text())
    predicted = estimate_memory(config, setup).as_dict()
    model = build_model(args.model_config, dtype=setup.torch_dtype(), device=device, seed=0,
                        vocab_needed=config["vocab_size"], seq_len=args.seq_len,
                        activation_checkpointing=args.activation_checkpointing)
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
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    tokens = torch.randint(0, config["vocab_size"], (args.batch_size, args.seq_len), device=device)
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        del out
        if handle is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    states = proj = 0
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                nbytes = value.numel() * value.element_size()
                proj, states = (proj + nbytes, states) if key.startswith("proj_") else (proj, states + nbytes)
    steady = times[1:] or times
    result = {
        "model_config": args.model_config, "optimizer": args.optimizer, "rank": args.rank,
        "weight_bits": args.weight_bits, "proj_bits": args.proj_bits, "dtype": str(setup.torch_dtype()),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "activation_checkpointing": args.activation_checkpointing,
        "layerwise": args.layerwise, "proj_method": args.proj_method, "steps": args.steps,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "max_memory_reserved": torch.cuda.max_memory_reserved(),
        "measured_optimizer_states_bytes": states, "measured_projections_bytes": proj,
        "predicted": predicted,
        "tokens_per_s": args.batch_size * args.seq_len * len(steady) / sum(steady),
        "first_step_s": times[0],
    }
    result["predicted_over_measured"] = predicted["total_bytes"] / result["max_memory_allocated"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", required=True)
    parser.add_argument("--optimizer", required=True)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--weight-bits", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--proj-bits", type=int)
    parser.add_argument("--proj-method")
    parser.add_argument("--update-proj-gap", type=int, default=500)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--layerwise", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = measure(args)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    gib = 2**30
    print(f"{Path(args.model_config).stem} {args.optimizer} b{args.batch_size} w{args.weight_bits} "
          f"ckpt={args.activation_checkpointing} lw={args.layerwise}: allocated {result['max_memory_allocated'] / gib:.3f} "
          f"GiB, reserved {result['max_memory_reserved'] / gib:.3f} GiB, predicted "
          f"{result['predicted']['total_bytes'] / gib:.3f} GiB (x{result['predicted_over_measured']:.3f}), "
          f"{result['tokens_per_s']:.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
