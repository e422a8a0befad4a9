#!/usr/bin/env bash
# The README's main command: set up a virtual environment (as scripts/test.sh does), then train
# a small LLaMA offline on CPU with GaLore and with AdamW and print loss, memory and speed side
# by side (python -m train.quickstart; its --steps, --optimizers and --output-root pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
# Install torch only where it is missing: a GPU user's own build is kept; on our CPU machines
# torch==2.13.0 resolves to the CPU build on local disk (a bare "torch" would pull a CUDA build).
python -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -q -e ".[train]"
python -m train.quickstart "$@"
