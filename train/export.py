"""Export a trained model as a Hugging Face folder: ``python -m train export --checkpoint PATH --out DIR``.

What is read (``--checkpoint``):

- a checkpoint of the loop, ``<output-dir>/checkpoints/step_*.pt`` (one process, DDP or FSDP2:
  the loop always saves whole tensors), verified against its SHA-256 file first, or a run's
  ``--output-dir`` (its newest intact checkpoint). The file is memory-mapped, so the optimizer
  state it also holds is never read;
- a torch.distributed.checkpoint (DCP) folder, as torchtitan saves FSDP2 runs
  (``dcp.save({"model": get_model_state_dict(model), "optim": ...})``): consolidated in one
  process without a GPU or a process group, by reading only the ``model`` entries into one
  tensor each. It holds no model config, so ``--model-config`` names it.

What is written (``--out``): ``config.json`` (LLaMA, ``LlamaForCausalLM``),
``model.safetensors`` (or shards of at most ``--max-shard-size`` with
``model.safetensors.index.json``), ``generation_config.json``, and the run's tokenizer when it
can be saved: the byte tokenizer as a byte-level BPE without merges that gives the same ids
(:meth:`train.data.ByteTokenizer.save_pretrained`), an HF tokenizer as itself. Its end of
document becomes the config's ``eos_token_id``. Writing goes to a temporary folder next to
``--out``, renamed into place when complete.

Weights: INT8 weights (codes, scale, zero per group) are dequantized as the training forward
does, ``scale * (codes - zero)`` in float32 rounded to the training dtype, then everything is
rounded to ``--dtype`` (default: the training dtype). Tensors are converted one at a time, each
source tensor dropped as its converted one is made, so at most one copy of the weights (plus one
tensor) is held.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_optim.quant.groupwise import dequantize_groupwise
from lowmem_optim.tools.llama_config import load_llama_config
from train import checkpoint
from train.config import DTYPES
from train.data import Tokenizer, load_tokenizer, run_tokenizer
from train.model import INT8_GROUP_SIZE

#: a DCP folder holds this file
DCP_METADATA = ".metadata"
#: the key of the model's state dict inside a DCP folder (torchtitan's layout)
DCP_MODEL_KEY = "model"
#: the INT8 layers' state entries besides their codes
_INT8_SIDE = (".weight_scale", ".weight_zero")


@dataclass
class SavedModel:
    """A model as a checkpoint holds it."""

    state: dict[str, torch.Tensor]  # its state dict (INT8 layers as weight_codes/_scale/_zero)
    model_config: dict[str, Any]  # the LLaMA config it was built from
    dtype: torch.dtype  # the training dtype: the INT8 weights' compute dtype
    tokenizer: str | None  # the run's tokenizer (None: not recorded)
    run: dict[str, Any]  # the run's settings (empty for a DCP folder)
    source: Path  # the file or folder read


def read_saved(path: str | Path, *, model_config: str | None = None, flag: str = "--checkpoint") -> SavedModel:
    """The model in ``path`` (see the module docstring); ValueError naming ``flag`` and the
    cause when it is not a checkpoint or cannot be trusted."""
    path = Path(path)
    if path.is_dir() and (path / DCP_METADATA).is_file():
        return _read_dcp(path, model_config, flag)
    if model_config is not None:
        raise ValueError(f"--model-config is only for a DCP folder; {flag} {str(path)!r} records the config it trained")
    if path.is_dir():
        found, failures = checkpoint.newest_intact(path)
        if found is None:
            raise ValueError(
                f"{flag} {str(path)!r} is not a checkpoint (allowed: a step_*.pt file of the training loop, "
                f"a run's --output-dir holding checkpoints/step_*.pt, or a DCP folder holding {DCP_METADATA})"
            )
        for reason in failures:
            print(f"note: skipping a corrupt checkpoint: {reason}", file=sys.stderr)
        path = found
    elif not path.is_file():
        raise ValueError(f"{flag} {str(path)!r} does not exist")
    payload = checkpoint.load(path, mmap=True)
    run = payload["config"]
    return SavedModel(
        payload["model"],
        payload["model_config"],
        getattr(torch, DTYPES[run["dtype"]]),
        run_tokenizer(run),
        run,
        path,
    )


def _read_dcp(path: Path, model_config: str | None, flag: str) -> SavedModel:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if model_config is None:
        raise ValueError(
            f"{flag} {str(path)!r} is a DCP folder, which holds no model config: pass --model-config "
            "(the LLaMA config JSON it was trained with)"
        )
    config = load_llama_config(model_config)
    reader = dcp.FileSystemReader(str(path))
    try:
        entries = reader.read_metadata().state_dict_metadata
    except Exception as err:  # truncated or foreign metadata: unusable either way
        raise ValueError(f"{flag} {str(path)!r}: unreadable DCP metadata ({type(err).__name__}: {err})") from err
    prefix = DCP_MODEL_KEY + "."
    shapes = {
        key[len(prefix) :]: meta
        for key, meta in entries.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not shapes:
        raise ValueError(
            f"{flag} {str(path)!r} is a DCP folder without model weights (expected entries under "
            f"{DCP_MODEL_KEY!r}, as saved by dcp.save({{{DCP_MODEL_KEY!r}: get_model_state_dict(model), ...}}))"
        )
    # the one copy of the weights: DCP reads each rank's shards into these tensors
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in shapes.items()}
    try:
        with warnings.catch_warnings():  # one process reading every rank's shards is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({DCP_MODEL_KEY: state}, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as err:  # a missing or truncated shard file (DCP's is a BaseException)
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise ValueError(f"{flag} {str(path)!r}: DCP could not read it ({type(err).__name__}: {first})") from err
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    return SavedModel(state, config, dtype, None, {}, path)


def hf_weights(saved: SavedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``saved``'s weights as HF's ``LlamaForCausalLM`` names them, in ``dtype``. Each INT8
    weight is ``scale * (codes - zero)`` in float32 rounded to the training dtype, as
    ``Int8Weight.dequantized`` computes it for the forward pass. Entries are taken out of
    ``saved.state`` as they are converted."""
    state, weights = saved.state, {}
    for key in [k for k in state if not k.endswith(_INT8_SIDE)]:
        value = state.pop(key)
        if key.endswith(".weight_codes"):
            key = key.removesuffix("_codes")
            scale, zero = state.pop(key + "_scale"), state.pop(key + "_zero")
            value = dequantize_groupwise(value.view(-1), scale, zero, value.shape, saved.dtype, INT8_GROUP_SIZE)
        weights[key] = value.to(dtype)
    return weights


