"""Which training setup fits a card: the memory model searched over the settings that trade memory.

The fixed part is the low-memory recipe of ``scripts/pretrain_llama7b.sh``: Q-GaLore's 8-bit Adam
in a subspace (``q_galore_adamw8bit``) with INT4 projections, layer-wise updates, activation
checkpointing, bf16 compute, ``total_batch_size`` sequences per update accumulated in 8-bit
low-rank buffers. What varies, in order of preference:

1. the rank: hidden / 4, hidden / 8, hidden / 16 (1024, 512, 256 at LLaMA-7B): the optimizer's
   subspace, which the loss depends on most;
2. the weights: bf16, then INT8 (dequantized in every forward, recomputation and backward, and
   re-quantized by every update: slower);
3. the micro-batch: the largest that divides ``total_batch_size`` (fewer, larger kernels), of
   at least ``MIN_MICRO_BATCH_TOKENS`` tokens: below that a GPU waits between small kernels and
   the INT8 weights are dequantized three times per micro-batch for few tokens.

The first setup (in that order) whose predicted peak (:func:`lowmem_optim.tools.memory.estimate_memory`)
is within the card's budget, less ``MODEL_MARGIN`` for the model's error, fits. The budget leaves
room for what neither the prediction nor a trace counts: the CUDA context (0.3-0.5 GiB) and the
caching allocator's rounding and fragmentation:

    budget = memory - min(2 GiB, max(1.5 GiB, memory / 8))     (12 -> 10.5, 16 -> 14, 24 -> 22 GiB)
    fits:    predicted <= (1 - MODEL_MARGIN) x budget
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lowmem_optim.tools.memory import MemoryEstimate, TrainingSetup, estimate_memory

GIB = 2**30
#: the settings every candidate shares (the training CLI's flags, snake_case)
FIXED = {
    "optimizer": "q_galore_adamw8bit",
    "proj_bits": 4,
    "dtype": "bfloat16",
    "activation_checkpointing": True,
    "layerwise": True,
    "accumulation_buffer": "8bit",
}
RANK_DIVISORS = (4, 8, 16)
WEIGHT_BITS = (16, 8)
MICRO_BATCHES = (32, 16, 8, 4, 2, 1)
#: the largest error of the memory model against the traced LLaMA-7B recipes (-3.6%, the 12 GB
#: one: docs/llama7b_memory.md)
MODEL_MARGIN = 0.036
#: the smallest micro-batch searched, in tokens (the training loss's chunk)
MIN_MICRO_BATCH_TOKENS = 1024


def budget_bytes(memory_gib: float) -> int:
    """The bytes a predicted peak may take on a card of ``memory_gib`` GiB (module docstring)."""
    if isinstance(memory_gib, bool) or not isinstance(memory_gib, (int, float)) or not memory_gib > 2:
        raise ValueError(f"Invalid --memory-gib: {memory_gib!r} (allowed: a card's memory in GiB, more than 2)")
    return int((memory_gib - min(2.0, max(1.5, memory_gib / 8))) * GIB)


@dataclass(frozen=True)
class Fit:
    setup: TrainingSetup
    estimate: MemoryEstimate

    def flags(self) -> list[str]:
        """The training CLI's flags for this setup."""
        s = self.setup
        flags = [
            f"--optimizer={s.optimizer}",
            f"--rank={s.rank}",
            f"--weight-bits={s.weight_bits}",
            f"--proj-bits={s.proj_bits}",
            f"--dtype={s.dtype}",
            f"--batch-size={s.batch_size}",
            f"--total-batch-size={s.total_batch_size}",
            f"--seq-len={s.seq_len}",
            f"--accumulation-buffer={s.accumulation_buffer}",
        ]
        return flags + ["--layerwise", "--activation-checkpointing"]


def candidates(config: dict[str, Any], seq_len: int, total_batch_size: int) -> Iterator[TrainingSetup]:
    """The setups searched, in order of preference (module docstring)."""
    hidden = config["hidden_size"]
    for divisor in RANK_DIVISORS:
        for weight_bits in WEIGHT_BITS:
            for batch in MICRO_BATCHES:
                long_enough = batch >= -(-MIN_MICRO_BATCH_TOKENS // seq_len)
                if batch <= total_batch_size and total_batch_size % batch == 0 and long_enough:
                    yield TrainingSetup(
                        rank=max(1, hidden // divisor),
                        weight_bits=weight_bits,
                        batch_size=batch,
                        seq_len=seq_len,
                        total_batch_size=total_batch_size,
                        **FIXED,
                    )


def fitting(config: dict[str, Any], memory_gib: float, seq_len: int, total_batch_size: int) -> Fit | None:
    """The preferred setup whose predicted peak is within the budget of a ``memory_gib`` card,
    less the model's margin; None when none is."""
    if isinstance(total_batch_size, bool) or not isinstance(total_batch_size, int) or total_batch_size < 1:
        raise ValueError(f"Invalid total_batch_size: {total_batch_size!r} (allowed: an int >= 1)")
    budget = budget_bytes(memory_gib)
    for setup in candidates(config, seq_len, total_batch_size):
        estimate = estimate_memory(config, setup)
        if estimate.total_bytes <= (1 - MODEL_MARGIN) * budget:
            return Fit(setup, estimate)
    return None
