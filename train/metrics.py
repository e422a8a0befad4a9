"""Where a run's numbers go: ``metrics.jsonl``, ``layer_stats.jsonl``, wandb, a progress bar.

``metrics.jsonl`` gets one JSON object per logged step: ``step``, ``loss`` (mean over the
step's micro-batches and ranks), ``lr`` (the one used by that step), ``tokens_per_s`` (tokens
of all ranks since the previous line over the training time in between, evaluation and saving
excluded), ``peak_mem_bytes`` (CUDA: ``max_memory_allocated``, plus ``peak_mem_reserved_bytes``;
CPU: the process's peak RSS; the maximum over ranks), ``opt_state_bytes`` (optimizer state held
by one process), ``matrix_state_bytes`` (the part of it that belongs to the weight matrices
``--target-modules`` selects, whose count is ``matrix_params`` in ``config.json``) and, on
evaluation steps, ``val_loss`` and ``val_ppl``. Under
``--on-nonfinite skip``, ``skipped_steps`` counts the steps skipped since the previous line.
``layer_stats.jsonl`` gets the optimizer's per-layer subspace statistics on evaluation steps.

Both files are strict JSON, one object per line: a non-finite number (a NaN or infinite loss)
is written as ``null``.

wandb (imported only when asked for): ``offline`` writes under ``<output-dir>/wandb`` for a later
``wandb sync``; ``online`` without a ``WANDB_API_KEY`` logs offline and says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device),
            "peak_mem_reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(80) (exp overflows past ~709)."""
    return math.exp(min(loss, 80.0))


def read_jsonl(path: str | Path, *, drop_torn_end: bool = False) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file; ValueError naming the file and line of a bad line.
    ``drop_torn_end``: a last line without its newline (a write cut short) is dropped."""
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if drop_torn_end and number == len(lines):
                print(f"note: dropped the unfinished last line of {str(path)!r}", file=sys.stderr)
                continue
            raise ValueError(f"{str(path)!r} line {number} is not JSON ({err})") from err
    return records


def _json_default(value: Any) -> Any:
    if torch.is_tensor(value):
        return strict_json(value.item() if value.numel() == 1 else value.tolist())
    return str(value)


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(strict_json(record), default=_json_default, allow_nan=False)


class Metrics:
    """The run's sinks; on ranks other than 0 every call does nothing."""

    def __init__(
        self,
        output_dir: str | Path,
        config: dict[str, Any],
        *,
        enabled: bool,
        wandb_mode: str,
        project: str,
        run_name: str,
        resume_step: int | None,
    ) -> None:
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self._wandb = None
        if not enabled:
            return
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
        if resume_step is not None:
            self._drop_after(resume_step)
        self._file = open(self.dir / "metrics.jsonl", "a")
        self._layers = open(self.dir / "layer_stats.jsonl", "a")
        if wandb_mode != "off":
            self._wandb = self._start_wandb(wandb_mode, project, run_name, config)

    def _drop_after(self, step: int) -> None:
        """A resumed run re-logs the steps after its checkpoint: drop the interrupted run's lines."""
        for name in ("metrics.jsonl", "layer_stats.jsonl"):
            path = self.dir / name
            if path.exists():
                kept = [r for r in read_jsonl(path, drop_torn_end=True) if r["step"] <= step]
                tmp = path.with_name(f".{name}.tmp")
                tmp.write_text("".join(_dumps(r) + "\n" for r in kept))
                os.replace(tmp, path)

    def _start_wandb(self, mode: str, project: str, run_name: str, config: dict[str, Any]) -> Any:
        import wandb

        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            print("wandb: no WANDB_API_KEY, logging offline (upload later with `wandb sync`)", file=sys.stderr)
            mode = "offline"
        # one wandb run per output dir, so that a resumed run continues its wandb run
        run_id = f"{run_name}-{hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:8]}"
        return wandb.init(
            project=project, name=run_name, config=config, mode=mode, dir=str(self.dir), resume="allow", id=run_id
        )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = strict_json(record)
        self.records.append(record)
        self._file.write(_dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def log_layers(self, step: int, layers: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        self._layers.write(_dumps({"step": step, "layers": layers}) + "\n")
        self._layers.flush()
        if self._wandb is not None:
            flat = {
                f"layers/{layer['name']}/{key}": value
                for layer in layers
                for key, value in layer.items()
                if isinstance(value, (int, float)) and key != "index"
            }
            self._wandb.log(flat, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._layers.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            wandb.teardown()  # waits for wandb's service to write everything out (offline runs too)