def hf_model(saved: SavedModel, dtype: torch.dtype, model_class: type[nn.Module] | None = None) -> nn.Module:
    """``model_class`` (default HF's ``LlamaForCausalLM``) holding ``saved``'s weights in
    ``dtype``: built without weights (on the meta device), then given the converted tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_dict({k: v for k, v in saved.model_config.items() if k != "model_type"})
    config.dtype = dtype
    with torch.device("meta"):
        model = (model_class or LlamaForCausalLM)(config)
    try:
        model.load_state_dict(hf_weights(saved, dtype), assign=True, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"the checkpoint {str(saved.source)!r} does not fit its model config ({' '.join(first[:3])[:300]})"
        ) from err
    # the rotary embedding's frequencies are buffers computed from the config, never saved
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config)
    return model.eval()


def export(
    saved: SavedModel,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    tokenizer: str | None = None,
) -> list[str]:
    """Write ``saved`` to ``out`` as the module docstring says; returns the names written.
    ``tokenizer`` replaces the run's (a name or path :func:`train.data.load_tokenizer` takes)."""
    from transformers import GenerationConfig

    out = Path(out)
    check_out(out, saved.source, overwrite)
    tok = _saveable_tokenizer(tokenizer or saved.tokenizer)
    model = hf_model(saved, dtype or saved.dtype)
    model.config.use_cache = True  # for generation; training had it off
    if tok is not None:
        model.config.eos_token_id = tok.eos_token_id
    model.generation_config = GenerationConfig.from_model_config(model.config)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tok is not None:
            tok.save_pretrained(folder)

    _write_replacing(out, write)
    return sorted(p.name for p in out.iterdir())


def check_out(out: Path, source: Path, overwrite: bool) -> None:
    """ValueError naming ``--out`` unless it may be written: new, empty, or ``overwrite``, and
    not holding ``source``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file (allowed: a new or empty folder, or a folder with --overwrite)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"--out {str(out)!r} exists and is not empty (allowed: --overwrite to replace it, or a new folder)"
        )
    if out.resolve() in (source.resolve(), *source.resolve().parents):
        raise ValueError(f"--out {str(out)!r} holds the checkpoint {str(source)!r} (allowed: a folder outside it)")


def _write_replacing(out: Path, write: Any) -> None:
    """``write(folder)`` into a fresh folder next to ``out``, renamed to ``out`` when done (an
    existing ``out`` is removed only then): an export that fails leaves ``out`` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _saveable_tokenizer(name: str | None) -> Tokenizer | None:
    if name is None:
        return None
    try:
        return load_tokenizer(name)
    except ValueError as err:  # an HF tokenizer neither cached nor reachable: the weights still export
        print(f"note: no tokenizer written: {err}", file=sys.stderr)
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train export",
        description="Write a checkpoint as a Hugging Face folder (config.json, safetensors, tokenizer).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a step_*.pt checkpoint, a run's --output-dir (its newest intact checkpoint), or a DCP folder",
    )
    parser.add_argument("--out", required=True, help="the folder to write (new or empty, unless --overwrite)")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="the written weights' dtype (default: the training dtype)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file (default 5GB); larger models are sharded with an index",
    )
    parser.add_argument("--model-config", default=None, help="the LLaMA config JSON of a DCP folder")
    parser.add_argument(
        "--tokenizer", default=None, help="bytes, or an HF tokenizer name or path (default: the run's; none for DCP)"
    )
    return parser


def main(argv: list[str] | None = None) -> list[str]:
    args = build_parser().parse_args(argv)
    check_out(Path(args.out), Path(args.checkpoint), args.overwrite)  # before reading a checkpoint of any size
    saved = read_saved(args.checkpoint, model_config=args.model_config)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    written = export(
        saved,
        args.out,
        dtype=dtype,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        tokenizer=args.tokenizer,
    )
    print(f"exported {str(saved.source)!r} to {args.out!r}: {', '.join(written)}")
    return written
