#!/usr/bin/env bash
# LLaMA-130m on C4 with GaLore (rank 256, 20000 steps: GaLore's setting for this size). Environment
# overrides and extra flags: see scripts/pretrain_common.sh. Example, offline and short:
#   DATA=builtin STEPS=100 bash scripts/pretrain_llama130m.sh --eval-every=50
. "$(dirname "$0")/pretrain_common.sh"
pretrain 130m 256 20000 "$@"
