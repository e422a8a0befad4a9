"""The chunked loss (train/loss.py) against HF's unchunked loss: training loss, step peak memory, step time.

Protocol (CPU; one JSON object written to --out and printed):
- The model: --model-config with its vocab_size replaced by --vocab-size (default 32000, so the
  logits dominate a small model's activations), built by ``train.model.build_model`` in --dtype.
- Training loss: the training CLI (``train.main``) runs --steps steps twice on the builtin
  corpus (bytes tokenizer), same seed and flags, once with ``--loss-chunk-tokens 0`` and once with
  --chunk-tokens; reported: both loss curves and their largest absolute and relative difference.
- Memory and time: for each of the two, a fresh process (``MALLOC_MMAP_THRESHOLD_=65536``: every
  large tensor gets its own mapping, returned to the system when freed, so the RSS follows the
  live tensors) builds the model and torch's AdamW, runs one untracked step (the optimizer state
  exists from then on), then one step (forward, backward, ``optimizer.step()``,
  ``zero_grad``) measured three ways:
    * ``peak_tensor_bytes``: the largest sum of the tensor storages created during the step
      and still alive (``lowmem_optim.op_count.OpCounter``, a dispatch mode following every new
      storage until it is freed): gradients, activations, loss tensors, temporaries; the
      weights and optimizer state made before the step are not in it;
    * ``peak_rss_bytes``: the process's peak resident set during the step (``VmHWM`` after
      resetting it through ``/proc/self/clear_refs``) minus its resident set before the step;
    * ``step_s``: the wall time of the measured step, under the same dispatch mode (so slower
      than a plain step; compare the two variants with each other, not with other figures);
  and the memory model's prediction of the same: ``lowmem_optim.memory.estimate_memory``'s total
  minus weights, optimizer states and projections (what a step adds on top of them).

Usage:
  OMP_NUM_THREADS=1 python -m scripts.bench.chunked_loss --model-config configs/llama_small.json \\
      --batch-size 16 --seq-len 256 --steps 10 --out chunked_loss.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lowmem_optim import build_optimizer
from lowmem_optim.memory import TrainingSetup, estimate_memory
from lowmem_optim.op_count import OpCounter
from scripts.bench.toolkit import in_fresh_process, peak_rss_above
from train import main as train_main
from train.loss import CHUNK_TOKENS
from train.model import build_model


def measure_step(config_path: str, dtype: str, batch: int, seq: int, chunk: int) -> dict:
    """One measured training step with the loss in chunks of ``chunk`` tokens (0: whole)."""
    torch.manual_seed(0)
    config = json.loads(Path(config_path).read_text())
    model = build_model(
        config_path,
        dtype=getattr(torch, dtype),
        device=torch.device("cpu"),
        seed=0,
        vocab_needed=config["vocab_size"],
        seq_len=seq,
        loss_chunk_tokens=chunk,
    ).train()
    optimizer = build_optimizer("adamw", model, lr=1e-4)
    tokens = torch.randint(0, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    counter = OpCounter()

    def counted_step() -> None:
        with counter:
            step()

    start = time.perf_counter()
    peak_rss = peak_rss_above(counted_step)
    elapsed = time.perf_counter() - start
    setup = TrainingSetup(
        "adamw",
        weight_bits=32 if dtype == "float32" else 16,
        dtype=dtype,
        batch_size=batch,
        seq_len=seq,
        loss_chunk_tokens=chunk,
    )
    predicted = estimate_memory(config, setup)
    static = predicted.weights_bytes + predicted.optimizer_states_bytes + predicted.projections_bytes
    return {
        "loss_chunk_tokens": chunk,
        "peak_tensor_bytes": counter.peak_bytes,
        "peak_rss_bytes": peak_rss,
        "step_s": elapsed,
        "predicted_step_bytes": predicted.total_bytes - static,
    }


def _train(args: argparse.Namespace, config_path: str, chunk: int, out: Path) -> list[float]:
    records = train_main(
        [
            f"--model-config={config_path}",
            f"--dtype={args.dtype}",
            "--optimizer=adamw",
            "--lr=1e-3",
            f"--batch-size={args.batch_size}",
            f"--seq-len={args.seq_len}",
            f"--max-steps={args.steps}",
            f"--eval-every={args.steps}",
            "--eval-batches=1",
            "--save=False",
            "--progress=False",
            f"--loss-chunk-tokens={chunk}",
            f"--output-dir={out / f'train_chunk{chunk}'}",
        ]
    )
    return [r["loss"] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure-step", nargs=5, metavar=("CONFIG", "DTYPE", "BATCH", "SEQ", "CHUNK"))
    parser.add_argument("--model-config", default="configs/llama_small.json")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="chunked_loss.json")
    args = parser.parse_args()
    if args.measure_step:
        config_path, dtype, batch, seq, chunk = args.measure_step
        print(json.dumps(measure_step(config_path, dtype, int(batch), int(seq), int(chunk))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        config_path = str(Path(tmp) / "model.json")
        config = {**json.loads(Path(args.model_config).read_text()), "vocab_size": args.vocab_size}
        Path(config_path).write_text(json.dumps(config))
        one = [config_path, args.dtype, str(args.batch_size), str(args.seq_len)]
        steps = {
            chunk: in_fresh_process("scripts.bench.chunked_loss", "--measure-step", *one, str(chunk))
            for chunk in (0, args.chunk_tokens)
        }
        losses = {chunk: _train(args, config_path, chunk, Path(tmp)) for chunk in (0, args.chunk_tokens)}
    whole, chunked = losses[0], losses[args.chunk_tokens]
    result = {
        "model_config": args.model_config,
        "vocab_size": args.vocab_size,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "torch": torch.__version__,
        "steps": [steps[0], steps[args.chunk_tokens]],
        "loss_unchunked": whole,
        "loss_chunked": chunked,
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(whole, chunked)),
        "loss_max_rel_diff": max(abs(a - b) / abs(a) for a, b in zip(whole, chunked)),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
