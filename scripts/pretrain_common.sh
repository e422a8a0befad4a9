# Sourced by scripts/pretrain_llama*.sh: GaLore's C4 recipe (Zhao et al., 2024, table 2 setup)
# as one function. Settings come from the environment; extra arguments are passed to the CLI
# last, so any flag can be overridden (argparse keeps the last value).
#   OPTIMIZER (galore_adamw)  LR (0.01; use 0.001 for adamw)  STEPS (the size's)  BATCH_SIZE (per GPU, 64)
#   TOTAL_BATCH_SIZE (512)  SEQ_LEN (256)  DATA (c4; builtin runs offline)  OUTPUT_DIR (runs/llama<size>_<optimizer>)
#   PYTHON (python)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# pretrain SIZE RANK STEPS [extra CLI flags...]
pretrain() {
    local size=$1 rank=$2 default_steps=$3
    shift 3
    local optimizer=${OPTIMIZER:-galore_adamw} steps=${STEPS:-$default_steps}
    local launcher=(${PYTHON:-python})
    # several GPUs: one process each, under torchrun (DDP)
    local gpus
    gpus=$(${PYTHON:-python} -c "import torch; print(torch.cuda.device_count())")
    if [ "$gpus" -gt 1 ]; then launcher=(torchrun --standalone --nproc_per_node "$gpus"); fi
    "${launcher[@]}" -m train \
        --model-config="configs/llama_${size}.json" --optimizer="$optimizer" --lr="${LR:-0.01}" \
        --rank="$rank" --update-proj-gap=200 --scale=0.25 \
        --batch-size="${BATCH_SIZE:-64}" --total-batch-size="${TOTAL_BATCH_SIZE:-512}" --seq-len="${SEQ_LEN:-256}" \
        --max-steps="$steps" --warmup-steps=$((steps / 10)) --scheduler=cosine --min-lr-ratio=0.1 \
        --grad-clip=0 --weight-decay=0 --dtype=bfloat16 --data="${DATA:-c4}" \
        --eval-every=1000 --save-every=1000 --output-dir="${OUTPUT_DIR:-runs/llama${size}_${optimizer}}" "$@"
}
