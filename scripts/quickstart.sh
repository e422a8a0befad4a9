#!/usr/bin/env bash
# The README's main command: set up a virtual environment (as scripts/test.sh does), then train
# a small LLaMA offline on CPU with GaLore and with AdamW and print loss, memory and speed side
# by side (python -m train.quickstart; its --steps, --optimizers and --output-root pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh train
python -m train.quickstart "$@"
