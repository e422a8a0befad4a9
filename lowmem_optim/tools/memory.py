"""The memory model: bytes of a LLaMA training step, per component, from a config and a setup.

Components (each in bytes; ``total_bytes`` is the predicted peak of a training step; the
optimizer's terms, per parameter, are computed in :mod:`lowmem_optim.tools.memory_optimizer`):

* weights: every parameter and buffer of the model as trained: ``--weight-bits`` 32 or 16 gives
  each parameter numel x 4 or 2; with 8 the selected linear layers hold uint8 codes plus a
  float32 scale and zero per group of 256 (:mod:`lowmem_optim.quant.int8_linear`), the rest
  stays in ``--dtype``.
* gradients: one per trainable parameter in its dtype; with ``--layerwise`` each is freed right
  after its update, so only the largest one counts.
* optimizer_states: the tensors of ``optimizer.state`` other than the projections: the 4-byte
  step counter, and what each part of the parameter's group reports
  (:meth:`lowmem_optim.parts.Part.state_bytes`): the inner rule's state on the projected shape
  (m x r or r x n) for low-rank parameters (Adam: 2 x numel; 8-bit Adam: 2 bytes per value +
  float32 absmax per 256, float32 below ``min_8bit_size``; Adafactor: row + column statistics;
  normalized momentum: one buffer), the schedule's (the adaptive similarity queue), the update
  form's (the norm-growth limiter's float32 norm), and the error-feedback buffer of a group
  with ``error_feedback`` (m x n: 4 bytes per weight in float32, 1 + 4/256 in 8 bits, 1/2 +
  8/256 in 4 bits).
* projections: what the projector reports: its stored bases (m x r or r x n in the gradient's
  dtype, or INT8/INT4 codes with float32 scale and zero per ``proj_group_size`` and 32 bytes of
  metadata), the DCT's r int64 indices or nothing (the random projector keeps a seed), plus
  the caches it shares between parameters, each counted once
  (:meth:`~lowmem_optim.parts.Part.shared_bytes`: the DCT's d x d basis).
* activations: what LlamaForCausalLM (HF transformers, SDPA attention with the flash or
  memory-efficient kernel) keeps for backward, per token and layer, with s the dtype size,
  h hidden, f intermediate, a heads, kv key/value heads, V vocabulary:

      2 RMSNorms  2 ((4 + s) h + 4)           (float32 copy of the input + the cast output)
      attention   s h (3 + 2 kv/a) + 4 a      (q, k, v after RoPE, output, its contiguous copy, logsumexp)
      MLP         4 s f                       (gate, SiLU(gate), up, their product)

  times layers x tokens; with activation checkpointing only each layer's input (s h per token
  per layer) is kept, and one layer is rebuilt in backward, with its gradient working set
  s (h + 2 f) per token. The head keeps the final norm's tensors, and no logits: the training
  loop keeps only the loss of the model's output through backward (``train/loop.py``), so the
  logits are freed once the loss is computed; the loss adds, at the start of backward, the
  float32 log-softmax output and the incoming and outgoing float32 gradients (12 V per token).
  With the chunked loss (``loss_chunk_tokens`` c below the micro-batch's tokens, the training
  default; ``train/loss.py``) backward rebuilds one chunk at a time:

      loss        max(12 V c, s V c + s h V) + s h tokens

  (the chunk's float32 loss tensors, or its bf16 logit gradient with its share of the head's
  gradient; plus the gradient of the final hidden states, gathered over the chunks), while
  the head's gradient accumulates over the chunks (also with ``--layerwise``: its update
  runs after the last chunk).
* workspace: the transient memory of one parameter's update (the largest over parameters), or
  of one call over the full-rank parameters a rule steps together (torch's foreach AdamW: one
  denominator per parameter, alive together; :meth:`~lowmem_optim.parts.Part.step_in_place`).
  A projected parameter's is the largest of its update's phases (:func:`_projected_workspace`):
  R = P^T G stays alive through the step and the rule's N (:meth:`~lowmem_optim.parts.Part.update_bytes`)
  from the rule on, beside, in turn, the projector's every-step refresh (the DCT's spectrum),
  error feedback's A = G + E and E's quantization, the rule's temporaries as it reports them
  (:meth:`~lowmem_optim.parts.Part.workspace_bytes`: 8-bit Adam's float32 update and its moments
  dequantized chunk by chunk; Adafactor's float32 copy of a bf16 weight for RMS(W)), the
  back-projected update U with a basis the projector regenerates or dequantizes and an update
  form's temporaries (Fira's m x n residual, APOLLO's factors; :mod:`lowmem_optim.update_forms`),
  and U with the INT8 weight's float32 re-quantization chunk. A full-rank weight's: its rule's
  temporaries; 8-bit Adam's chunks only, as they are applied in place, 20 bytes per value of a
  chunk (24 with g's float32 copy), plus the previous chunk's update and moment from the second
  chunk on: 32 per value of a bf16 embedding's or head's chunk. A refresh by SVD (every
  ``update_proj_gap`` steps) is not counted.
  On CUDA bitsandbytes' fused 8-bit kernel allocates no chunk: there the 8-bit terms are an
  upper bound. Each chunk's bytes per value are those measured by following every storage
  (:class:`lowmem_optim.tools.op_count.OpCounter`).

The peak is the largest of the moments a step goes through, on top of the static part
(weights + optimizer_states + projections):

    start of backward      kept activations + loss tensors (+ the first gradient, the head's;
                           with --layerwise only while the loss is chunked; every gradient from
                           the second of several micro-batches, without --layerwise); no logits: the
                           loop holds the loss, not the output, through backward
    checkpointed backward  kept activations + one rebuilt layer (+ every gradient so far)
    optimizer step         every gradient + workspace                     (ordinary stepping)
    a layer-wise update    kept activations + that gradient + its workspace (+ the rebuilt layer's
                           saved tensors, without its activation gradients, for the parameters
                           of a decoder layer: their weight gradients complete past that peak)

so ``total_bytes`` is at most, not equal to, the sum of the components.

What is exact: weights, gradients, optimizer states and projections are counted from the same
parameter and group layout the training code builds (the model skeleton is built on the meta
device with the real classes, the optimizer with :func:`lowmem_optim.build_optimizer`) and are
tested equal to the bytes of the real tensors after a step. Activations and workspace are a
model of HF's LLaMA on CUDA; CPU attention (the math path) keeps the full attention matrix
instead and is not modelled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowmem_optim.layerwise import (
    ACCUMULATION_BUFFERS,
)
from lowmem_optim.quant.int8_linear import Int8Weight, quantize_linear_layers
from lowmem_optim.registry import LOWRANK_OPTIMIZERS, MATRIX_OPTIMIZERS, build_optimizer
from lowmem_optim.tools.memory_optimizer import optimizer_memory

WEIGHT_BITS = (32, 16, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the components every estimate reports, in this order
COMPONENTS = (
    "weights",
    "gradients",
    "optimizer_states",
    "projections",
    "accumulation_buffers",
    "activations",
    "workspace",
)


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a LLaMA config (HF ``LlamaConfig`` field names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlamaShape:
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in config
        ]
        if missing:
            raise ValueError(f"Invalid model config: missing {', '.join(missing)} (allowed: an HF LlamaConfig JSON)")
        return cls(
            config["vocab_size"],
            config["hidden_size"],
            config["intermediate_size"],
            config["num_hidden_layers"],
            config["num_attention_heads"],
            config.get("num_key_value_heads") or config["num_attention_heads"],
            bool(config.get("tie_word_embeddings", False)),
        )


class _RMSNorm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))


def llama_skeleton(shape: LlamaShape, dtype: torch.dtype) -> nn.Module:
    """A module tree with LlamaForCausalLM's parameter names and shapes, on the meta device
    (no memory), so that ``target_modules`` and param groups select exactly as in training."""
    h, f = shape.hidden_size, shape.intermediate_size
    kv = h // shape.num_attention_heads * shape.num_key_value_heads
    with torch.device("meta"):
        layers = nn.ModuleList()
        for _ in range(shape.num_hidden_layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for name, out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
                setattr(layer.self_attn, name, nn.Linear(h, out, bias=False, dtype=dtype))
            layer.self_attn.o_proj = nn.Linear(h, h, bias=False, dtype=dtype)
            layer.mlp = nn.Module()
            layer.mlp.gate_proj = nn.Linear(h, f, bias=False, dtype=dtype)
            layer.mlp.up_proj = nn.Linear(h, f, bias=False, dtype=dtype)
            layer.mlp.down_proj = nn.Linear(f, h, bias=False, dtype=dtype)
            layer.input_layernorm = _RMSNorm(h).to(dtype)
            layer.post_attention_layernorm = _RMSNorm(h).to(dtype)
            layers.append(layer)
        model = nn.Module()
        model.model = nn.Module()
        model.model.embed_tokens = nn.Embedding(shape.vocab_size, h, dtype=dtype)
        model.model.layers = layers
        model.model.norm = _RMSNorm(h).to(dtype)
        model.model.rotary_emb = nn.Module()  # RoPE frequencies, float32 buffers in HF transformers 5
        for name in ("inv_freq", "original_inv_freq"):
            model.model.rotary_emb.register_buffer(
                name, torch.empty(h // shape.num_attention_heads // 2, dtype=torch.float32)
            )
        model.lm_head = nn.Linear(h, shape.vocab_size, bias=False, dtype=dtype)
        if shape.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    return model


@dataclass(frozen=True)
class TrainingSetup:
    """A training setup, with the training CLI's names (``--weight-bits``, ``--proj-bits``, ...)."""

    optimizer: str
    rank: int | None = None
    weight_bits: int = 16
    dtype: str | None = None
    proj_bits: int | None = None
    batch_size: int = 1
    seq_len: int = 256
    activation_checkpointing: bool = False
    layerwise: bool = False
    target_modules: str | list[str] = "all-linear"
    group_size: int = 256
    loss_chunk_tokens: int = 1024
    total_batch_size: int | None = None
    accumulation_buffer: str = "float32"
    optimizer_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        self.accumulation_steps()  # a bad total_batch_size is refused even where nothing accumulates

    def accumulation_steps(self) -> int:
        """Micro-batches per step: ``total_batch_size`` / ``batch_size`` (one process)."""
        total = self.batch_size if self.total_batch_size is None else self.total_batch_size  # 0 is no "unset"
        if isinstance(total, bool) or not isinstance(total, int) or total < 1 or total % self.batch_size:
            raise ValueError(
                f"Invalid total_batch_size: {self.total_batch_size!r} (allowed: a multiple of batch_size "
                f"{self.batch_size})"
            )
        return total // self.batch_size

    def accumulation(self) -> str | None:
        """How gradients are accumulated across micro-batches when that changes the memory
        (layer-wise updates with several micro-batches): ``accumulation_buffer``; else None."""
        if self.accumulation_buffer not in ACCUMULATION_BUFFERS:
            allowed = ", ".join(ACCUMULATION_BUFFERS)
            raise ValueError(f"Invalid accumulation_buffer: {self.accumulation_buffer!r} (allowed: {allowed})")
        return self.accumulation_buffer if self.layerwise and self.accumulation_steps() > 1 else None

    def torch_dtype(self) -> torch.dtype:
        """``dtype``, defaulting to float32 for 32-bit weights and bfloat16 otherwise (8-bit
        weights: INT8 linear layers, the other weights and the compute in ``dtype``)."""
        if self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"Invalid weight_bits: {self.weight_bits!r} (allowed: {', '.join(map(str, WEIGHT_BITS))})")
        name = self.dtype or ("float32" if self.weight_bits == 32 else "bfloat16")
        if name not in DTYPES:
            raise ValueError(f"Invalid dtype: {name!r} (allowed: {', '.join(DTYPES)})")
        dtype = DTYPES[name]
        if self.weight_bits != 8 and (self.weight_bits == 32) != (dtype == torch.float32):
            raise ValueError(
                f"Invalid dtype: {name!r} with weight_bits={self.weight_bits} (allowed: float32 with "
                "32-bit weights; bfloat16 or float16 with 16-bit weights; any with 8-bit weights)"
            )
        return dtype


