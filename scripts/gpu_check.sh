#!/usr/bin/env bash
# One GPU run in one go (shared/DESIGN.md, "On a GPU machine"): build the CUDA extension for this
# machine's GPU only, `genkernels info`, the GPU tests, the benchmarks; reports and logs land in
# $OUT when set, else benchmarks/results/.
#
#   scripts/gpu_check.sh                 # PYTHON=... picks the interpreter (default: python3)
#
# Needs nothing from the network: the build uses the installed setuptools/cmake/ninja/pybind11
# (pip --no-index --no-build-isolation --no-deps). Must finish in under 8 minutes on one H100 or
# H200: each step has a time limit and the benchmarks get what is left. `genkernels bench` runs
# the ops in this order and splits that budget between them: group_norm 1 part, attention 2 (its
# cases are heavier and FlexAttention compiles per case), then schedule_step (sampler steps),
# reparam (reparameterize + KL of a VAE posterior), coupling (a flow's affine coupling and ActNorm,
# and one Glow step), bias_act (StyleGAN's bias + leaky ReLU), adaln (a DiT's adaptive LayerNorm
# and gated residual + norm at DiT-XL and FLUX shapes), rope (RoPE of q and k), half a part each,
# modconv (StyleGAN2's modulated conv block at three config-f layer shapes, a torch.compile per
# case) 1 part, imagegpt (ImageGPT sampling with the KV cache, tokens/s; no torch.compile) half a
# part, then the whole models: dit (one DiT-XL/2 block forward at 4096 and 256 tokens), vae (SD VAE
# decode, with peak memory), gan (one StyleGAN2 generator forward at 256x256, with peak memory; its
# torch.compile, about 20 s, is its last variant) and unet (an SD-like UNet step), half a part each;
# time one op leaves unused goes to the next. The whole-model ops come last, the UNet last of all:
# their torch.compile is the longest (a DiT block, VAE decode about 16 s, the generator about 20 s,
# the UNet about 50 s), so a short budget drops them first, the UNet before the others. Each op
# runs its cases most important first (bf16 before fp16; attention: the DiT-XL block's self-attention
# (reported, no goal), DiT/FLUX forward, its forward +
# backward, then SDXL ...; reparam: fp32 and bf16 forwards, then forward + backward; coupling: fp32
# and bf16 forwards, inverses, forwards + backwards, then ActNorm, then the Glow step; bias_act: bf16
# and fp32 forwards, then forward + backward; adaln: layer_norm_modulate at DiT-XL and FLUX, the
# fused pair, then the same forwards + backwards; rope: FLUX and DiT-XL forwards, then forwards +
# backwards; modconv: the three forwards, then the three forwards + backwards; dit: 4096 tokens,
# then 256; --quick, used when time is short, keeps only the coupling, bias_act, adaln, rope and
# modconv forwards and dit's 4096-token case) and reports those not started in time as "not run".
# Without a GPU (a dry run) it
# skips the build and the GPU steps, and runs the CPU self-check of every backend.
#
# Files written (few on purpose: a GPU machine hands back at most 8 files from $OUT):
#   gpu_check.log         everything printed, every step
#   bench.md, bench.json  the benchmark tables, summary and goals; one JSON record per case
#   bench.png             speedups vs eager (attention: vs SDPA flash)
#   pytest_benchmark.json the pytest-benchmark harness on a GroupNorm, an attention and a reparameterize
#                         case (a check that it runs)
#   selfcheck.md, .json   without a GPU: the CPU self-check of each backend
#
# A focused run (one op family, a short device lease) narrows it with environment variables:
#   GPU_CHECK_OPS=bias_act,modconv,gan   the ops to benchmark (default: all)
#   GPU_CHECK_TESTS="tests/ops/test_bias_act.py tests/ops/test_modconv.py"
#                                        the test paths for the GPU test step (default: the whole suite)
#   GPU_CHECK_TEST_LIMIT_S=90            that step's time limit (default 150), cut down (not below 60 s) where it
#                                        would leave the benchmarks less than
#   GPU_CHECK_BENCH_MIN_S=120            the benchmarks' budget the tests must leave (default 120; 0: tests first)
#   GPU_CHECK_DEADLINE_S=300             seconds by which everything must be done (default 450)
#   GPU_CHECK_RESERVE_S=20               of the time left before the benchmarks, what they leave for the
#                                        case in flight and the pytest-benchmark check (default 105)
#
# Exit status: 0 when every step passed, 1 otherwise; a failing step does not stop the later ones.

