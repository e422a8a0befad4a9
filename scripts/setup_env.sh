# Sourced by scripts/test.sh and scripts/quickstart.sh: create and activate .venv, install the
# package with the extra named in $1 ("dev" or "train").
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
# Install torch only where it is missing: a GPU user's own build is kept; on our CPU machines
# torch==2.13.0 resolves to the CPU build on local disk (a bare "torch" would pull a CUDA build).
python -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -q -e ".[$1]"
