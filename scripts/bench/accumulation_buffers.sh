#!/usr/bin/env bash
# Low-rank gradient accumulation with layer-wise updates: the loss with each --accumulation-buffer
# against whole gradients accumulated in .grad (full). configs/llama_small.json, built-in byte
# corpus, 4 micro-batches of 4 x 64 tokens per step, 300 steps, GaLore-AdamW rank 64, gap 20,
# scale 0.25, lr 1e-2 (warm-up 30, cosine), float32 on CPU, one thread per run, two runs at a time.
# "full" also runs with seed 1 (init, data order, optimizer) to show the seed-to-seed noise.
# Prints per run: the mean of the last 10 train losses and the val loss at step 300.
#   bash scripts/bench/accumulation_buffers.sh [output root, default runs/bench_accumulation]
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
PYTHON=${PYTHON:-.venv/bin/python}
root=${1:-runs/bench_accumulation}
run() {  # name buffer seed
    "$PYTHON" -m train --model-config=configs/llama_small.json --optimizer=galore_adamw --rank=64 \
        --update-proj-gap=20 --scale=0.25 --lr=0.01 --warmup-steps=30 --batch-size=4 --total-batch-size=16 \
        --seq-len=64 --max-steps=300 --eval-every=300 --layerwise --accumulation-buffer="$2" --seed="$3" \
        --save=False --progress=False --output-dir="$root/$1" > "$root/$1.log" 2>&1
}
mkdir -p "$root"
run full full 0 & run float32 float32 0 & wait
run bfloat16 bfloat16 0 & run 8bit 8bit 0 & wait
run full_seed1 full 1 & wait
for name in full float32 bfloat16 8bit full_seed1; do
    "$PYTHON" - "$root/$name/metrics.jsonl" "$name" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
train = [r["loss"] for r in records if "loss" in r][-10:]
val = [r["val_loss"] for r in records if "val_loss" in r][-1]
print(f"{sys.argv[2]}: train (last 10) {sum(train) / len(train):.4f}, val {val:.4f}")
PY
done
