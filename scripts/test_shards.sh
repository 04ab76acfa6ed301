#!/usr/bin/env bash
# Run the test suite as N pytest processes in parallel (GENKERNELS_TEST_SHARD=i/N, see
# tests/conftest.py), then print each shard's output in order. On a GPU machine most of the
# suite's time is Triton compiling one kernel specialization after another on one core; shards
# compile on N cores at once and share the GPU.
#
#   scripts/test_shards.sh N [pytest arguments]      # PYTHON=... picks the interpreter (default: python3)
#   TEST_PATHS="tests/ops tests/models/test_gan.py" scripts/test_shards.sh N    # other paths than tests/
#
# Exit status: 0 when every shard passed, 1 otherwise; 124 when stopped by SIGTERM/SIGINT (the
# output of every shard so far is printed first).
set -u
n=${1:?usage: scripts/test_shards.sh N [pytest arguments]}
shift
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
logs=$(mktemp -d)
pids=()

report() {
    for i in $(seq 0 $((n - 1))); do
        echo "--- shard $i/$n"
        cat "$logs/shard$i.log" 2>/dev/null
    done
}

stop() {
    kill "${pids[@]}" 2>/dev/null
    wait
    report
    echo "test_shards: stopped before every shard finished"
    exit 124
}
trap stop TERM INT

for i in $(seq 0 $((n - 1))); do
    # shellcheck disable=SC2086 # TEST_PATHS is a list of paths, split on spaces on purpose
    GENKERNELS_TEST_SHARD="$i/$n" "$PY" -m pytest ${TEST_PATHS:-tests} -q -p no:cacheprovider -rfE "$@" \
        >"$logs/shard$i.log" 2>&1 &
    pids+=($!)
done
rc=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || rc=1
done
report
[ "$rc" -eq 0 ] && echo "test_shards: all $n shards passed" || echo "test_shards: some shards FAILED"
exit "$rc"
