#!/usr/bin/env bash
# LLaMA-350m on C4 with GaLore (rank 256, 60000 steps: GaLore's setting for this size). Environment
# overrides and extra flags: see scripts/pretrain_common.sh. Example, offline and short:
#   DATA=builtin STEPS=100 bash scripts/pretrain_llama350m.sh --eval-every=50
. "$(dirname "$0")/pretrain_common.sh"
pretrain 350m 256 60000 "$@"
