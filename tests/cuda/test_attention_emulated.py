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

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EMULATOR = Path(__file__).resolve().parent / "emulator"
SOURCE = EMULATOR / "attention_forward_emu.cpp"
# -fno-strict-aliasing: the kernel type-puns shared memory (uint16_t tiles read as uint4), as CUDA allows.
# -Wno-unknown-pragmas: the kernel's "#pragma unroll" is for nvcc.
CXXFLAGS = ["-std=c++20", "-O2", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
RESULT = re.compile(r"^RESULT (ok|FAIL) (\S+) (.*?) \| (.*)$")
TIMEOUT_S = 600


def _cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory, or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    roots.append("/usr/local/cuda")
    for root in filter(None, roots):
        for include in [Path(root) / "include", *sorted(Path(root).glob("targets/*/include"))]:
            if (include / "cuda_fp16.h").is_file() and (include / "vector_types.h").is_file():
                return include
    return None


def _cxx20_compiler(tmp: Path) -> str | None:
    """The first C++ compiler that builds a C++20 program using <ucontext.h>, or None."""
    probe = tmp / "probe.cpp"
    probe.write_text(
        "#include <ucontext.h>\n"
        'static_assert(__cplusplus >= 202002L, "C++20");\n'
        "int main() { ucontext_t c; return getcontext(&c); }\n"
    )
    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    for name in filter(None, candidates):
        path = shutil.which(name)
        if path is None:
            continue
        result = subprocess.run(
            [path, "-std=c++20", "-pthread", str(probe), "-o", str(tmp / "probe")], capture_output=True, text=True
        )
        if result.returncode == 0:
            return path
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    """The emulator binary, compiled from the kernel header and tests/cuda/emulator."""
    tmp = tmp_path_factory.mktemp("attention_emu")
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA headers (cuda_fp16.h) found in $CUDA_HOME, $CUDA_PATH, nvcc's toolkit or /usr/local/cuda")
    cxx = _cxx20_compiler(tmp)
    if cxx is None:
        pytest.skip("no C++20 compiler with <ucontext.h> ($CXX, g++, c++ or clang++)")
    binary = tmp / "attention_forward_emu"
    cmd = [cxx, *CXXFLAGS, f"-I{ROOT / 'csrc' / 'include'}", f"-I{include}", str(SOURCE), "-o", str(binary)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"compiling the emulator failed:\n{' '.join(cmd)}\n{result.stderr[-8000:]}"
    return binary


def test_attention_forward_emulated(emulator):
    """Every case of the emulator driver passes in both cp.async landing modes (immediate and deferred)."""
    jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    result = subprocess.run(
        [str(emulator), "--mode", "both", "--jobs", str(max(1, min(jobs, 8)))],
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