@dataclass
class MemoryEstimate:
    weights_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    projections_bytes: int
    accumulation_buffers_bytes: int
    activations_bytes: int
    workspace_bytes: int
    total_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def build_setup_model(config: dict[str, Any], setup: TrainingSetup) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The meta-device skeleton (INT8-converted as training would) and the optimizer over it."""
    dtype = setup.torch_dtype()
    model = llama_skeleton(LlamaShape.from_config(config), dtype)
    if setup.weight_bits == 8:
        quantize_linear_layers(model, setup.target_modules, group_size=setup.group_size)
    kwargs = dict(setup.optimizer_kwargs)
    if setup.optimizer in LOWRANK_OPTIMIZERS | MATRIX_OPTIMIZERS:
        kwargs.update((k, v) for k, v in (("rank", setup.rank), ("proj_bits", setup.proj_bits)) if v is not None)
    elif setup.rank is not None or setup.proj_bits is not None:
        raise ValueError(
            f"Invalid optimizer: {setup.optimizer!r} takes no rank or proj_bits (allowed with them: "
            f"{', '.join(sorted(LOWRANK_OPTIMIZERS | MATRIX_OPTIMIZERS))})"
        )
    return model, build_optimizer(setup.optimizer, model, target_modules=setup.target_modules, **kwargs)


def _weight_bytes(model: nn.Module) -> int:
    params = sum(
        p.element_size() if isinstance(p, Int8Weight) else p.numel() * p.element_size() for p in model.parameters()
    )
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


# ---- activations ----------------------------------------------------------------------------
def activation_memory(shape: LlamaShape, setup: TrainingSetup) -> dict[str, int]:
    """Activation bytes (per-token terms in the module docstring): ``stored`` (kept through
    backward: each layer's saved tensors or checkpoint, the final norm's; not the logits, which
    the training loop frees with the model's output), ``loss`` (the float32 loss tensors at the
    start of backward, or one chunk's) and ``recompute`` (one checkpointed layer rebuilt in backward,
    with its gradient working set; 0 without checkpointing) and ``rebuilt`` (that layer's saved
    tensors alone)."""
    s = torch.empty((), dtype=setup.torch_dtype()).element_size()
    h, f, a, kv = shape.hidden_size, shape.intermediate_size, shape.num_attention_heads, shape.num_key_value_heads
    tokens = setup.batch_size * setup.seq_len
    norm = (4 + s) * h + 4
    per_layer = 2 * norm + s * h * (3 + 2 * kv / a) + 4 * a + 4 * s * f
    kept = per_layer if not setup.activation_checkpointing else s * h
    recompute = per_layer + s * (h + 2 * f) if setup.activation_checkpointing else 0
    rebuilt = per_layer if setup.activation_checkpointing else 0
    v, chunk = shape.vocab_size, setup.loss_chunk_tokens
    if loss_is_chunked(setup):
        loss = max(12 * v * chunk, s * v * (chunk + h)) + s * h * tokens
    else:
        # the loop keeps the loss, not the output: the logits (s V per token) are gone by backward
        loss = 12 * v * tokens
    return {
        "stored": int(tokens * (shape.num_hidden_layers * kept + norm)),
        "loss": loss,
        "recompute": int(tokens * recompute),
        "rebuilt": int(tokens * rebuilt),
    }


def loss_is_chunked(setup: TrainingSetup) -> bool:
    """Whether the training loss runs in chunks: a chunk size below the micro-batch's tokens."""
    return 0 < setup.loss_chunk_tokens < setup.batch_size * setup.seq_len


