"""Build of genkernels: the pure-Python package plus the optional CUDA extension genkernels._C.

Metadata lives in pyproject.toml; this file only adds the extension, which CMake builds
(CMakeLists.txt: nvcc + pybind11, static CUDA runtime, no libtorch). The build needs no torch.

Environment:
  GENKERNELS_NO_CUDA=1         install without the extension (the cuda backend then reports
                               "extension not built"); also the outcome when no nvcc is found
  GENKERNELS_REQUIRE_CUDA=1    fail instead of installing without the extension
  GENKERNELS_CUDA_ARCHS=...    GPU architectures, ';' or ',' separated (default 80;86;89;90a);
                               PTX of the highest is added so newer GPUs can JIT-compile it
  GENKERNELS_BUILD_JOBS=N      parallel compile jobs (default CMAKE_BUILD_PARALLEL_LEVEL, else CPUs)
  GENKERNELS_PTXAS_VERBOSE=1   print registers, spills and shared memory of every kernel
  CUDACXX, CUDA_HOME           where nvcc is (also searched: PATH, /usr/local/cuda/bin, /usr/local/bin)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;86;89;90a"
MIN_CMAKE = (3, 18)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _note(message: str) -> None:
    print(f"genkernels setup: {message}", file=sys.stderr, flush=True)


def _skip_or_fail(reason: str) -> None:
    if _flag("GENKERNELS_REQUIRE_CUDA"):
        raise RuntimeError(f"genkernels: GENKERNELS_REQUIRE_CUDA is set but {reason}")
    _note(f"{reason}: installing without the CUDA extension genkernels._C")


def find_nvcc() -> str | None:
    """Path of nvcc: $CUDACXX, PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin, /usr/local/bin."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    candidates += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += ["/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def find_cmake() -> str | None:
    """Path of a cmake >= 3.18 (on PATH, or from the `cmake` PyPI package), else None."""
    paths = [shutil.which("cmake")]
    try:
        import cmake  # the PyPI package, when a build environment installed it

        paths.append(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))
    except ImportError:
        pass
    for path in paths:
        if not path:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        match = re.search(r"version (\d+)\.(\d+)", out)
        if match and (int(match.group(1)), int(match.group(2))) >= MIN_CMAKE:
            return path
    return None


def build_jobs() -> int:
    for var in ("GENKERNELS_BUILD_JOBS", "CMAKE_BUILD_PARALLEL_LEVEL"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def cuda_archs() -> str:
    archs = [a.strip() for a in re.split(r"[;,\s]+", os.environ.get("GENKERNELS_CUDA_ARCHS", DEFAULT_ARCHS))]
    archs = [a for a in archs if a]
    bad = [a for a in archs if not re.fullmatch(r"\d+[af]?", a)]
    if not archs or bad:
        raise ValueError(f"GENKERNELS_CUDA_ARCHS must list architectures like '80;86;89;90a', got {bad or archs}")
    return ";".join(archs)


class CMakeExtension(Extension):
    """An extension whose sources CMakeLists.txt knows; setuptools only names it."""

    def __init__(self, name: str, nvcc: str) -> None:
        super().__init__(name, sources=[])
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, placing the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        import pybind11  # a build requirement (pyproject.toml)

        cmake = find_cmake()
        if cmake is None:
            # Under build isolation setup_requires already asked for the PyPI cmake; this is
            # a --no-build-isolation build on a machine without cmake.
            _skip_or_fail(f"no cmake >= {MIN_CMAKE[0]}.{MIN_CMAKE[1]} found (pip install cmake)")
            return
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        jobs = build_jobs()
        archs = cuda_archs()
        generator = [] if os.environ.get("CMAKE_GENERATOR") else (["-G", "Ninja"] if shutil.which("ninja") else [])
        # One build folder per toolchain: a CMake cache remembers its compiler, generator and
        # Python, and an isolated pip build gets a fresh temporary Python every time.
        key = "\n".join([sys.executable, ext.nvcc, pybind11.get_cmake_dir(), " ".join(generator), cmake])
        build_dir = Path(self.build_temp).resolve() / f"cmake-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        n_archs = len(archs.split(";")) + 1  # + the PTX target
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            *generator,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DGENKERNELS_CUDA_ARCHS={archs}",
            f"-DGENKERNELS_OUTPUT_DIR={target.parent}",
            f"-DGENKERNELS_NVCC_THREADS={max(1, min(jobs, n_archs))}",
            f"-DGENKERNELS_PTXAS_VERBOSE={'ON' if _flag('GENKERNELS_PTXAS_VERBOSE') else 'OFF'}",
        ]
        _note(f"building genkernels._C for CUDA archs {archs} with {jobs} jobs in {build_dir}")
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(jobs)], check=True)
        if not target.is_file():
            raise RuntimeError(f"genkernels: the CMake build did not produce {target}")


def extension_setup() -> dict:
    """setup() keywords for the CUDA extension, or none when it is not built."""
    if _flag("GENKERNELS_NO_CUDA"):
        _note("GENKERNELS_NO_CUDA is set: installing without the CUDA extension genkernels._C")
        return {}
    nvcc = find_nvcc()
    if nvcc is None:
        _skip_or_fail("no nvcc found (CUDACXX, PATH, CUDA_HOME, /usr/local/cuda/bin, /usr/local/bin)")
        return {}
    kwargs: dict = {"ext_modules": [CMakeExtension("genkernels._C", nvcc)], "cmdclass": {"build_ext": CMakeBuild}}
    if find_cmake() is None:
        # Reported to pip as a build requirement (PEP 517 get_requires_for_build_wheel) only
        # where no suitable cmake exists, so machines with cmake download nothing.
        kwargs["setup_requires"] = [f"cmake>={MIN_CMAKE[0]}.{MIN_CMAKE[1]}"]
    return kwargs


setup(**extension_setup())
