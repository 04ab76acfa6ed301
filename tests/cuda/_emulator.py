"""Building and running the CPU emulations of the CUDA kernels (``tests/cuda/emulator``).

A kernel's device source lives in a header under ``csrc/include/genkernels`` that its ``.cu`` file
compiles with nvcc; a driver in ``tests/cuda/emulator`` includes the same header after the emulated
CUDA built-ins of ``simt.h`` and compiles with a plain C++20 compiler, using the CUDA toolkit's headers
only for the fp16 / bf16 conversions. Each driver prints ``CASES ...`` first, then one
``RESULT ok|FAIL ...`` line per case and exits 0 when every case passes, 1 when one fails and 2 when
the emulator stops on a broken rule of the execution model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EMULATOR = Path(__file__).resolve().parent / "emulator"
# -fno-strict-aliasing: kernels type-pun memory (uint16_t tiles read as uint4), as CUDA allows.
# -Wno-unknown-pragmas: the kernels' "#pragma unroll" is for nvcc.
CXXFLAGS = ["-std=c++20", "-O2", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
TIMEOUT_S = 600


def cuda_include_dir() -> Path | None:
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


def cxx20_compiler(tmp: Path) -> str | None:
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


def build(tmp: Path, source: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles the emulator driver `source` (a file in tests/cuda/emulator) into `tmp` and returns the binary.

    Skips the calling test without CUDA headers or a C++20 compiler; fails it when compilation fails.
    """
    include = cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA headers (cuda_fp16.h) found in $CUDA_HOME, $CUDA_PATH, nvcc's toolkit or /usr/local/cuda")
    cxx = cxx20_compiler(tmp)
    if cxx is None:
        pytest.skip("no C++20 compiler with <ucontext.h> ($CXX, g++, c++ or clang++)")
    binary = tmp / source.stem
    includes = [f"-I{ROOT / 'csrc' / 'include'}", f"-I{include}"]
    cmd = [cxx, *CXXFLAGS, *extra_flags, *includes, str(source), "-o", str(binary)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"compiling the emulator failed:\n{' '.join(cmd)}\n{result.stderr[-8000:]}"
    return binary


def jobs() -> int:
    """Worker threads for a driver: the CPUs this process may use, at most 8."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, 8))
