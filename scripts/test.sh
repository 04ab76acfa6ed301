#!/usr/bin/env bash
# Set up (virtualenv, torch, triton, genkernels with its CUDA extension) and run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k group_norm
source "$(dirname "$0")/_env.sh"
ruff check genkernels tests benchmarks scripts
python -m genkernels info
python -m pytest tests -q "$@"
