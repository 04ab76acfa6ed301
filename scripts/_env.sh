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
# Install (editable) when the build inputs changed since the last install, or when asked.
stamp="$VENV/.genkernels-build-inputs"
inputs=$(cat pyproject.toml setup.py CMakeLists.txt $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
if [ "${GENKERNELS_REBUILD:-0}" = 1 ] || [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  echo "installing genkernels, with its CUDA extension for ${GENKERNELS_CUDA_ARCHS:-80;86;89;90a} when nvcc is" \
    "found (minutes; GENKERNELS_CUDA_ARCHS=90a builds one architecture, GENKERNELS_NO_CUDA=1 none)" >&2
  pip install -q -e ".[test,bench]"
  echo "$inputs" > "$stamp"
fi
