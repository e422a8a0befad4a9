"""A run's training steps traced at its real shapes on valueless tensors: the memory the code path allocates.

The model, INT8 conversion, optimizer and layer-wise hooks are built by the functions
``python -m train`` builds them with (:func:`train.model.build_model`, ``quantize_weights``,
:func:`train.optim.make_optimizer`, :func:`train.loop.attach_layerwise`), under
``FakeTensorMode`` on the CPU (the random initialisation skipped), and the loop's own step
(``train.loop.train_step``: micro-batches, chunked loss, checkpointed layers, low-rank
accumulation, the update) runs under :class:`lowmem_optim.tools.memory_trace.StorageTrace`. Each
micro-batch is a phase: its peak and split (parameters, buffers, gradients, optimizer states,
accumulation buffers, activations, temporaries) are reported, with the memory model's prediction
(:func:`lowmem_optim.tools.memory.estimate_memory`) for the same flags.

Micro-batches: a step of k > 2 micro-batches goes through three kinds of them (the first, which
allocates the accumulation buffers and, on a refresh step, chooses the subspaces; middle ones;
the last, which steps), so ``micro_batches`` (3) of them stand for k: the held gradients and
buffers do not grow with k. Step 1 refreshes every subspace; step 2 is a step without a
refresh (apart from the matrices a staggered schedule refreshes then).

Where CUDA differs (the trace runs torch's CPU kernels on fake CPU tensors):

* attention: SDPA on CPU at bfloat16 takes the flash kernel for CPU, which keeps a logsumexp,
  as CUDA's flash and memory-efficient kernels do (the memory model's assumption);
* the INT8 layer's dequantization and update, and 8-bit Adam, run their eager chunked code; on
  CUDA they run fused (compiled passes, bitsandbytes' kernel) without the chunk temporaries: the
  CUDA figure is at most the traced one by those chunks (0.1-0.2 GiB at 7B);
* the trace counts storages' bytes, as ``torch.cuda.max_memory_allocated`` counts blocks: the
  caching allocator rounds each block up (to 512 bytes; 2 MiB segments) and the CUDA context
  (0.3-0.5 GiB) is outside both, so the card needs more than the traced peak.

``python -m train.memory_trace`` takes the flags of ``python -m train``, traces that run and
writes ``<--output-dir>/memory_trace.json`` (no data, no checkpoint). The 7B recipes, their
flags unchanged (minutes on two cores; the figures are in docs/llama7b_memory.md):

    ENTRY=train.memory_trace GPU_MEMORY=16 bash scripts/pretrain_llama7b.sh
    SMOKE=1 ENTRY=train.memory_trace bash scripts/pretrain_llama7b.sh   # tiny, seconds
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from lowmem_optim.groups import parse_target_modules
from lowmem_optim.registry import LOWRANK_OPTIMIZERS, MATRIX_OPTIMIZERS
from lowmem_optim.tools.llama_config import load_llama_config
from lowmem_optim.tools.memory import TrainingSetup, estimate_memory
from lowmem_optim.tools.memory_trace import CATEGORIES, StorageTrace, fake_tensors
from train import distributed
from train.config import TrainConfig, parse_args
from train.loop import accumulation_steps, attach_layerwise, step_inputs, train_step
from train.model import run_model
from train.optim import make_optimizer

#: micro-batches per traced step: the first, a middle one and the last
TRACED_MICRO_BATCHES = 3


def training_setup(cfg: TrainConfig) -> TrainingSetup:
    """The memory model's setup for a run's flags: every low-rank flag given (an optimizer without
    param groups ignores them, as the training CLI does) and ``--momentum-dtype``."""
    flags = cfg.lowrank_flags() if cfg.optimizer in LOWRANK_OPTIMIZERS | MATRIX_OPTIMIZERS else {}
    flags.pop("rank", None)
    proj_bits = flags.pop("proj_bits") if flags.get("proj_bits") is not None else None  # None given: a choice
    if cfg.momentum_dtype is not None:
        flags["momentum_dtype"] = cfg.momentum_dtype
    return TrainingSetup(
        optimizer=cfg.optimizer,
        rank=cfg.rank,
        # the memory model's name for float32 weights; INT8 linear layers stay 8-bit in any dtype
        weight_bits=32 if cfg.torch_dtype_name == "float32" and cfg.weight_bits == 16 else cfg.weight_bits,
        dtype=cfg.torch_dtype_name,
        proj_bits=proj_bits,
        optimizer_kwargs=tuple(flags.items()),
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        activation_checkpointing=cfg.activation_checkpointing,
        layerwise=cfg.layerwise,
        target_modules=parse_target_modules(cfg.target_modules),
        loss_chunk_tokens=cfg.loss_chunk_tokens,
        total_batch_size=cfg.total_batch_size,
        accumulation_buffer=cfg.accumulation_buffer,
    )


class _Batches:
    """The data a traced step reads: one valueless micro-batch, each read starting a phase."""

    def __init__(self, trace: StorageTrace, tokens: torch.Tensor) -> None:
        self.trace, self.tokens, self.step, self.micro = trace, tokens, 0, 0

    def next_batch(self) -> torch.Tensor:
        self.micro += 1
        self.trace.phase(f"step {self.step}, micro-batch {self.micro}")
        return self.tokens


def _load_bitsandbytes() -> None:
    """bitsandbytes loads its CPU backend on its first call (and logs if a kernel is missing, the
    record holding the caller's frames): done before the trace, so its tensors are not the step's."""
    from lowmem_optim.quant.blockwise import BLOCKSIZE, quantize_blockwise

    quantize_blockwise(torch.zeros(BLOCKSIZE), signed=True)


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers before 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def trace_training(cfg: TrainConfig, *, steps: int = 2, micro_batches: int = TRACED_MICRO_BATCHES) -> dict[str, Any]:
    """The traced peaks of ``steps`` training steps of the run ``cfg`` (one process), each of
    ``min(micro_batches, the run's micro-batches per step)`` micro-batches; see the module
    docstring. Returns {"phases": {name: {"bytes", "split"}}, "peak_bytes", "peak_phase",
    "peak_split", "predicted": the memory model's components, "host_reads", "micro_batches"}."""
    accum = accumulation_steps(cfg, 1)
    traced = min(accum, micro_batches)
    config = load_llama_config(cfg.model_config)
    one_process = distributed.Dist.one_process(torch.device("cpu"))
    trace = StorageTrace()
    _load_bitsandbytes()
    with fake_tensors():
        with _no_init_weights():
            model = run_model(cfg, one_process.device, config["vocab_size"])
        optimizer = make_optimizer(cfg, model)
        trace.watch(model)  # its gradient hooks run before the layer-wise ones, which free the gradient
        handle = attach_layerwise(cfg, optimizer, traced, one_process) if cfg.layerwise else None
        trace.collect_state(optimizer, handle)
        batches = _Batches(trace, torch.randint(0, config["vocab_size"], (cfg.batch_size, cfg.seq_len)))
        wiring = step_inputs(cfg, one_process, traced, model, optimizer, stream=batches)
        with trace:
            for step in range(1, steps + 1):
                batches.step, batches.micro = step, 0
                train_step(wiring)
        peaks = trace.finish()
        if handle is not None:
            handle.remove()
    name, peak = max(peaks.items(), key=lambda item: item[1].bytes)
    return {
        "micro_batches": traced,
        "phases": {k: {"bytes": v.bytes, "split": v.split} for k, v in peaks.items() if k != "setup"},
        "peak_bytes": peak.bytes,
        "peak_phase": name,
        "peak_split": peak.split,
        "categories": list(CATEGORIES),
        "predicted": estimate_memory(config, training_setup(cfg)).as_dict(),
        "host_reads": dict(trace.host_reads),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Trace the run the training CLI's flags describe; write and print the per-phase peaks."""
    cfg = parse_args(argv)
    begin = time.perf_counter()
    result = {**trace_training(cfg), "config": cfg.to_dict()}
    result["seconds"] = time.perf_counter() - begin
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "memory_trace.json").write_text(json.dumps(result, indent=1))
    gib, names = 2.0**30, result["categories"]
    print(f"{'phase':<22}{'peak GiB':>10}" + "".join(f"{n[:12]:>13}" for n in names))
    for phase, peak in result["phases"].items():
        print(f"{phase:<22}{peak['bytes'] / gib:>10.3f}" + "".join(f"{peak['split'][n] / gib:>13.3f}" for n in names))
    predicted = result["predicted"]["total_bytes"]
    print(
        f"traced peak {result['peak_bytes'] / gib:.3f} GiB ({result['peak_phase']}); memory model "
        f"{predicted / gib:.3f} GiB ({predicted / result['peak_bytes'] - 1:+.1%}); "
        f"{result['micro_batches']} micro-batches per step traced; host reads answered by stand-ins: "
        f"{sum(result['host_reads'].values())}; {result['seconds']:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()