def estimate_memory(config: dict[str, Any], setup: TrainingSetup) -> MemoryEstimate:
    """The memory of one training step of the LLaMA ``config`` under ``setup``."""
    if isinstance(setup.batch_size, bool) or not isinstance(setup.batch_size, int) or setup.batch_size < 1:
        raise ValueError(f"Invalid batch_size: {setup.batch_size!r} (allowed: an int >= 1)")
    if isinstance(setup.seq_len, bool) or not isinstance(setup.seq_len, int) or setup.seq_len < 1:
        raise ValueError(f"Invalid seq_len: {setup.seq_len!r} (allowed: an int >= 1)")
    if not isinstance(setup.loss_chunk_tokens, int) or setup.loss_chunk_tokens < 0:
        raise ValueError(f"Invalid loss_chunk_tokens: {setup.loss_chunk_tokens!r} (allowed: an int >= 0)")
    model, optimizer = build_setup_model(config, setup)
    accumulation = setup.accumulation()
    layer_params = frozenset(map(id, model.model.layers.parameters()))
    early_params = frozenset(map(id, [*model.lm_head.parameters(), *model.model.norm.parameters()]))
    opt = optimizer_memory(setup.optimizer, optimizer, layer_params, accumulation, early_params)
    weights = _weight_bytes(model)
    act = activation_memory(LlamaShape.from_config(config), setup)
    static = weights + opt["optimizer_states"] + opt["projections"] + opt["accumulation_buffers"]
    if setup.layerwise:
        # gradients held across micro-batches exist through backward (the head's and final
        # norm's until they step, early in the last micro-batch); one more (projected) gradient
        # exists until its hook projects or steps it and frees it
        held, early = opt["held_gradients"], opt["early_held_gradients"]
        gradients = held + opt["largest_gradient"] if accumulation else opt["largest_gradient"]
        # the head's update runs before any layer is rebuilt (after the last chunk of a chunked
        # loss, whose gradient it accumulates, unless held), the embedding's after the last layer
        loss = act["loss"] + (opt["largest_gradient"] if loss_is_chunked(setup) and not accumulation else 0)
        layers = max(held + opt["layer_write_peak"], held - early + opt["layer_step_peak"])
        # a decoder layer's parameter is written or stepped once its weight gradient is complete,
        # with the rebuilt layer's saved tensors but past the peak of its activation gradients
        peaks = max(held + loss, act["recompute"] + held, act["rebuilt"] + layers, held + opt["step_peak"])
        total = static + act["stored"] + peaks
    else:
        gradients = opt["gradients"]
        # from the second micro-batch on every gradient is held from the first while the loss runs
        early = gradients if setup.accumulation_steps() > 1 else opt["largest_gradient"]
        total = static + max(
            act["stored"] + act["loss"] + early,
            act["stored"] + act["recompute"] + gradients if act["recompute"] else 0,
            gradients + opt["workspace"],
        )
    activations = act["stored"] + max(act["loss"], act["recompute"])
    return MemoryEstimate(
        weights_bytes=weights,
        gradients_bytes=gradients,
        optimizer_states_bytes=opt["optimizer_states"],
        projections_bytes=opt["projections"],
        accumulation_buffers_bytes=opt["accumulation_buffers"],
        activations_bytes=activations,
        workspace_bytes=opt["workspace"],
        total_bytes=total,
    )
