"""Peak memory of ``python -m train export`` against the size of the weights it writes.

Protocol (CPU; one JSON object written to --out and printed):
- The model: --model-config (default configs/llama_130m.json), built in float32 with seed 0 and
  saved twice in a temporary folder: as a DCP folder (``dcp.save({"model": state_dict})`` in one
  process) and as a checkpoint of the loop (``train.checkpoint.save``, with its SHA-256 file; the
  optimizer entry empty).
- Each export (DCP to float32, DCP to bfloat16, checkpoint to float32) runs in a fresh process
  (:func:`scripts.bench.toolkit.in_fresh_process`: one mapping per large tensor, so the resident
  set follows the live tensors); after its imports, ``peak_extra_bytes`` is its peak resident
  set over ``train.export.main`` above the resident set before
  (:func:`scripts.bench.toolkit.peak_rss_above`). The checkpoint is memory-mapped, so its pages
  count as resident once read, though the kernel may drop them.
- Reported per export: ``peak_extra_bytes``, the float32 weights' bytes and their ratio
  (one copy of the float32 weights: 1.0).

Usage:
  python -m scripts.bench.export_memory --out export_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lowmem_optim.tools.llama_config import load_llama_config
from scripts.bench.toolkit import in_fresh_process, peak_rss_above, write_json
from train import checkpoint
from train.export import main as export
from train.model import build_model


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:  # in the fresh process: what the export imports first, then the export
        import safetensors.torch  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401

        print(json.dumps({"peak_extra_bytes": peak_rss_above(lambda: export(sys.argv[2:]))}))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", default="configs/llama_130m.json")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(
            args.model_config, dtype=torch.float32, device=torch.device("cpu"), seed=0, vocab_needed=257, seq_len=256
        )
        state = model.state_dict()
        weight_bytes = sum(v.numel() * v.element_size() for v in state.values())
        dcp.save({"model": state}, checkpoint_id=str(root / "dcp"), no_dist=True)
        payload = {
            "step": 0,
            "model": state,
            "optimizer": {},
            "scheduler": {},
            "data": {},
            "rng": {},
            "config": {"dtype": "float32", "data": "builtin", "tokenizer": None},
            "model_config": load_llama_config(args.model_config),
            "data_fingerprint": "",
        }
        pt = checkpoint.save(root / "run", 0, payload, keep=1)
        del model, state, payload

        dcp_flags = ["--checkpoint", str(root / "dcp"), "--model-config", args.model_config]
        exports = {
            "dcp_to_float32": [*dcp_flags, "--dtype", "float32"],
            "dcp_to_bfloat16": [*dcp_flags, "--dtype", "bfloat16"],
            "checkpoint_to_float32": ["--checkpoint", str(pt), "--dtype", "float32"],
        }
        result = {"model_config": args.model_config, "float32_weight_bytes": weight_bytes}
        for name, flags in exports.items():
            peak = in_fresh_process("scripts.bench.export_memory", "--measure", *flags, "--out", str(root / name))
            peak = peak["peak_extra_bytes"]
            result[name] = {"peak_extra_bytes": peak, "copies_of_float32_weights": round(peak / weight_bytes, 3)}
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
