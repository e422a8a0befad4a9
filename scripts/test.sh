#!/usr/bin/env bash
# Set up a virtual environment (if needed) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh dev
# wandb's sweep schema ships inside the `sweeps` wheel, whose dependencies pin an old numpy: the
# wheel is fetched (not installed) here, so the test run itself needs no network.
[ -n "$(ls build/wheels/sweeps-0.3.0-*.whl 2>/dev/null)" ] || pip download -q --no-deps sweeps==0.3.0 -d build/wheels
# One thread per process: pytest runs 2 workers on CI's 2 cores, and spinning OpenMP threads
# that oversubscribe them slow linear algebra down by an order of magnitude.
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" python -m pytest "$@"
