"""The CUDA adaLN kernels compute the right thing, checked on the CPU.

Why this exists: no GPU runs the suite, and the CUDA kernels of ``layer_norm_modulate``, ``gated_residual``
and ``gated_residual_layer_norm_modulate`` (``csrc/include/genkernels/adaln.cuh``, compiled by
``csrc/adaln.cu``) would otherwise be checked only when a GPU runs them. The same device source compiles with
a plain C++ compiler against the emulated CUDA built-ins of ``tests/cuda/emulator/simt.h``;
``tests/cuda/emulator/adaln_emu.cpp`` runs the forward kernel, the fused backward kernel and the fixed-order
reduction of its column partials on 89 small cases: fp32, fp16 and bf16; the three ops, LayerNorm and RMSNorm;
weight and bias present or absent, in float32 or in x's dtype; shift, scale and gate per sample, per token or
absent (no gate: the plain
residual x + y), in x's dtype or float32; with and without the gradient of h; odd D (33, 40, 72, 1000, 2000,
2500) up to 4096 and L = 1; 8-element vectors and the scalar path (misaligned x, a padded row stride, D); row
groups of 32 to 1024 threads, several rows a block and several vectors a thread (up to 4 in the forward);
backward samples split into several chunks (partials summed in a fixed order); inputs around 1e3. Every output
(h, out, mean, rstd, dx, dy, the elementwise dscale / dgate, dweight, dbias and the per-sample dshift / dscale
/ dgate) is compared with a float64 reference under an error model of the kernels' float32 arithmetic (see the
driver's header), and sentinels around every output catch stray or missing stores. What the emulator cannot
see (the device's rsqrtf rounding, speed, registers) is listed in simt.h.

Needs what ``tests/cuda/_emulator.py`` builds with, and skips without it. About 20 s to compile and a few
seconds to run.
"""

from __future__ import annotations

import re

from tests.cuda._emulator import driver_fixture, run_driver

RESULT = re.compile(
    r"^RESULT (ok|FAIL) (\S+) (norm|gate|fused)(.*?) \| vec (\d+) (\d+) group (\d+) (\d+) slots (\d+) (\d+) "
    r"count (\d+) (\d+) blocks (\d+) (\d+) chunks (\d+) sums (\d+); (.*)$"
)

emulator = driver_fixture("adaln_emu.cpp")


def test_adaln_emulated(emulator):
    """Every case of the emulator driver passes, and the cases reach every path they are meant to."""
    (cases,), results = run_driver(emulator, RESULT)
    assert len(results) == cases >= 98, f"expected {cases} results, got {len(results)}"

    names = [m[2] + " " + m[3] + m[4] for m in results]
    for dtype in ("f32", "f16", "bf16"):
        for op in ("norm", "gate", "fused"):
            assert any(n.startswith(f"{dtype} {op}") for n in names), (dtype, op)
    for option in (" rms ", " w1 ", " w0 ", " b1 ", " b0 ", " side:f32", " dh", " far", " misaligned", " L1 "):
        assert any(option in n for n in names), option
    # weight and bias in x's dtype (a bf16 or fp16 model's own parameters), with bias, and in RMSNorm alone.
    for dtype in ("f16", "bf16"):
        assert any(n.startswith(f"{dtype} ") and " param:x " in n and " b1 " in n for n in names), dtype
    assert any(n.startswith("bf16 fused rms w1 b0 param:x ") for n in names)
    for what in ("shift", "scale", "gate"):
        for mode in ("bd", "bld"):
            assert any(f" {what}:{mode} " in n for n in names), (what, mode)
    for op in ("fused", "gate"):  # no gate: the plain residual x + y (and, fused, the backward without y)
        assert any(n.split()[1] == op and " gate:- " in n for n in names), op
    assert any(n.split()[1] == "fused" and " gate:- " in n and " dh" in n for n in names)
    norm_cases = [n for n in names if n.split()[1] != "gate"]
    assert any(" shift:- " in n for n in norm_cases) and any(" scale:- " in n for n in norm_cases)
    for d in (33, 72, 1000, 2500, 4096):
        assert any(f" D{d} " in n for n in names), d

    # 8-element vectors (every dtype) and scalars, forward and backward, in every dtype.
    for dtype in ("f32", "f16", "bf16"):
        assert {int(m[5]) for m in results if m[2] == dtype} == {1, 8}, dtype
        assert {int(m[6]) for m in results if m[2] == dtype} == {1, 8}, dtype
    # Forward row groups of one warp (4 rows a block), two warps (2 rows) and wider; the backward's groups
    # up to the scalar path's 1024.
    forward_groups = {(int(m[7]), int(m[9])) for m in results}
    assert (32, 4) in forward_groups and (64, 2) in forward_groups
    assert any(g >= 128 and s == 1 for g, s in forward_groups)
    assert (1024, 1) in {(int(m[8]), int(m[10])) for m in results}
    # The forward's 1 to 4 vectors (or scalars) a thread; the backward's several scalars a thread (rows longer
    # than 1024 on the scalar path).
    assert {int(m[11]) for m in results} >= {1, 2, 3, 4}
    assert {int(m[12]) for m in results} >= {1, 2, 3}
    # Column sums over several chunks of a sample (several partial rows reduced in a fixed order), all five
    # sums at once, and backward launches with none.
    assert any(int(m[15]) >= 3 and int(m[16]) > 0 for m in results), "no sample split into several chunks"
    assert any(int(m[16]) == 5 for m in results), "no case with every column sum"
    assert any(int(m[16]) == 0 for m in results), "no case without column sums"
