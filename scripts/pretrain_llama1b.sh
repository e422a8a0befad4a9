#!/usr/bin/env bash
# LLaMA-1b on C4 with GaLore (rank 512, 100000 steps: GaLore's setting for this size). Environment
# overrides and extra flags: see scripts/pretrain_common.sh. Example, offline and short:
#   DATA=builtin STEPS=100 bash scripts/pretrain_llama1b.sh --eval-every=50
. "$(dirname "$0")/pretrain_common.sh"
pretrain 1b 512 100000 "$@"
