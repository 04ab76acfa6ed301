"""The Philox noise stream of the CUDA kernels (csrc/include/genkernels/philox.cuh), checked on the CPU.

The header's functions are host and device callable, so a plain C++ compiler builds them into a
small driver here. It checks Philox4x32-10 against the published known-answer vectors of
Salmon et al. (Random123), the counter and key layout of the (seed, offset) stream against an
independent Python Philox, and the normals against the op module's torch implementation of the
same stream (``genkernels.ops.schedule.philox_normal``, what the reference backend draws). The
device build differs only in using CUDA's logf, sincosf and sqrtf instead of the C library's.

Needs a C++17 compiler ($CXX, g++, c++ or clang++) and skips without one. About 2 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / "csrc" / "include"

DRIVER = r"""
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "genkernels/philox.cuh"

using namespace genkernels;

static uint64_t arg(char** argv, int i) { return std::strtoull(argv[i], nullptr, 0); }

static void words(const Philox4& r) { std::printf("%08x %08x %08x %08x\n", r.v[0], r.v[1], r.v[2], r.v[3]); }

int main(int argc, char** argv) {
  if (argc == 8 && !std::strcmp(argv[1], "words")) {  // words c0 c1 c2 c3 k0 k1
    words(philox4x32_10(arg(argv, 2), arg(argv, 3), arg(argv, 4), arg(argv, 5), arg(argv, 6), arg(argv, 7)));
  } else if (argc == 5 && !std::strcmp(argv[1], "group")) {  // group seed offset q
    words(philox_group(arg(argv, 2), arg(argv, 3), arg(argv, 4)));
  } else if (argc == 6 && !std::strcmp(argv[1], "normals")) {  // normals seed offset first count
    const uint64_t seed = arg(argv, 2), offset = arg(argv, 3), first = arg(argv, 4), count = arg(argv, 5);
    for (uint64_t i = first; i < first + count; ++i) {
      float z4[4];
      philox_normal4(seed, offset, i >> 2, z4);
      const float z = philox_normal(seed, offset, i);
      // philox_normal (scalar paths) and philox_normal4 (vector paths) must agree bit for bit.
      if (std::memcmp(&z, &z4[i & 3], sizeof(float)) != 0) {
        std::printf("MISMATCH %" PRIu64 "\n", i);
        return 1;
      }
      std::printf("%.9g\n", z);
    }
  } else {
    std::fprintf(stderr, "usage: words c0 c1 c2 c3 k0 k1 | group seed offset q | normals seed offset first count\n");
    return 2;
  }
  return 0;
}
"""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler ($CXX, g++, c++ or clang++)")
    work = tmp_path_factory.mktemp("philox")
    source, binary = work / "philox_driver.cpp", work / "philox_driver"
    source.write_text(DRIVER)
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", f"-I{INCLUDE}"]
    done = subprocess.run([*cmd, str(source), "-o", str(binary)], capture_output=True, text=True)
    assert done.returncode == 0, f"compiling philox.cuh on the host failed:\n{done.stderr}"
    return binary


def _run(binary: Path, *args) -> list[str]:
    done = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split("\n")[:-1]


# Random123's known-answer vectors for philox4x32_10: counter (4 words), key (2 words) -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), "d16cfe09 94fdcceb 5001e420 24126ea1"),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_known_answers(driver, counter, key, expected):
    assert _run(driver, "words", *counter, *key) == [expected]


def _philox_py(counter: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10 in Python integers, written from the algorithm's definition."""
    mask = 0xFFFFFFFF
    c, k = list(counter), list(key)
    for round_ in range(10):
        if round_:
            k = [(k[0] + 0x9E3779B9) & mask, (k[1] + 0xBB67AE85) & mask]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & mask, (p0 >> 32) ^ c[3] ^ k[1], p0 & mask]
    return c


@pytest.mark.parametrize(
    "seed, offset, q",
    [(0, 0, 0), (1234, 7, 5), (2**40 + 3, 2**35 + 11, 2**33 + 9), (2**63 - 1, 2**63 - 1, 2**62 + 1)],
)
def test_stream_counter_and_key_layout(driver, seed, offset, q):
    """Group q of stream (seed, offset): counter (lo32 q, hi32 q, lo32 offset, hi32 offset), key (lo32, hi32 seed)."""
    lo, hi = (lambda v: v & 0xFFFFFFFF), (lambda v: v >> 32)
    expected = _philox_py([lo(q), hi(q), lo(offset), hi(offset)], [lo(seed), hi(seed)])
    assert _run(driver, "group", seed, offset, q) == [" ".join(f"{w:08x}" for w in expected)]


@pytest.mark.parametrize("seed, offset", [(0, 0), (42, 3), (2**40 + 3, 2**35 + 11)])
def test_normals_match_the_reference_stream(driver, seed, offset):
    """The header's normals equal the op module's torch implementation of the stream (float32 libm rounding)."""
    from genkernels.ops.schedule import philox_normal

    count = 4099  # not a multiple of 4: the last group is partial
    host = torch.tensor([float(v) for v in _run(driver, "normals", seed, offset, 0, count)], dtype=torch.float32)
    ref = philox_normal(seed, offset, count)
    torch.testing.assert_close(host, ref, rtol=0, atol=2e-6)


def test_normals_are_standard(driver):
    """Mean, variance and the tails of 2^16 draws, and that distinct offsets give distinct streams."""
    z = torch.tensor([float(v) for v in _run(driver, "normals", 7, 0, 0, 1 << 16)], dtype=torch.float64)
    assert abs(z.mean().item()) < 0.02  # 5 standard errors (1/256)
    assert abs(z.var().item() - 1.0) < 0.03  # about 5 standard errors (sqrt(2/n))
    assert z.abs().max().item() < 5.8  # sqrt(2 ln 2^24), the stream's bound
    assert abs((z.abs() > 2.5758).double().mean().item() - 0.01) < 0.002  # two-sided 1% tail, 5 standard errors
    other = torch.tensor([float(v) for v in _run(driver, "normals", 7, 1, 0, 1 << 10)], dtype=torch.float64)
    assert (other - z[: 1 << 10]).abs().max().item() > 1.0
