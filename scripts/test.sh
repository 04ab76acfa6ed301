#!/usr/bin/env bash
# Set up (virtualenv, torch, triton, genkernels with its CUDA extension) and run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k group_norm
source "$(dirname "$0")/_env.sh"
ruff check genkernels tests benchmarks scripts
python -m genkernels info
# Test files spread over GENKERNELS_TEST_WORKERS processes (default: the cores, at most 4; 0: this process),
# a file's tests in one process, so that a module's fixtures (the compile report, the emulators' builds) run once.
workers=${GENKERNELS_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
[ "$workers" -gt 4 ] && workers=4
python -m pytest tests -q -n "$workers" --dist loadfile "$@"
