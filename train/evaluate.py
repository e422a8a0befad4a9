"""Validation loss and perplexity of a model: ``python -m train eval --model DIR_OR_CHECKPOINT``.

``--model`` is a Hugging Face LLaMA folder (an export, or any ``save_pretrained`` folder), a
checkpoint of the loop or a run's ``--output-dir`` (its newest intact checkpoint), or a DCP
folder with ``--model-config`` (:func:`train.export.read_saved`). The number is the loop's
own: the held-out split of ``--data`` that :func:`train.data.build_data` makes, cut into
``--eval-batches`` micro-batches of ``--batch-size`` x ``--seq-len`` tokens, and the loop's
:func:`train.loop.evaluate` over them with the loop's model class (loss computed in chunks of
``--loss-chunk-tokens``). Settings not given are the run's for a checkpoint, so its result is
the ``val_loss`` of the run's last evaluation; for a folder they are the training command's
defaults, with the folder's tokenizer when it has one.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.config import DTYPES, TrainConfig
from train.data import folder_tokenizer, run_tokenizer
from train.export import hf_model, read_saved
from train.metrics import perplexity
from train.model import LlamaWithChunkedLoss

#: settings of the held-out split and the model, with the training command's defaults
SETTINGS = ("data", "tokenizer", "seq_len", "batch_size", "val_fraction", "eval_batches", "loss_chunk_tokens")
#: the file that makes a folder a save_pretrained model, with its weights
HF_CONFIG = "config.json"


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a ``save_pretrained`` model folder (a ``config.json`` and weights)."""
    path = Path(path)
    return (path / HF_CONFIG).is_file() and any(path.glob("model*.safetensors"))


def load_model(source: str, *, dtype: str | None, model_config: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """(the model in ``source``, ready to evaluate; the settings its run recorded, or {})."""
    if is_hf_folder(source):
        if model_config is not None:
            raise ValueError(f"--model-config is only for a DCP folder; --model {source!r} holds its config.json")
        options = {"dtype": getattr(torch, DTYPES[dtype])} if dtype else {"dtype": "auto"}
        model = LlamaWithChunkedLoss.from_pretrained(source, local_files_only=True, **options)
        return model.eval(), {}
    saved = read_saved(source, model_config=model_config, flag="--model")
    return hf_model(saved, getattr(torch, DTYPES[dtype]) if dtype else saved.dtype, LlamaWithChunkedLoss), saved.run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train eval",
        description="Validation loss and perplexity of a model on a data set's held-out split.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a save_pretrained folder, a step_*.pt checkpoint, a run's --output-dir, a DCP folder",
    )
    parser.add_argument("--model-config", default=None, help="the LLaMA config JSON of a DCP folder")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="compute dtype (default: the model's or the run's)"
    )
    for name in SETTINGS:
        f = TrainConfig.__dataclass_fields__[name]
        otherwise = "the folder's own, else bytes (t5-base for c4)" if name == "tokenizer" else f.default
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=str if f.default is None else type(f.default),
            default=None,
            help=f"{f.metadata['help'].split(' (default')[0]} (default: the run's for a checkpoint, else {otherwise})",
        )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate as ``argv`` says, print one line and return {"val_loss", "val_ppl", ...}."""
    from train.data import build_data
    from train.loop import evaluate

    args = build_parser().parse_args(argv)
    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    model, run = load_model(args.model, dtype=args.dtype, model_config=args.model_config)
    defaults = {name: TrainConfig.__dataclass_fields__[name].default for name in SETTINGS}
    settings = {**defaults, **{k: v for k, v in run.items() if k in SETTINGS}, **given}
    settings["tokenizer"] = given.get("tokenizer") or (run_tokenizer(run) if run else folder_tokenizer(args.model))
    model.loss_chunk_tokens = settings["loss_chunk_tokens"]
    data = build_data(
        settings["data"],
        settings["tokenizer"],
        settings["seq_len"],
        settings["batch_size"],
        seed=run.get("seed", 0),
        val_fraction=settings["val_fraction"],
        eval_batches=settings["eval_batches"],
    )
    vocab = model.config.vocab_size
    if data.tokenizer.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer {data.tokenizer.name!r} has {data.tokenizer.vocab_size} ids but --model {args.model!r} "
            f"has vocab_size {vocab} (allowed: --tokenizer the model was trained with)"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    val_loss = evaluate(model.to(device), data.val, device)
    result = {
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss),
        "tokens": sum(b.numel() for b in data.val),
        "tokenizer": data.tokenizer.name,
        **{k: settings[k] for k in ("data", "seq_len", "batch_size", "eval_batches")},
    }
    print(
        f"val_loss {val_loss:.4f}  val_ppl {result['val_ppl']:.2f}  ({result['tokens']} tokens of "
        f"{settings['data']!r}, tokenizer {data.tokenizer.name!r})"
    )
    return result
