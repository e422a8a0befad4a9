#!/usr/bin/env bash
# Training figures on one GPU (protocol; run on the device machine, bf16 throughout):
#  1. llama_350m (GaLore's size, vocab 32000, byte tokenizer on the built-in corpus), batch 16 x 256,
#     10 steps, AdamW (lr 3e-3) vs GaLore-AdamW (rank 256, gap 50, exact SVD), each in its own
#     process: peak memory = torch.cuda.max_memory_allocated after the model is built; tokens/s.
#  2. a few real steps of scripts/pretrain_llama7b.sh (Q-GaLore recipe: INT8 weights, INT4
#     projections, 8-bit Adam, layer-wise, activation checkpointing, rank 1024, batch 16 x 256) on the
#     built-in corpus, first refresh by randomized SVD (an exact SVD of all 224 matrices takes
#     minutes): peak allocated and reserved from metrics.jsonl, tokens/s.
#   bash scripts/bench/train_gpu.sh [output root, default runs/bench_train_gpu]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
root=${1:-runs/bench_train_gpu}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
"$PY" -m train.quickstart --model-config=configs/llama_350m.json --batch-size=16 --seq-len=256 --rank=256 --steps=10 \
    --optimizers=adamw,galore_adamw --output-root="$root/350m" --dtype=bfloat16 --progress=False
STEPS=${STEPS_7B:-4} DATA=builtin BATCH_SIZE=16 OUTPUT_DIR="$root/7b" PYTHON="$PY" bash scripts/pretrain_llama7b.sh \
    --proj-method=randomized_svd --eval-every="${STEPS_7B:-4}" --eval-batches=2 --progress=False
"$PY" - "$root/7b/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print(f"7B step {r['step']}: loss {r['loss']:.3f}  tokens/s {r['tokens_per_s']:.0f}  "
          f"peak allocated {r['peak_mem_bytes'] / 2**30:.2f} GiB  peak reserved {r['peak_mem_reserved_bytes'] / 2**30:.2f} GiB")
PY
