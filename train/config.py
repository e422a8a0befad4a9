"""The training configuration: one dataclass, and the command line generated from it.

Every field is a flag in kebab-case (``--update-proj-gap 200``); the snake_case spelling
(``--update_proj_gap``) and the ``--key=value`` form that wandb's sweep agent renders
(``--activation-checkpointing=True``, ``--rank=None``) parse too. Flag names are a contract:
sweeps, the memory CLI and the scripts use them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lowmem_optim.engine import declared_defaults, lowrank_hparams
from lowmem_optim.groups import TARGET_MODULES_HELP, parse_target_modules
from lowmem_optim.layerwise import ACCUMULATION_BUFFERS
from lowmem_optim.parts import invalid
from lowmem_optim.registry import get_optimizer_class, package_optimizers
from lowmem_optim.rules.adam import BETAS, EPS
from lowmem_optim.rules.normalized import MOMENTUM_DTYPE
from train.loss import CHUNK_TOKENS
from train.peers import PEERS

#: accepted spellings of ``--dtype`` and the torch dtype name each resolves to
DTYPES: dict[str, str] = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
SCHEDULERS = ("cosine", "linear", "constant")
PARALLEL = ("ddp", "fsdp")
WANDB_MODES = ("off", "offline", "online")
ON_NONFINITE = ("stop", "skip")

#: fields a resumed run may change; any other difference from the checkpoint's config is an error
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "eval_every",
        "eval_batches",
        "save",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "wandb",
        "wandb_project",
        "run_name",
        "resume",
        "allow_resume_changes",
        "batch_size",  # these three: compared by train.resumption, with --max-steps
        "total_batch_size",
        "output_dir",
        "progress",
        "on_nonfinite",
        "model_config",
        "data",  # compared by contents: the model config's keys, the data's fingerprint
        "loss_chunk_tokens",  # the same loss, up to the order of its sum
    }
)


def _opt(default: Any, help: str, **more: Any) -> Any:
    return field(default=default, metadata={"help": help, **more})


#: the low-rank setup's flags, one per key a part declares (lowmem_optim.engine.lowrank_hparams);
#: unset (None) leaves the optimizer's default
LOWRANK_HPARAMS = lowrank_hparams()
#: given on the command line for a low-rank flag whose None is a choice that some optimizer of
#: the package defaults away from (DCTAdamW's NF4 error feedback, APOLLO's and Fira's norm-growth
#: limiter, Q-GaLore's INT4 projections), this value chooses None; elsewhere None is unset
EXPLICIT_NONE = "none"
_PACKAGE_DEFAULTS = [declared_defaults(get_optimizer_class(name)) for name in package_optimizers()]
NONE_CHOOSABLE = tuple(
    name
    for name, hp in LOWRANK_HPARAMS.items()
    if hp.check(None) and any(defaults.get(name) is not None for defaults in _PACKAGE_DEFAULTS)
)


def _lowrank_help(name: str) -> str:
    hp = LOWRANK_HPARAMS[name]
    chosen = f"; {EXPLICIT_NONE}: None, whatever the optimizer's default" if name in NONE_CHOOSABLE else ""
    return f"{hp.doc} (allowed: {hp.check.allowed}; unset: the optimizer's default{chosen})"


LowRankFlags = dataclasses.make_dataclass(
    "LowRankFlags",
    [
        (name, f"{hp.check.type.__name__} | None", _opt(None, _lowrank_help(name)))
        for name, hp in LOWRANK_HPARAMS.items()
    ],
)


@dataclass
class TrainConfig(LowRankFlags):
    """Every setting of a run; the low-rank setup's fields come from :class:`LowRankFlags`."""

    # model
    model_config: str = _opt(
        "", "path of a LLaMA config JSON, e.g. configs/llama_60m.json (required, unless --init-from gives one)"
    )
    init_from: str | None = _opt(
        None,
        "a local save_pretrained LLaMA folder (e.g. an export) whose weights and config.json start the run, and "
        "its tokenizer where it has one (unless --tokenizer); --model-config, if given, must match its config",
    )
    dtype: str = _opt("float32", "weight and compute dtype", choices=tuple(DTYPES))
    activation_checkpointing: bool = _opt(False, "recompute activations in backward (saves memory)")
    loss_chunk_tokens: int = _opt(
        CHUNK_TOKENS,
        "compute the output head and the loss this many tokens at a time, rebuilt in backward, so "
        "a micro-batch's logits never exist whole (0: in one piece; a micro-batch of at most this many "
        "tokens is one piece anyway)",
    )
    weight_bits: int = _opt(
        16, "8: INT8 weights in the linear layers (Q-GaLore); 16: weights in --dtype", choices=(8, 16)
    )
    # optimizer
    optimizer: str = _opt(
        "adamw", "a registry name (lowmem_optim.available_optimizers()) or a peer baseline (train.peers)"
    )
    lr: float = _opt(1e-3, "peak learning rate")
    weight_decay: float = _opt(0.0, "decoupled weight decay")
    betas: str | None = _opt(
        None, f"Adam's betas as beta1,beta2, e.g. 0.9,0.95 (allowed: {BETAS.check.allowed}; unset: the optimizer's)"
    )
    beta1: float | None = _opt(None, f"Adam's beta1 alone (with beta2 at {BETAS.default[1]}, unless --beta2)")
    beta2: float | None = _opt(None, f"Adam's beta2 alone (with beta1 at {BETAS.default[0]}, unless --beta1)")
    eps: float | None = _opt(
        None,
        f"Adam's eps: {EPS.doc} (allowed: {EPS.check.allowed}; unset: the optimizer's, "
        "e.g. 1e-8; galore-torch's GaLoreAdamW used 1e-6)",
    )
    momentum_dtype: str | None = _opt(
        None,
        f"Muon's, AuON's and Hybrid-AuON's momentum storage: {MOMENTUM_DTYPE.doc} "
        f"(allowed: {MOMENTUM_DTYPE.check.allowed}; unset: the optimizer's, {MOMENTUM_DTYPE.default})",
    )
    grad_clip: float = _opt(0.0, "clip the global gradient norm to this value (0: no clipping)")
    target_modules: str = _opt("all-linear", f"low-rank linear layers: {TARGET_MODULES_HELP}")
    layerwise: bool = _opt(
        False,
        "update each parameter inside backward and free its gradient (layer-wise); "
        "--grad-clip then clips per parameter",
    )
    accumulation_buffer: str = _opt(
        "float32",
        "with --layerwise and several micro-batches per step: where the projected gradients are summed "
        "(float32: exact; bfloat16 or 8bit: stochastically rounded, less memory; full: whole gradients "
        "kept in .grad, also for the projected parameters)",
        choices=ACCUMULATION_BUFFERS,
    )
    # schedule
    max_steps: int = _opt(1000, "optimizer steps to train")
    warmup_steps: int = _opt(0, "linear warm-up steps")
    scheduler: str = _opt("cosine", "learning-rate schedule after warm-up", choices=SCHEDULERS)
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr (cosine, linear)")
    # batch and data
    batch_size: int = _opt(16, "sequences per micro-batch per process")
    total_batch_size: int | None = _opt(
        None, "sequences per optimizer step over all processes and accumulation steps (default: batch-size x processes)"
    )
    seq_len: int = _opt(256, "tokens per sequence")
    data: str = _opt(
        "builtin", "builtin (offline text corpus), c4 (streaming, online), or a .txt/.jsonl file or folder"
    )
    tokenizer: str | None = _opt(None, "bytes, or an HF tokenizer name/path (default: bytes; t5-base for c4)")
    val_fraction: float = _opt(0.05, "held-out share of a local corpus")
    # evaluation, logging, checkpoints
    eval_every: int = _opt(100, "evaluate every N steps (and at the end)")
    eval_batches: int = _opt(10, "validation micro-batches per evaluation")
    log_every: int = _opt(1, "write a metrics line every N steps")
    save: bool = _opt(True, "write checkpoints (False: none, not even at the last step; for benchmarks)")
    save_every: int = _opt(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept in the output dir (oldest removed)")
    output_dir: str = _opt("runs/default", "where metrics.jsonl, config.json and checkpoints go")
    resume: bool = _opt(
        False, "continue from the newest intact checkpoint in --output-dir (newer corrupt ones are named and skipped)"
    )
    allow_resume_changes: bool = _opt(
        False,
        "with --resume: accept a changed world size, global batch, micro-batch (--batch-size) or schedule "
        "length (--max-steps under a decaying --scheduler); each change is recorded in config.json's history",
    )
    on_nonfinite: str = _opt(
        "stop",
        "a step whose loss is not finite: stop (one-line error naming the step and "
        "the last good checkpoint, exit 1), or skip it and its update (its loss or "
        "gradients not finite; one device sync per step)",
        choices=ON_NONFINITE,
    )
    wandb: str = _opt("off", "wandb logging (online without WANDB_API_KEY logs offline)", choices=WANDB_MODES)
    wandb_project: str = _opt("lowmem_optim", "wandb project")
    run_name: str | None = _opt(None, "run name (default: the output dir's name)")
    progress: bool = _opt(True, "show a progress bar on rank 0")
    # parallelism and reproducibility
    parallel: str = _opt(
        "ddp", "multi-process strategy under torchrun: ddp, or fsdp (FSDP2 fully_shard)", choices=PARALLEL
    )
    seed: int = _opt(0, "seed of the model init, the data order and the optimizer")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first bad flag and its allowed values."""
        from lowmem_optim import available_optimizers

        if not self.output_dir.strip():
            raise ValueError(
                f"Invalid --output-dir: {self.output_dir!r} (allowed: a folder of the run's own, e.g. runs/my_run)"
            )
        if not (self.model_config or self.init_from):
            raise ValueError(
                "--model-config is required (a LLaMA config JSON, e.g. configs/llama_60m.json), "
                "unless --init-from names a save_pretrained folder"
            )
        allowed = [*available_optimizers(), *PEERS]
        if self.optimizer not in allowed:
            raise ValueError(f"Invalid --optimizer: {self.optimizer!r} (allowed: {', '.join(allowed)})")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(
                    f"Invalid --{_kebab(f.name)}: {getattr(self, f.name)!r} (allowed: {', '.join(map(str, choices))})"
                )
        for name, value in self.lowrank_flags().items():
            LOWRANK_HPARAMS[name].validate(value, f"--{_kebab(name)}")
        if self.betas is not None and (self.beta1 is not None or self.beta2 is not None):
            raise ValueError(f"--betas {self.betas!r} and --beta1/--beta2 both given (allowed: one of the two forms)")
        if self.adam_betas is not None:
            BETAS.validate(self.adam_betas, "--betas" if self.betas is not None else "--beta1/--beta2")
        if self.eps is not None:
            EPS.validate(self.eps, "--eps")
        if self.momentum_dtype is not None:
            MOMENTUM_DTYPE.validate(self.momentum_dtype, "--momentum-dtype")
        positive = ["max_steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every", "keep_checkpoints"]
        for name in positive + ["total_batch_size"]:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Invalid --{_kebab(name)}: {value!r} (allowed: an int >= 1)")
        for name in ("warmup_steps", "save_every", "loss_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"Invalid --{_kebab(name)}: {getattr(self, name)!r} (allowed: an int >= 0)")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"Invalid --lr: {self.lr!r} (allowed: a finite number >= 0)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"Invalid --min-lr-ratio: {self.min_lr_ratio!r} (allowed: 0 <= ratio <= 1)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"Invalid --val-fraction: {self.val_fraction!r} (allowed: 0 < fraction < 1)")
        for name in ("grad_clip", "weight_decay"):  # nan < 0 is False: a NaN would pass a plain check
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Invalid --{_kebab(name)}: {value!r} (allowed: a finite number >= 0)")
        if self.layerwise and self.parallel == "fsdp":
            raise ValueError(
                "--layerwise with --parallel fsdp is not supported (allowed: --parallel ddp, where the "
                "layer-wise hooks average each gradient over the ranks)"
            )
        if self.on_nonfinite == "skip" and self.layerwise:
            raise ValueError(
                "--on-nonfinite skip with --layerwise is not supported: layer-wise updates run inside "
                "backward, before a step's loss and gradients can be checked (allowed: --on-nonfinite stop)"
            )
        if self.weight_bits == 8 and self.parallel == "fsdp":
            raise ValueError("--weight-bits 8 with --parallel fsdp is not supported (allowed: --parallel ddp)")
        parse_target_modules(self.target_modules)
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"Invalid --warmup-steps: {self.warmup_steps} (allowed: <= --max-steps {self.max_steps})")

    @property
    def adam_betas(self) -> tuple[float, float] | None:
        """Adam's (beta1, beta2) from --betas, or from --beta1/--beta2 (the other at Adam's default);
        None when neither is given (the optimizer's default applies)."""
        if self.betas is not None:
            try:
                return tuple(float(b) for b in self.betas.split(","))  # type: ignore[return-value]
            except ValueError:
                raise invalid("--betas", self.betas, BETAS.check.allowed + ", written beta1,beta2") from None
        if self.beta1 is None and self.beta2 is None:
            return None
        return (
            BETAS.default[0] if self.beta1 is None else self.beta1,
            BETAS.default[1] if self.beta2 is None else self.beta2,
        )

    @property
    def torch_dtype_name(self) -> str:
        return DTYPES[self.dtype]

    def lowrank_flags(self) -> dict[str, Any]:
        """The low-rank flags given, by group key (:data:`EXPLICIT_NONE` read as None); unset ones left out."""
        given = {name: getattr(self, name) for name in LOWRANK_HPARAMS if getattr(self, name) is not None}
        return {
            name: None if value == EXPLICIT_NONE and name in NONE_CHOOSABLE else value for name, value in given.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def parse_bool(text: str) -> bool:
    """``True/False`` as wandb renders them, and the usual spellings."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (allowed: True, False, 1, 0, yes, no)")


def _optional(convert: type, none: Any = None):
    """A flag's parser where ``none`` / ``null`` give ``none`` (None: unset; :data:`EXPLICIT_NONE`
    for a flag whose None is a choice) and an empty value gives None."""

    def parse(text: str) -> Any:
        lowered = text.strip().lower()
        return None if not lowered else none if lowered in ("none", "null") else convert(text)

    parse.__name__ = convert.__name__
    return parse


def _field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a field annotated as a string like 'int | None'."""
    annotation = str(f.type).replace(" ", "")
    optional = annotation.endswith("|None")
    base = {"int": int, "float": float, "str": str, "bool": bool}[annotation.removesuffix("|None")]
    return base, optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Pretrain a LLaMA model with a lowmem_optim optimizer (or a torch/bitsandbytes baseline). "
        "After training: python -m train export --help, python -m train eval --help.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        names = [f"--{_kebab(f.name)}"] + ([f"--{f.name}"] if "_" in f.name else [])
        base, optional = _field_type(f)
        help_text = f.metadata["help"]
        if f.name == "optimizer":
            from lowmem_optim import available_optimizers

            help_text = f"one of: {', '.join(available_optimizers())}; peer baselines: {', '.join(PEERS)}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": help_text}
        if base is bool:
            # "--flag" alone means True; "--flag=False" / "--flag False" as wandb's agent writes them
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        elif f.name in NONE_CHOOSABLE:
            kwargs["type"] = _optional(base, none=EXPLICIT_NONE)
        else:
            kwargs["type"] = _optional(base) if optional else base
        parser.add_argument(*names, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The configuration from command-line arguments (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = build_parser()
    return TrainConfig(**vars(parser.parse_args(argv)))
