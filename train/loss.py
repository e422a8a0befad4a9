"""The causal-LM loss in chunks of tokens: the whole micro-batch's logits never exist at once.

HF's ``LlamaForCausalLM`` computes the logits of every token (s V bytes each, V the vocabulary),
and its float32 cross-entropy holds, at the start of backward, the log-softmax output and its
incoming and outgoing gradients: 12 V bytes per token, 1.46 GiB for 16 x 256 tokens at
V = 32,000. Here the head and the float32 cross-entropy run on chunks of ``chunk_tokens``
tokens, each under non-reentrant activation checkpointing: the forward keeps only each chunk's
input (a view of the final hidden states, which the head keeps anyway) and its summed loss;
the backward rebuilds one chunk's logits at a time. With labels shifted as HF shifts them
(token t predicts label t + 1; the last position of each sequence, and labels equal to
``ignore_index``, count for nothing):

    loss = sum over chunks of sum_{t in chunk, y_t != -100} -log softmax(W x_t)[y_t]
           / #{t : y_t != -100}

which is ``model(input_ids, labels=labels).loss`` up to float rounding (the order of the sum),
with the same gradients. The head's weight gets one gradient per chunk, summed by autograd
before its ``AccumulateGrad`` runs, so a post-accumulate-grad hook (layer-wise updates) fires
once per backward, after the last chunk.

Chunk size: a fixed number of tokens, ``CHUNK_TOKENS`` = 1024 by default. Per chunk the loss
then holds 12 V x 1024 bytes (0.37 GiB at V = 32,000; a quarter of the unchunked loss at
16 x 256 tokens), which at LLaMA-7B is below the moment the rebuilt decoder layer sets
(:mod:`lowmem_optim.tools.memory`), so smaller chunks would buy nothing there; and each chunk's head
matmul (1024 x h by h x V) is still large enough to keep a GPU's matrix units busy. A
micro-batch of at most ``chunk_tokens`` tokens has nothing to split: it takes HF's loss (no
recomputation). The price of chunking is the head's forward matmul run twice: 2 h V flops per
token, about 0.5% of a LLaMA-7B step with activation checkpointing.

The same idea: Liger kernel's fused linear cross-entropy (Hsu et al., 2024; gradients computed
chunk by chunk in the forward), torchtune's ``CEWithChunkedOutputLoss`` (the float32 upcast and
the cross-entropy per chunk, the logits whole).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: tokens per chunk of the training loop's loss (``--loss-chunk-tokens``)
CHUNK_TOKENS = 1024
IGNORE_INDEX = -100


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # float32 logits, as HF's ForCausalLMLoss upcasts them
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` (hidden: batch x seq x h) against
    ``labels`` (batch x seq, unshifted), computed ``chunk_tokens`` tokens at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"Invalid chunk_tokens: {chunk_tokens!r} (allowed: an int >= 1)")
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    total = sum(
        # no randomness in the head and the loss: no RNG state to stash (which would cost a
        # host-device sync per chunk on CUDA)
        checkpoint(_chunk_loss, head, x, y, use_reentrant=False, preserve_rng_state=False)
        for x, y in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens))
    )
    return total / (targets != IGNORE_INDEX).sum()
