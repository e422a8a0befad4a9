#!/usr/bin/env bash
# LLaMA-60m on C4 with GaLore (rank 128, 10000 steps: GaLore's setting for this size). Environment
# overrides and extra flags: see scripts/pretrain_common.sh. Example, offline and short:
#   DATA=builtin STEPS=100 bash scripts/pretrain_llama60m.sh --eval-every=50
. "$(dirname "$0")/pretrain_common.sh"
pretrain 60m 128 10000 "$@"
