"""The CUDA gelu_tanh and swiglu kernels compute the right thing, checked on the CPU.

Why this exists: no GPU runs the suite, and the CUDA kernels of ``gated_mlp``
(``csrc/include/genkernels/gated_mlp.cuh``, compiled by ``csrc/gated_mlp.cu``) would otherwise be checked only
when a GPU runs them. The same device source compiles with a plain C++ compiler against the emulated CUDA
built-ins of ``tests/cuda/emulator/simt.h``; ``tests/cuda/emulator/gated_mlp_emu.cpp`` runs the forward and the
gradient-map kernels of both activations on about 150 small cases: fp32, fp16 and bf16; gelu_tanh over flat
runs from 1 element to several blocks with a scalar tail; swiglu over (R, M) with M a multiple of every width,
of 4 only, odd, or 1; 16-byte vectors and the scalar path (every pointer misaligned, the outputs alone, or dy
alone: vectors forward and scalars in the gradient); every fifth input far out (|x| up to 1e4 and the
negative tail of gelu_tanh). y and dx are compared with a float64 reference under an error model of the
kernels' float32 arithmetic (see the driver's header), and sentinels around every output catch stray or
missing stores. What the emulator cannot see (the device's expf rounding, speed, registers) is listed in
simt.h.

Needs what ``tests/cuda/_emulator.py`` builds with, and skips without it.
About 10 s to compile and a few seconds to run.
"""

from __future__ import annotations

import re

from tests.cuda._emulator import driver_fixture, run_driver

RESULT = re.compile(r"^RESULT (ok|FAIL) (.*?) \| vec (\d+) (\d+) n (\d+); (.*)$")

emulator = driver_fixture("gated_mlp_emu.cpp")


def test_gated_mlp_emulated(emulator):
    """Every case of the emulator driver passes, and the cases reach every path they are meant to."""
    (cases,), results = run_driver(emulator, RESULT)
    assert len(results) == cases >= 120, f"expected {cases} results, got {len(results)}"
    names = [m[2] for m in results]

    for op in ("gelu_tanh", "swiglu"):
        ours = [m for m in results if f" {op} " in m[2]]
        for dtype, width in (("f32", 4), ("f16", 8), ("bf16", 8)):
            mine = [m for m in ours if m[2].startswith(f"{dtype} ")]
            assert {int(m[3]) for m in mine} == {1, width}, (op, dtype, "forward")
            assert {int(m[4]) for m in mine} == {1, width}, (op, dtype, "grad")
        assert any(m[3] != m[4] for m in ours), f"{op}: no case where forward and gradient take different widths"
        # Blocks of 256 threads of 4 vectors.
        assert any(int(m[5]) > 256 * 4 * 8 and int(m[3]) == 8 for m in ours), f"{op}: no case of several blocks"
        assert any(int(m[5]) > 256 * 4 and int(m[3]) == 1 for m in ours), f"{op}: no scalar case of several blocks"
    # gelu_tanh: a vector path whose length is not a multiple of the width (the scalar tail).
    assert any(" gelu_tanh " in m[2] and int(m[3]) > 1 and int(m[5]) % int(m[3]) for m in results)
    # swiglu: M a multiple of 4 but not 8 (fp32 vectors, 16-bit scalars), odd M and M = 1.
    assert any(re.search(r" M4(?: |$)", n) for n in names if " swiglu " in n), "no M = 4"
    assert any(re.search(r" M\d*[13579](?: |$)", n) for n in names if " swiglu " in n), "no odd M"
    for option in (" large", " misaligned", " misaligned-out", " misaligned-dy"):
        assert any(n.endswith(option) or f"{option} " in n for n in names), option
