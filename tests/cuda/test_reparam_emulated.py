"""The CUDA reparameterization kernels compute the right thing, checked on the CPU.

Why this exists: no GPU runs the suite, and the CUDA kernels of ``reparameterize``
(``csrc/include/genkernels/reparam.cuh``, compiled by ``csrc/reparam.cu``) would otherwise be checked
only when a GPU runs them. The same device source compiles with a plain C++ compiler against the emulated
CUDA built-ins of ``tests/cuda/emulator/simt.h``; ``tests/cuda/emulator/reparam_emu.cpp`` runs the
forward kernel, the KL merge kernel and the backward kernel, one fiber per CUDA thread, on about 350
small cases: fp32, fp16 and bf16; 16-byte vectors and the scalar path (odd K, K a multiple of 4 but not
8, odd row padding, misaligned pointers); mean and logvar as separate tensors, as the halves of
contiguous moments (batch stride 2*R*K) and of channels_last moments (row stride 2*K), with padded rows
and samples, and a mean broadcast over the batch; B = 1 and R = 1; noise from a tensor, from the
in-kernel Philox stream (seed by value or in an int64 tensor) or none (deterministic); one chunk per
sample, several with a partial last one, and more than a warp's worth; threads that walk several vectors
across rows; dz or dkl absent; dmean, dlogvar or both; logvar at and beyond the clamp's bounds. z, kl,
dmean and dlogvar are compared with a float64 reference under an error model of the kernels' float32
arithmetic (see the driver's header), the in-kernel noise bit for bit with the host Philox stream of
``genkernels/philox.cuh``, and sentinels around every output catch stray stores. Indexing, stride,
vector/scalar dispatch, clamp-mask and reduction mistakes show up here; what the emulator cannot see
(memory-model races, the device's expf / logf / sincosf rounding, speed, registers) is listed in simt.h.

Needs what ``tests/cuda/_emulator.py`` builds with, and skips without it.
About 10 s to compile and 20 s to run on 2 cores.
"""

from __future__ import annotations

import re

from tests.cuda._emulator import driver_fixture, run_driver

RESULT = re.compile(r"^RESULT (ok|FAIL) (.*?) \| vec (\d+) (\d+) chunks (\d+); (.*)$")

emulator = driver_fixture("reparam_emu.cpp")


def test_reparam_emulated(emulator):
    """Every case of the emulator driver passes, and the cases reach every path they are meant to."""
    (cases,), results = run_driver(emulator, RESULT)
    assert len(results) == cases >= 300, f"expected {cases} results, got {len(results)}"

    # The case list covers the kernels' paths: vector widths 1, 4 (fp32) and 8 (fp16 / bf16) in both
    # passes, the scalar path in one pass with vectors in the other, a sample in one chunk and in more
    # chunks than the merge warp has lanes.
    assert {int(m[3]) for m in results} == {1, 4, 8}
    assert {int(m[4]) for m in results} == {1, 4, 8}
    assert any(m[3] != m[4] for m in results), "no case where the two passes take different vector widths"
    chunk_counts = {int(m[5]) for m in results}
    assert 1 in chunk_counts and max(chunk_counts) > 32, chunk_counts
    names = [m[2] for m in results]
    for kind in ("noise-tensor", "philox ", "philox-seed-tensor", "deterministic", "d:both", "d:mean", "d:logvar"):
        assert any(kind in n for n in names), kind
    for layout in ("separate", "moments-first", "moments-last", "padded8", "padded3", "broadcast"):
        assert any(f" {layout} " in n for n in names), layout
    for option in (" no-dz", " no-dkl", " no-kl", " kl ", " misaligned", " stream-only", " B1 R1 "):
        assert any(option in n for n in names), option
