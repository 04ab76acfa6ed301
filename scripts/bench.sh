#!/usr/bin/env bash
# Set up (virtualenv, torch, triton, genkernels with its CUDA extension) and run the benchmark suite.
# On a machine without a GPU it says so and runs the correctness self-check of every backend.
# Extra arguments go to `genkernels bench`, e.g. scripts/bench.sh --quick --out /tmp/results
caller=$PWD
source "$(dirname "$0")/_env.sh" # works in the repository root
repo=$PWD
# Relative paths among the arguments (--out, --redraw) are the caller's; the default output folder and the
# package are this checkout's.
cd "$caller"
OUT="${OUT:-$repo/benchmarks/results}" PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" python -m genkernels bench "$@"
