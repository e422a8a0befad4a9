#!/usr/bin/env bash
# Training throughput and memory on CPU: llama_60m (GaLore's size, vocab 32000; byte tokenizer on
# the built-in corpus), batch 4 x 128 tokens, 10 steps per optimizer, each in its own process,
# one intra-op thread (OMP_NUM_THREADS=1, so that figures from a shared machine are not dominated
# by threads spinning), seed 0. Low-rank optimizers: rank 128 (GaLore's for 60M), gap 50.
# Peak memory = the process's peak RSS (torch and transformers included); optimizer state = bytes
# of its state tensors; tokens/s over all steps, the first refresh included.
#   bash scripts/bench/train_cpu.sh [--optimizers adamw,galore_adamw,q_galore_adamw8bit] [--steps 10]
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-.venv/bin/python}" -m train.quickstart --model-config=configs/llama_60m.json --batch-size=4 --seq-len=128 \
    --rank=128 --steps=10 --optimizers=adamw,galore_adamw --output-root=runs/bench_train_cpu "$@"
