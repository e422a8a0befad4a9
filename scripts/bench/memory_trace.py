"""A recipe's training steps traced at its real shapes on valueless tensors, against the memory model.

Protocol (one process on the CPU, no GPU and no memory needed; :mod:`train.memory_trace`):
- the run is built from the recipe's own flags (those of ``python -m train``) by the training
  code's functions, under ``FakeTensorMode``: model (random init skipped), INT8 weights,
  optimizer, layer-wise hooks with low-rank accumulation, chunked loss, activation checkpointing;
- two training steps run through the loop's own step function, each of 3 micro-batches (the
  first, a middle one and the last stand for the recipe's k; what is held across micro-batches
  does not grow with k): step 1 refreshes every subspace, step 2 is a step without a refresh;
- every live tensor storage is counted (:class:`lowmem_optim.tools.memory_trace.StorageTrace`): the
  peak of each micro-batch, split into parameters, buffers, gradients, optimizer states,
  accumulation buffers, activations and temporaries, next to the memory model's prediction for
  the same flags (:func:`lowmem_optim.tools.memory.estimate_memory`); host reads that need values
  are answered by stand-ins ("finite", "not all zero") and counted;
- written to ``<--output-dir>/memory_trace.json`` and printed. No data, no checkpoint.

Usage (the 7B recipes, their flags unchanged; minutes on two cores):
  ENTRY=scripts/bench/memory_trace.py GPU_MEMORY=16 bash scripts/pretrain_llama7b.sh
  SMOKE=1 ENTRY=scripts/bench/memory_trace.py bash scripts/pretrain_llama7b.sh   # tiny, seconds
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from train.config import parse_args
from train.memory_trace import trace_training

GIB = 2.0**30


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    begin = time.perf_counter()
    result = trace_training(cfg)
    result["seconds"] = time.perf_counter() - begin
    result["config"] = cfg.to_dict()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_trace.json").write_text(json.dumps(result, indent=1))
    names = result["categories"]
    print(f"{'phase':<22}{'peak GiB':>10}" + "".join(f"{n[:12]:>13}" for n in names))
    for phase, peak in result["phases"].items():
        print(f"{phase:<22}{peak['bytes'] / GIB:>10.3f}" + "".join(f"{peak['split'][n] / GIB:>13.3f}" for n in names))
    predicted = result["predicted"]["total_bytes"]
    print(
        f"traced peak {result['peak_bytes'] / GIB:.3f} GiB ({result['peak_phase']}); memory model "
        f"{predicted / GIB:.3f} GiB ({predicted / result['peak_bytes'] - 1:+.1%}); "
        f"{result['micro_batches']} micro-batches per step traced; host reads answered by stand-ins: "
        f"{sum(result['host_reads'].values())}; {result['seconds']:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()
