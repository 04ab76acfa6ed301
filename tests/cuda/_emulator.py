"""Building and running the CPU emulations of the CUDA kernels (``tests/cuda/emulator``).

A kernel's device source lives in a header under ``csrc/include/genkernels`` that its ``.cu`` file
compiles with nvcc; a driver in ``tests/cuda/emulator`` includes the same header after the emulated
CUDA built-ins of ``simt.h`` and compiles with a plain C++20 compiler, using the CUDA toolkit's headers
only for the fp16 / bf16 conversions. Each driver prints ``CASES ...`` first, then one
``RESULT ok|FAIL ...`` line per case and exits 0 when every case passes, 1 when one fails and 2 when
the emulator stops on a broken rule of the execution model. A test module compiles its driver once
(:func:`driver_fixture`) and runs it (:func:`run_driver`), then checks what the cases covered.

Needs a C++20 compiler with <ucontext.h> ($CXX, g++, c++ or clang++) and the CUDA toolkit's headers
(cuda_fp16.h for the conversions; from $CUDA_HOME, $CUDA_PATH, the nvcc on PATH or /usr/local/cuda); the
tests skip without them.
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


def driver_fixture(source: str, extra_flags: tuple[str, ...] = ()):
    """A module-scoped fixture: the binary of the driver ``tests/cuda/emulator/<source>``, compiled once."""

    @pytest.fixture(scope="module")
    def emulator(tmp_path_factory) -> Path:
        """The emulator binary, compiled from the kernel header and tests/cuda/emulator."""
        return build(tmp_path_factory.mktemp(Path(source).stem), EMULATOR / source, extra_flags)

    return emulator


def run_driver(
    binary: Path, result: re.Pattern, *args: str, header: str = r"^CASES (\d+)$"
) -> tuple[tuple[int, ...], list[re.Match]]:
    """Runs an emulator driver on :func:`jobs` threads and asserts that every case passed.

    ``args`` go before ``--jobs``; ``header`` matches the first line (``CASES <count>``, with the
    driver's own counts), ``result`` a RESULT line with ``ok`` or ``FAIL`` as its first group. Asserts
    the header, no failed case and exit status 0; returns the header's numbers and the RESULT matches.
    """
    run = subprocess.run([str(binary), *args, "--jobs", str(jobs())], capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = run.stdout.splitlines()
    head = re.match(header, lines[0]) if lines else None
    assert head, f"no CASES line (exit status {run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    results = [m for m in map(result.match, lines) if m]
    failed = [m[0] for m in results if m[1] == "FAIL"]
    assert not failed, f"{len(failed)} of {len(results)} emulated cases failed:\n" + "\n".join(failed)
    assert run.returncode == 0, f"emulator exited with {run.returncode}:\n{run.stderr[-4000:]}"
    return tuple(int(n) for n in head.groups()), results
