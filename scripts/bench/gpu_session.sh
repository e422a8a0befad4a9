#!/usr/bin/env bash
# Every GPU check of the project in one run; the steps, in order of importance, and what each
# writes under ${OUT:-runs/gpu_session} are listed in docs/gpu.md. BUDGET_S (default 520: under
# 540 s on one H200, start-up included) bounds the whole run; each step gets at most its own limit
# and what is left, and a step that would get under 20 s is skipped and says so. No checkpoint is
# written. The GPU image lacks bitsandbytes: carry its wheel and put it on PYTHONPATH first.
#   bash scripts/bench/gpu_session.sh            # on the GPU machine, from anywhere
#   bash scripts/bench/gpu_session.sh --dry-run  # the same steps on the CPU, tiny configurations
#                                                # (limits x DRY_RUN_SLACK, 4; set BUDGET_S to match)
set -uo pipefail
cd "$(dirname "$0")/../.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; fi
out=${OUT:-runs/gpu_session}
budget=${BUDGET_S:-520}
PY=${PYTHON:-python3}
mkdir -p "$out"
log="$out/session.log"
: > "$log"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

# step NAME LIMIT_S COMMAND...: run within the budget; its output goes to session.log
step() {
    local name=$1 limit=$2
    shift 2
    limit=$((limit * slack))
    local left=$((budget - SECONDS - 5))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped (${left} s of the budget left)" | tee -a "$log"
        return
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "== $name (limit ${limit} s, at ${SECONDS} s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | grep -v "gemm_4bit_forward" >> "$log"
    echo "   rc=${PIPESTATUS[0]}, done at ${SECONDS} s" | tee -a "$log"
}

if [ "$dry" = 1 ]; then
    # a shared CPU runs the tiny steps several times slower than their GPU limits allow for
    slack=${DRY_RUN_SLACK:-4} values=$((1 << 16))
    device=cpu recipe=(env SMOKE=1) tiny_memory=(--cpu-peak memtracker --model-config configs/llama_tiny.json --rank 8 --batch-size 2 --seq-len 32)
    shapes=(--shapes 64x96 --rank 8 --threads 1)
else
    slack=1 values=$((1 << 20))
    device=cuda recipe=(env) tiny_memory=(--model-config configs/llama_130m.json --rank 256 --batch-size 8 --seq-len 256)
    shapes=(--shapes 4096x4096,4096x11008 --rank 1024 --threads 16)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$log" 2>&1
fi

step "0. bitsandbytes on $device" 60 "$PY" -c "
import bitsandbytes, torch
from lowmem_optim.quant.blockwise import dequantize_blockwise, quantize_blockwise
x = torch.randn($values, device='$device')
codes, absmax = quantize_blockwise(x, signed=True)
error = float((dequantize_blockwise(codes, absmax, signed=True) - x).abs().max() / x.abs().max())
print('torch', torch.__version__, 'bitsandbytes', bitsandbytes.__version__, 'codes on', codes.device,
      'max relative error', round(error, 4))
assert codes.device.type == '$device' and error < 0.02
"
for card in 16 12 24; do
    step "1. the ${card} GB 7B recipe vs the floor" 100 "${recipe[@]}" ENTRY=scripts.bench.recipe_step GPU_MEMORY="$card" \
        STEPS=2 MICRO_BATCHES=4 DATA=builtin OUTPUT_DIR="$out/split$card" PYTHON="$PY" \
        bash scripts/pretrain_llama7b.sh --floor --proj-method=randomized_svd
done
step "2. CUDA tests" 100 "$PY" -m pytest -p no:cacheprovider -o addopts="" -q -m cuda $(grep -rl "mark.cuda" tests)
step "3. memory model vs allocator" 60 "$PY" -m scripts.bench.recipe_step --device "$device" \
    --optimizer q_galore_adamw8bit --weight-bits 8 --proj-bits 4 --activation-checkpointing --layerwise \
    --proj-method randomized_svd --max-steps 3 --output-dir "$out/memory" "${tiny_memory[@]}"
step "4. the 16 GB 7B recipe through the training CLI" 120 "${recipe[@]}" GPU_MEMORY=16 STEPS=2 DATA=builtin OUTPUT_DIR="$out/recipe7b" \
    PYTHON="$PY" bash scripts/pretrain_llama7b.sh --proj-method=randomized_svd --eval-batches=1 --save=False \
    --progress=False
step "5. refresh cost at LLaMA-7B shapes" 45 "$PY" scripts/bench/projection_cost.py --device "$device" "${shapes[@]}"

grep -E "^(== [13]\.|floor:|ours|memory model)" "$log"
echo "total ${SECONDS} s; results in $out"
