#!/usr/bin/env bash
# Set up (virtualenv, torch, triton, genkernels with its CUDA extension) and run the benchmark suite.
# On a machine without a GPU it says so and runs the correctness self-check of every backend.
# Extra arguments go to `genkernels bench`, e.g. scripts/bench.sh --quick --out /tmp/results
source "$(dirname "$0")/_env.sh"
python -m genkernels bench "$@"
