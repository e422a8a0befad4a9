#!/usr/bin/env bash
# LLaMA-7B pretraining on ONE GPU of 12, 16 or 24 GB: Q-GaLore's recipe (Zhang et al., 2024).
#   INT8 weights, INT4 projections, 8-bit Adam in a rank-1024 subspace refreshed every 500 steps
#   with Q-GaLore's adaptive (lazy) per-layer gap (built into q_galore_adamw8bit; with another
#   OPTIMIZER add --refresh=adaptive), staggered (--stagger: after step 1 the 224 matrices
#   refresh on distinct steps of the first gap, not all on one), layer-wise updates (no full gradient ever
#   held), activation checkpointing, bf16, sequence 256, lr 0.004, scale 0.25.
#   512 sequences per update, as GaLore's and Q-GaLore's 7B runs (on 16 GB: 128 micro-batches of 4),
#   the projected gradients summed in 8-bit buffers (--accumulation-buffer=8bit: 1.5 GiB at rank
#   1024; bfloat16 buffers would take 3.0 GiB and not fit 16 GB).
#   Subspaces by exact SVD, as Q-GaLore's: staggered over the 500-step gap, the 224 SVDs (at most
#   ~1.05 s each on an H200) add ~0.47 s per step on average, ~3% of a 512-sequence step at the
#   floor measured for 512 sequences in micro-batches of 16 (32 x 0.44 s): a prediction from per-matrix timings. Step 1 refreshes every
#   matrix (~4 min); --proj-method=randomized_svd (the same loss on the CPU training benchmark,
#   ~10x cheaper per matrix) shortens that, as scripts/bench/gpu_session.sh does. Projecting the
#   MLP matrices on their other side (--proj-type=reverse_std) would shrink moments and buffers
#   (r x 4096 instead of 11008 x r) but trained 6.1% worse on the CPU benchmark (galore_svd_reverse
#   in docs/benchmarks.md), so the recipe keeps GaLore's side.
#
# Usage:  bash scripts/pretrain_llama7b.sh [extra train flags, which override the recipe's]
#   GPU_MEMORY (12, 16 or 24; default: from the GPU's total memory, the largest recipe it holds)
#   STEPS (150000)  OUTPUT_DIR (runs/llama7b_qgalore)  BATCH_SIZE (the recipe's)  TOTAL_BATCH_SIZE (512)
#   MICRO_BATCHES: micro-batches per update instead of TOTAL_BATCH_SIZE / BATCH_SIZE (a short check)
#   DATA (c4; builtin runs offline)
#   OPTIMIZER (q_galore_adamw8bit)  PYTHON (python)
#   ENTRY: a module run instead of `python -m train` with the recipe's flags (train.memory_trace,
#     which traces the recipe on the CPU: give GPU_MEMORY; scripts.bench.recipe_step, which
#     measures its step: add --floor to hold it to the floor)
#   SMOKE=1: the same recipe on llama_tiny for 3 steps, on CPU or GPU (checks the wiring, not memory)
# Without a CUDA GPU (and without SMOKE=1 or ENTRY) it stops with a message.
#
# One recipe per card (`lowmem-optim fit` answers the same question for any model and card).
# Every recipe: 512 sequences of 256 tokens per update, layer-wise updates, activation
# checkpointing, bf16, 8-bit accumulation buffers, INT4 projections. Predicted and traced peaks
# (train.memory_trace) are in docs/llama7b_memory.md:
#   16: INT8 weights, rank 1024, micro-batches of 4 (of 8 it traces at 14.15 GiB, over its 14).
#   12: INT8 weights, rank 256, micro-batches of 8.
#   24: bf16 weights (no INT8 dequantization in forward, recomputation and backward, no
#       re-quantization in the update), rank 1024, micro-batches of 16.
# Loss at small scale on CPU (docs/benchmarks.md, two seeds): 12 GB +0.3%, 24 GB +0.0% against
# the 16 GB recipe's validation loss. Tokens/s of each on a GPU: scripts/bench/gpu_session.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
# the allocator grows segments in place instead of caching blocks of every size it saw: the
# reserved memory stays close to the allocated one (layer-wise updates free tensors of many sizes)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

if [ "${SMOKE:-0}" != 1 ] && [ -z "${ENTRY:-}" ]; then
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "pretrain_llama7b.sh: no CUDA GPU is visible. This recipe trains LLaMA-7B on one GPU (12 GB or more)." >&2
        echo "To check the wiring on this machine, run the tiny smoke variant: SMOKE=1 bash scripts/pretrain_llama7b.sh" >&2
        exit 1
    fi
fi
card=${GPU_MEMORY:-}
if [ -z "$card" ]; then
    if [ "${SMOKE:-0}" = 1 ]; then
        card=16
    else
        gib=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30 if torch.cuda.is_available() else 0)")
        # a card sold as N GB shows a little under N GiB in total
        if [ "$gib" -ge 23 ]; then card=24; elif [ "$gib" -ge 15 ]; then card=16; elif [ "$gib" -ge 11 ]; then card=12; else
            if [ "$gib" = 0 ]; then
                echo "pretrain_llama7b.sh: no CUDA GPU is visible to choose a recipe by: give GPU_MEMORY (12, 16 or 24)" >&2
            else
                echo "pretrain_llama7b.sh: the GPU has ${gib} GiB; the smallest recipe needs a 12 GB card" >&2
            fi
            exit 1
        fi
    fi
fi
case "$card" in
    16) weight_bits=8 rank=1024 batch=4 ;;
    12) weight_bits=8 rank=256 batch=8 ;;
    24) weight_bits=16 rank=1024 batch=16 ;;
    *)
        echo "pretrain_llama7b.sh: Invalid GPU_MEMORY: '$card' (allowed: 12, 16, 24)" >&2
        exit 1
        ;;
esac

if [ "${SMOKE:-0}" = 1 ]; then
    model=configs/llama_tiny.json rank=8 steps=${STEPS:-3} batch=${BATCH_SIZE:-2} total=${TOTAL_BATCH_SIZE:-4} seq=32
    data=${DATA:-builtin} out=${OUTPUT_DIR:-runs/llama7b_smoke}
else
    model=configs/llama_7b.json steps=${STEPS:-150000} batch=${BATCH_SIZE:-$batch} total=${TOTAL_BATCH_SIZE:-512} seq=256
    data=${DATA:-c4} out=${OUTPUT_DIR:-runs/llama7b_qgalore}
fi
if [ -n "${MICRO_BATCHES:-}" ]; then total=$((batch * MICRO_BATCHES)); fi

exec "$PYTHON" -m "${ENTRY:-train}" \
    --model-config="$model" --optimizer="${OPTIMIZER:-q_galore_adamw8bit}" \
    --weight-bits="$weight_bits" --proj-bits=4 --layerwise --activation-checkpointing --dtype=bfloat16 \
    --rank="$rank" --update-proj-gap=500 --stagger --scale=0.25 --lr=0.004 --weight-decay=0 \
    --warmup-steps=$((steps / 10)) --scheduler=cosine --min-lr-ratio=0.1 \
    --batch-size="$batch" --total-batch-size="$total" --accumulation-buffer=8bit --seq-len="$seq" --max-steps="$steps" --data="$data" \
    --eval-every=1000 --save-every=1000 --output-dir="$out" "$@"
