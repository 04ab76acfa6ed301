# Sourced by scripts/test.sh and scripts/bench.sh: a virtualenv in .venv with torch, triton and
# genkernels (editable, with the CUDA extension when nvcc is found) installed. Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${GENKERNELS_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  # System site-packages: a machine that already has torch (a GPU box, say) keeps its build.
  "$PY" -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
# Build once; rebuild when asked (GENKERNELS_REBUILD=1) or when the package is missing.
if [ "${GENKERNELS_REBUILD:-0}" = 1 ] || ! python -c "import genkernels" 2>/dev/null; then
  pip install -q -e ".[test,bench]"
fi