set -uo pipefail # no -e: a failed build or test is reported, and the benchmarks still run

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
PY="${PYTHON:-python3}"
# Seconds from the start by which everything must be done: 8 minutes less a margin for the
# machine's own start-up and the last step running over.
DEADLINE_S="${GPU_CHECK_DEADLINE_S:-450}"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

STEPS=()
FAILED=0

left() { echo $((DEADLINE_S - SECONDS)); }

# step NAME LIMIT_S CMD...: run CMD under a time limit, record how it went; returns CMD's status.
step() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (at ${SECONDS}s, limit ${limit}s): $*"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    local took=$((SECONDS - t0)) why="exit $rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after ${limit}s"
    if [ "$rc" -eq 0 ]; then
        STEPS+=("ok       $name (${took}s)")
    else
        STEPS+=("FAILED   $name ($why, ${took}s)")
        FAILED=1
    fi
    return "$rc"
}

skip() {
    echo
    echo "=== $1: skipped ($2)"
    STEPS+=("skipped  $1 ($2)")
}

# The arch of GPU 0 as GENKERNELS_CUDA_ARCHS takes it: 9.0 -> 90a (Hopper's wgmma needs the
# arch-specific target, as do later majors' tensor-core instructions), 8.6 -> 86.
gpu_arch() {
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
    [ -n "$cap" ] || return 1
    local major=${cap%%.*} minor=${cap#*.}
    if [ "$major" -ge 9 ]; then echo "${major}${minor}a"; else echo "${major}${minor}"; fi
}

# The GPU test step's time limit: GPU_CHECK_TEST_LIMIT_S, cut down (to no less than 60 s) where it would leave the
# benchmarks, the main job, less than GPU_CHECK_BENCH_MIN_S of the deadline; says so (on stderr) when it cuts. A
# test limit that left them 30 s once ran them --quick, and their first case outlasted the step: no report at all.
gpu_test_limit() {
    local limit="${GPU_CHECK_TEST_LIMIT_S:-150}"
    local room=$(($(left) - ${GPU_CHECK_RESERVE_S:-105} - ${GPU_CHECK_BENCH_MIN_S:-120}))
    [ "$room" -lt 60 ] && room=60
    if [ "$room" -lt "$limit" ]; then
        echo "the GPU tests get ${room}s, not ${limit}s: the benchmarks keep ${GPU_CHECK_BENCH_MIN_S:-120}s" \
            "(GPU_CHECK_BENCH_MIN_S) of the ${DEADLINE_S}s deadline" >&2
        limit=$room
    fi
    echo "$limit"
}

main() {
    echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(uname -n), repo $(pwd), output $OUT_DIR"
    echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)' 2>&1)"

    local has_gpu=0 arch=""
    if command -v nvidia-smi >/dev/null 2>&1 && arch=$(gpu_arch) \
        && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        has_gpu=1
        nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
        command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
    else
        echo "No CUDA GPU here (nvidia-smi or torch.cuda sees none): a dry run. Build and GPU tests are skipped;"
        echo "the benchmark step runs the CPU self-check of each backend instead."
    fi

    if [ "$has_gpu" = 1 ]; then
        export GENKERNELS_CUDA_ARCHS="${GENKERNELS_CUDA_ARCHS:-$arch}"
        export GENKERNELS_BUILD_JOBS="${GENKERNELS_BUILD_JOBS:-$(nproc)}"
        # On a GPU machine a missing extension is a failure, not the CPU-only install setup.py falls back to.
        export GENKERNELS_REQUIRE_CUDA=1
        echo "building for GENKERNELS_CUDA_ARCHS=$GENKERNELS_CUDA_ARCHS"
        step "build (pip install -e)" 180 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .
        local rc=$?
        # A pip that failed (not one that ran out of time) may be a packaging problem: try the plain build,
        # within what is left of the 200 s both builds may take together.
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] && [ -f setup.py ] && [ "$SECONDS" -le 170 ]; then
            step "build (setup.py build_ext --inplace)" $((200 - SECONDS)) "$PY" setup.py build_ext --inplace
        fi
        step "extension import" 30 "$PY" -c \
            'import genkernels._C as c; print("genkernels._C built for", c.built_archs())'
    else
        skip "build" "no GPU"
    fi

    step "genkernels info" 30 "$PY" -m genkernels info

    if [ "$has_gpu" = 1 ]; then
        # The whole suite: on a GPU the fp32/fp16 cases run compiled, not interpreted, and the
        # `gpu`-marked ones (cuda, bf16, benchmark shapes, CUDA graphs) run too. Eight shards in
        # parallel: most of the time is Triton compiling kernel specializations, one core each.
        # The CPU machines' stand-ins are left out: the compile check (tests/triton/test_compile.py),
        # since here every kernel the tests launch compiles for real and that check would run once
        # per shard, and the CUDA kernels' CPU emulation (tests/cuda/test_*_emulated.py, minutes of
        # host compiling and running), since here the CUDA kernels themselves run in the cuda tests.
        local test_limit
        test_limit=$(gpu_test_limit)
        step "tests on the GPU (8 shards of pytest ${GPU_CHECK_TESTS:-tests})" "$test_limit" \
            env PYTHON="$PY" TEST_PATHS="${GPU_CHECK_TESTS:-tests}" scripts/test_shards.sh 8 \
            --ignore=tests/triton/test_compile.py --ignore-glob='tests/cuda/test_*_emulated.py'
    else
        skip "GPU tests" "no GPU"
    fi

    if [ "$has_gpu" = 1 ]; then
        # What is left, less the allowance for the case in flight when the budget ends and the
        # reports (60 s: an attention case with FlexAttention's forward + backward compile, or the
        # VAE decode case, whose torch.compile alone takes about 16 s on an H200) and for
        # the pytest-benchmark check after it (45 s). Short of time: bf16 cases only, and at least
        # the first few of them (worst case, every earlier step at its limit, builds 200 s: 410 s).
        # Reports are rewritten after every case, so even a step stopped by its limit leaves them.
        local budget=$(($(left) - ${GPU_CHECK_RESERVE_S:-105})) quick=()
        if [ "$budget" -lt 60 ]; then
            quick=(--quick)
            [ "$budget" -lt 30 ] && budget=30
        fi
        # Never past the deadline, never under a minute (in the worst case above: 60 s, ending at
        # 470 s, still under 8 minutes).
        local limit=$((budget + 60))
        [ "$limit" -gt "$(left)" ] && limit=$(left)
        [ "$limit" -lt 60 ] && limit=60
        local ops=()
        [ -n "${GPU_CHECK_OPS:-}" ] && ops=(--ops "$GPU_CHECK_OPS")
        step "benchmarks (genkernels bench ${GPU_CHECK_OPS:-})" "$limit" \
            "$PY" -m genkernels.bench --out "$OUT_DIR" --budget-s "$budget" ${quick[@]+"${quick[@]}"} \
            ${ops[@]+"${ops[@]}"}
        if [ "$(left)" -ge 30 ]; then
            limit=$(left)
            [ "$limit" -gt 60 ] && limit=60
            local pick="(1x128x512x512 and NCHW and bf16 and not fwd_bwd)"
            pick+=" or (SDXL and bf16 and not fwd_bwd and (SDPA-flash or triton))"
            pick+=" or (test_reparam and fp32 and not fwd_bwd and triton)"
            step "pytest-benchmark harness (three cases)" "$limit" "$PY" -m pytest \
                benchmarks/test_group_norm.py benchmarks/test_attention.py benchmarks/test_reparam.py \
                -q -p no:cacheprovider -k "$pick" --benchmark-json="$OUT_DIR/pytest_benchmark.json"
        else
            skip "pytest-benchmark harness" "out of time"
        fi
    else
        local ops=()
        [ -n "${GPU_CHECK_OPS:-}" ] && ops=(--ops "$GPU_CHECK_OPS")
        step "CPU self-check (genkernels bench without a GPU)" 600 "$PY" -m genkernels.bench --out "$OUT_DIR" \
            ${ops[@]+"${ops[@]}"}
        step "pytest-benchmark harness (collected, skipped without a GPU)" 120 \
            "$PY" -m pytest benchmarks -q -p no:cacheprovider -rs
    fi

    echo
    echo "=== steps (total ${SECONDS}s)"
    printf '  %s\n' "${STEPS[@]}"
    echo "outputs in $OUT_DIR:"
    ls -l "$OUT_DIR" | tail -n +2 | sed 's/^/  /'
    echo
    # The summary table last, as the one thing to read.
    if [ -f "$OUT_DIR/bench.md" ] && [ "$has_gpu" = 1 ]; then
        awk '/^## .*: summary$/ {on = 1} /^## / && !/: summary$/ {on = 0} on' "$OUT_DIR/bench.md"
    elif [ -f "$OUT_DIR/selfcheck.md" ]; then
        cat "$OUT_DIR/selfcheck.md"
    fi
    if [ "$FAILED" -ne 0 ]; then
        echo "gpu_check: some steps FAILED (see above and $LOG)"
        return 1
    fi
    echo "gpu_check: all steps passed"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then # sourced (the tests): the functions only
    main "$@" 2>&1 | tee "$LOG"
    exit "${PIPESTATUS[0]}"
fi
