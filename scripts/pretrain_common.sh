# Sourced by scripts/pretrain_llama*.sh: C4 pretraining with each optimizer's published recipe, as
# one function. Settings come from the environment; extra arguments are passed to the CLI last, so
# any flag can be overridden (argparse keeps the last value).
#   OPTIMIZER (galore_adamw)  LR (the recipe's; use 0.001 for adamw)  STEPS (the size's)  BATCH_SIZE (per GPU, 64)
#   TOTAL_BATCH_SIZE (512)  SEQ_LEN (256)  DATA (c4; builtin runs offline)  OUTPUT_DIR (runs/llama<size>_<optimizer>)
#   PYTHON (python)
#
# The recipes (the setup shared by all: 512 sequences of 256 tokens per step, 10% warm-up, cosine
# to 10% of the lr, no weight decay, no clipping, bf16):
#   GaLore (Zhao et al., 2024; its repository's scripts/benchmark_c4/llama_*.sh): lr 0.01, rank per size
#     (the RANK argument), a new subspace every 200 steps, scale 0.25; galore_adamw with eps 1e-6, the
#     default of galore-torch's GaLoreAdamW that those scripts ran (ours is torch's 1e-8). Every optimizer
#     without a recipe of its own below runs this one.
#   Q-GaLore (Zhang et al., 2024; VITA-Group/Q-GaLore scripts/pretrain_c4/llama_{60m,130m,350m,1b}.sh
#     and the betas of its run_pretrain.py): betas (0.9, 0.95), lr 0.015 at 60m and 130m, 0.01 at
#     350m and 1b, rank 128 / 256 / 256 / 1024, gap 200, scale 0.25, INT8 weights, INT4 projections;
#     its adaptive refresh (cos_threshold 0.4, gamma 2, queue 5) is q_galore_adamw8bit's default.
#   DCT-AdamW (Modoranu et al., arXiv 2505.17967; the authors' code): a new DCT subspace every step,
#     scale 1, and the discarded part fed back in a 4-bit NormalFloat buffer (dct_adamw's class defaults, chosen on
#     the CPU training benchmark, configs/sweeps/cpu_small.yaml); the paper gives no C4 lr: 0.0025,
#     the best there (lr 0.01 at scale 0.25, the same step on the projected weights but 0.01 on the
#     full-rank ones, was 6.2% behind GaLore-SVD over three seeds with a min-max 4-bit buffer, against
#     5.3% at 0.0025).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# recipe OPTIMIZER SIZE RANK: the recipe's flags (see above), one a line
recipe() {
    local optimizer=$1 size=$2 rank=$3
    case $optimizer in
        q_galore_adamw8bit)
            local lr=0.015 q_rank=$rank
            case $size in 350m) lr=0.01 ;; 1b) lr=0.01 q_rank=1024 ;; esac
            printf '%s\n' "--lr=${LR:-$lr}" --betas=0.9,0.95 "--rank=$q_rank" --update-proj-gap=200 --scale=0.25 \
                --weight-bits=8 --proj-bits=4 ;;
        galore_adamw)
            printf '%s\n' "--lr=${LR:-0.01}" --eps=1e-6 "--rank=$rank" --update-proj-gap=200 --scale=0.25 ;;
        dct_adamw)
            printf '%s\n' "--lr=${LR:-0.0025}" "--rank=$rank" --update-proj-gap=1 --scale=1 --error-feedback=nf4 ;;
        *)
            printf '%s\n' "--lr=${LR:-0.01}" "--rank=$rank" --update-proj-gap=200 --scale=0.25 ;;
    esac
}

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
    local flags
    mapfile -t flags < <(recipe "$optimizer" "$size" "$rank")
    "${launcher[@]}" -m train \
        --model-config="configs/llama_${size}.json" --optimizer="$optimizer" "${flags[@]}" \
        --batch-size="${BATCH_SIZE:-64}" --total-batch-size="${TOTAL_BATCH_SIZE:-512}" --seq-len="${SEQ_LEN:-256}" \
        --max-steps="$steps" --warmup-steps=$((steps / 10)) --scheduler=cosine --min-lr-ratio=0.1 \
        --grad-clip=0 --weight-decay=0 --dtype=bfloat16 --data="${DATA:-c4}" \
        --eval-every=1000 --save-every=1000 --output-dir="${OUTPUT_DIR:-runs/llama${size}_${optimizer}}" "$@"
}
