"""The CUDA attention forward kernel computes the right thing, checked on the CPU.

Why this exists: no GPU runs the suite, and the CUDA kernel (``csrc/include/genkernels/attention_forward.cuh``,
compiled by ``csrc/attention.cu``) would otherwise be checked only when a GPU runs it. Its device source is
written against a small set of primitives (ldmatrix, mma.sync, cp.async, shuffles, barriers), so the same
source compiles with a plain C++ compiler against the emulated primitives of ``tests/cuda/emulator/simt.h``.
``tests/cuda/emulator/attention_forward_emu.cpp`` runs it, one fiber per CUDA thread, on cases covering fp16
and bf16, every padded head dim, ragged tiles, Lq > Lkv, GQA / MQA, strided and broadcast layouts, padding
masks, large magnitudes and a negative scale, under two schedules (cp.async copies landing at once, or as
late as allowed; warp 0 or the last warp running ahead), and compares out and lse with a float64 reference
under an error model of the kernel's arithmetic (see the driver's header). Indexing, masking, pipelining and
barrier mistakes show up here; what the emulator cannot see (memory-model races, hardware rounding, speed,
registers) is listed in simt.h.

Needs a C++20 compiler with <ucontext.h> ($CXX, g++, c++ or clang++) and the CUDA toolkit's headers
(cuda_fp16.h for the conversions; from $CUDA_HOME, $CUDA_PATH, the nvcc on PATH or /usr/local/cuda), and
skips without them. About 5 s to compile and 5 s to run on 2 cores.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.cuda._emulator import EMULATOR, TIMEOUT_S, build, jobs

SOURCE = EMULATOR / "attention_forward_emu.cpp"
RESULT = re.compile(r"^RESULT (ok|FAIL) (\S+) (.*?) \| (.*)$")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    """The emulator binary, compiled from the kernel header and tests/cuda/emulator."""
    return build(tmp_path_factory.mktemp("attention_emu"), SOURCE)


def test_attention_forward_emulated(emulator):
    """Every case of the emulator driver passes in both cp.async landing modes (immediate and deferred)."""
    result = subprocess.run(
        [str(emulator), "--mode", "both", "--jobs", str(jobs())],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    lines = result.stdout.splitlines()
    header = re.match(r"^CASES (\d+) MODES (\d+)$", lines[0]) if lines else None
    assert header, f"no CASES line (exit status {result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    cases, modes = int(header[1]), int(header[2])
    results = [m for m in map(RESULT.match, lines) if m]
    failed = [m[0] for m in results if m[1] == "FAIL"]
    assert not failed, f"{len(failed)} of {len(results)} emulated runs failed:\n" + "\n".join(failed)
    assert result.returncode == 0, f"emulator exited with {result.returncode}:\n{result.stderr[-4000:]}"
    assert modes == 2 and {m[2] for m in results} == {"immediate", "deferred"}
    assert len(results) == cases * modes >= 40, f"expected {cases * modes} results, got {len(results)}"
