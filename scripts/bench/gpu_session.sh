#!/usr/bin/env bash
# Every GPU check of the project in one run (a lent device gives ~15 minutes per session; this
# script is sized for about 9). Run from the repository root on the GPU machine:
#   1. the CUDA-marked tests (every optimizer on CUDA vs CPU, INT8 layer, fp16 GradScaler);
#   2. the memory model against torch.cuda.max_memory_allocated on small configs (goal: within 10%);
#   3. train_gpu.sh: llama_350m AdamW vs GaLore, and real steps of pretrain_llama7b.sh
#      (peak allocated and reserved, tokens/s; goal: reserved <= 15 GiB);
#   4. projection cost on CUDA (exact SVD vs randomized SVD vs DCT) at LLaMA-7B shapes.
# The GPU image lacks bitsandbytes: carry its wheel (see /work/.library/device/README.md) and put
# it on PYTHONPATH before calling this script. Output goes to ${OUT:-runs/gpu_session}.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-runs/gpu_session}
mkdir -p "$out"
export PYTHONPATH=".:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

echo "== 1. CUDA tests"
timeout 120 python3 -m pytest -p no:cacheprovider -o addopts="" -q -m cuda tests 2>&1 | tail -15 | tee "$out/cuda_tests.txt"

echo "== 2. memory model vs CUDA allocator"
for setup in "configs/llama_60m.json adamw" "configs/llama_60m.json galore_adamw8bit --rank 128" \
             "configs/llama_130m.json q_galore_adamw8bit --rank 256 --weight-bits 8 --proj-bits 4 --activation-checkpointing --layerwise"; do
  set -- $setup
  timeout 90 python3 scripts/bench/memory_measure.py --device cuda --model-config "$1" --optimizer "$2" "${@:3}" \
      --batch-size 8 --seq-len 256 --steps 3 --out "$out/memory.jsonl" 2>&1 | tail -3
done

echo "== 3. training: llama_350m and LLaMA-7B recipe"
STEPS_7B=4 timeout 300 bash scripts/bench/train_gpu.sh "$out/train" 2>&1 | tail -20 | tee "$out/train.txt"

echo "== 4. projection cost on CUDA"
timeout 60 python3 scripts/bench/projection_cost.py --device cuda --threads 16 2>&1 | tail -12 | tee "$out/projection_cost.txt"
