"""What the probes share: timing, peak memory and resident set, a fresh measuring process, a run
built from the training CLI's flags with the memory model's estimate of it, seeded gradients,
tables and JSON, LLaMA models from the shipped configs (state bytes: :mod:`train.optim`)."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from lowmem_optim.quant.int8_linear import quantize_linear_layers
from lowmem_optim.tools.llama_config import load_llama_config
from lowmem_optim.tools.memory import MemoryEstimate, estimate_memory
from train import distributed
from train.config import TrainConfig
from train.loop import accumulation_steps, attach_layerwise
from train.memory_trace import training_setup
from train.model import run_model
from train.optim import make_optimizer

REPO = Path(__file__).resolve().parents[2]
LLAMA_60M = REPO / "configs" / "llama_60m.json"
LLAMA_7B = REPO / "configs" / "llama_7b.json"


def sync(device: torch.device | str) -> None:
    """Waits for the device's queued work (CUDA), so that a wall clock times it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    run: Callable[[], Any],
    repeats: int,
    device: torch.device | str,
    warmup: int = 1,
    before: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median time (``clock``: wall time by default) of ``repeats`` calls of ``run`` after
    ``warmup`` untimed ones, the device synchronized around each; ``before`` runs untimed ahead
    of every call."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        sync(device)
        start = clock()
        run()
        sync(device)
        if i >= warmup:
            times.append(clock() - start)
    return statistics.median(times)


def llama(config: str | Path = LLAMA_60M, seed: int = 0, device: torch.device | str = "cpu") -> torch.nn.Module:
    """HF ``LlamaForCausalLM`` from a config JSON (default ``configs/llama_60m.json``, GaLore's
    60M: hidden 512, MLP 1376, 8 layers, vocab 32000, untied head), float32, its weights drawn
    after ``manual_seed(seed)`` on ``device`` (``"meta"``: shapes only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = LlamaConfig.from_json_file(config)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(settings)


class OneMatrix(torch.nn.Module):
    """One linear layer's weight of ``shape`` (out, in) in ``dtype`` on ``device``, drawn
    N(0, 0.02^2) with seed 0 (on ``meta``: its shape only); INT8 with ``int8``."""

    def __init__(
        self, shape: tuple[int, int], dtype: torch.dtype = torch.float32, device: str = "cpu", int8: bool = False
    ) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=dtype, device=device)
        if device != "meta":
            with torch.no_grad():
                self.proj.weight.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(0)).mul_(0.02))
        if int8:
            quantize_linear_layers(self, "all-linear")


def reset_peak_memory(device: torch.device) -> None:
    """After a garbage collection, CUDA's cached blocks freed and its peak counters restarted."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """CUDA's largest allocated and reserved bytes since :func:`reset_peak_memory` (None elsewhere)."""
    cuda = device.type == "cuda"
    return {
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
    }


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table of ``rows`` (cells already formatted) under ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def write_json(path: str | Path | None, payload: Any) -> None:
    """``payload`` as JSON at ``path`` (nothing when ``path`` is None), with the torch version."""
    if path is not None:
        Path(path).write_text(json.dumps({"torch": torch.__version__, **payload}, indent=1))


def set_gradients(model: torch.nn.Module, seed: int, dtype: torch.dtype | None = None) -> None:
    """A seeded standard-normal ``.grad`` for every parameter (the optimizer alone is measured;
    on ``meta``: the shape only)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.device.type == "meta":
            p.grad = torch.empty_like(p, dtype=dtype or p.dtype)
        else:
            p.grad = torch.randn(p.shape, generator=gen).to(p.device, dtype or p.dtype)


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its peak since the last reset (``VmHWM``)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_rss_above(run: Callable[[], Any]) -> int:
    """Peak resident bytes while ``run`` runs, above the resident set before it."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = rss_bytes()
    run()
    return rss_bytes("VmHWM") - before


def in_fresh_process(module: str, *args: str) -> Any:
    """The JSON of the last line ``python -m module args`` prints, run from the repository root in
    a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (every large tensor gets its own mapping,
    returned to the system when freed, so the RSS follows the live tensors) and one thread."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def recipe(cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, int]:
    """The model, optimizer, layer-wise hooks (None without ``--layerwise``) and accumulation steps
    as ``python -m train`` builds them from ``cfg`` in one process, on ``device``."""
    model = run_model(cfg, device, load_llama_config(cfg.model_config)["vocab_size"])
    optimizer = make_optimizer(cfg, model)
    accum = accumulation_steps(cfg, 1)
    handle = attach_layerwise(cfg, optimizer, accum, distributed.Dist.one_process(device)) if cfg.layerwise else None
    return model, optimizer, handle, accum


def predicted_memory(cfg: TrainConfig) -> MemoryEstimate:
    """The memory model's estimate for the run ``cfg`` describes (:func:`lowmem_optim.tools.memory.estimate_memory`)."""
    return estimate_memory(load_llama_config(cfg.model_config), training_setup(cfg))
