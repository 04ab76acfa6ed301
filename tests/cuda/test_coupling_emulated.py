"""The CUDA affine coupling and ActNorm kernels compute the right thing, checked on the CPU.

Why this exists: no GPU runs the suite, and the CUDA kernels of ``affine_coupling`` and ``actnorm``
(``csrc/include/genkernels/coupling.cuh``, compiled by ``csrc/coupling.cu``) would otherwise be checked
only when a GPU runs them. The same device source compiles with a plain C++ compiler against the emulated
CUDA built-ins of ``tests/cuda/emulator/simt.h``; ``tests/cuda/emulator/coupling_emu.cpp`` runs the
coupling forward / reverse and backward kernels, ActNorm's forward / reverse and backward kernels (both
layouts' reductions) and the merge kernel of their partial sums, one fiber per CUDA thread, on about 370
small cases: fp32, fp16 and bf16; channels first and channels last; 16-byte vectors and the scalar path
(S, C, Ca or Ch not a multiple of the vector width, misaligned pointers: all of them, or the gradients
alone); odd C, C = 2, S = 1, N = 1; every scale mode (exp, sigmoid, softclamp_tanh, softclamp_atan,
additive) and clamp; reverse; dy or dlogdet absent; dx, dh or both; logdet wanted or not; one chunk per
sample, several, and more than the merge block has threads; ActNorm channel tiles with uneven row-lane trees, idle
threads and two tiles; pre-activations up to 1e4 in the sigmoid and softclamp modes (no NaN or inf); ActNorm
on data of mean 1000 with bias = -mean (its data-dependent initialization), where the sum of dy * (x + bias)
must carry the error of its own terms, not that of sum dy x + bias sum dy, which cancels.
y, logdet, dx, dh and ActNorm's per-channel sums of dy and dy * (x + bias) are compared with a float64 reference
under an error model of the kernels' float32 arithmetic (see the driver's header), and sentinels around
every output catch stray stores and elements never written. What the emulator cannot see (memory-model
races, the device's expf / tanhf rounding, speed, registers) is listed in simt.h.

Needs what ``tests/cuda/_emulator.py`` builds with, and skips without it.
About 15 s to compile and 40 s to run on 2 cores.
"""

from __future__ import annotations

import re

from tests.cuda._emulator import driver_fixture, run_driver

RESULT = re.compile(r"^RESULT (ok|FAIL) (\S+) (.*?) \| vec (\d+) (\d+) chunks (\d+); (.*)$")

emulator = driver_fixture("coupling_emu.cpp")


def test_coupling_emulated(emulator):
    """Every case of the emulator driver passes, and the cases reach every path they are meant to."""
    (cases,), results = run_driver(emulator, RESULT)
    assert len(results) == cases >= 300, f"expected {cases} results, got {len(results)}"

    for kind in ("coupling", "actnorm"):
        mine = [m for m in results if m[2] == kind]
        assert mine, kind
        # Vector widths 1, 4 (fp32) and 8 (fp16 / bf16) in the forward and the backward, and a case where
        # the two passes take different widths (misaligned gradients).
        assert {int(m[4]) for m in mine} == {1, 4, 8}, kind
        assert {int(m[5]) for m in mine} >= {1, 4, 8}, kind
        assert any(m[5] != "0" and m[4] != m[5] for m in mine), kind
        chunk_counts = {int(m[6]) for m in mine}
        assert 1 in chunk_counts and max(chunk_counts) > 256, (kind, chunk_counts)
        names = [m[3] for m in mine]
        for option in (" first ", " last ", " reverse", " misaligned ", " misaligned-grads", " N1 ", " S1 "):
            assert any(option in n + " " for n in names), (kind, option)

    names = [m[3] for m in results if m[2] == "coupling"]
    for scale in ("exp", "sigmoid", "softclamp_tanh", "softclamp_atan", "additive"):
        assert any(f" {scale} " in n for n in names), scale
    for option in (" C2 ", " C5 ", " no-dy", " no-dlogdet", " no-logdet", " logdet", " d:both", " d:x", " d:h"):
        assert any(option in n for n in names), option
    assert sum(" large-h" in n for n in names) >= 18, "too few large-|h| cases"
    # ActNorm's channels-last reduction: an uneven tree (C = 3), idle threads (C = 129), two tiles (C = 300).
    actnorm = [m[3] for m in results if m[2] == "actnorm"]
    for option in (" C3 ", " C129 ", " C300 ", " dx ", " no-dx "):
        assert any(option in n for n in actnorm), option
    # Mean 1000, bias = -mean: each dtype, both layouts, one chunk and several.
    large = [m for m in results if m[2] == "actnorm" and " large-mean " in m[3]]
    assert {(m[3].split()[0], " last " in m[3], m[6] == "1") for m in large} == {
        (dtype, last, one) for dtype in ("f32", "f16", "bf16") for last in (False, True) for one in (False, True)
    }, [m[3] for m in large]
