"""The CUDA modulated-convolution kernels compute the right thing, checked on the CPU.

Why this exists: no GPU runs the suite, and the CUDA kernels of the modulated convolution
(``csrc/include/genkernels/modconv.cuh``, compiled by ``csrc/modconv.cu``) would otherwise be checked only
when a GPU runs them. The same device source compiles with a plain C++ compiler against the emulated CUDA
built-ins of ``tests/cuda/emulator/simt.h``; ``tests/cuda/emulator/modconv_emu.cpp`` runs the epilogue's
forward, backward and reduction kernels on about 200 small cases (every activation; fp32, fp16 and bf16;
channels first and channels last; with and without dcoef, bias, clamp; no noise, one noise image for the
batch or one per sample in each float dtype, with or without a strength; 16-byte vectors, vectors with a
scalar tail and the scalar path; backward partials over one or several chunks and channel tiles) and the
demodulation kernels (forward and both gradients; fp32, fp16 and bf16 weights; one and several passes
over I). Results are compared with a float64 reference under an error model of the kernels' float32
arithmetic (see the driver's header); NaN sentinels around every output catch stray or missing stores.

Needs what ``tests/cuda/_emulator.py`` builds with, and skips without it. About 30 s to compile and 20 s to
run on two cores.
"""

from __future__ import annotations

import re

from tests.cuda._emulator import driver_fixture, run_driver

RESULT = re.compile(r"^RESULT (ok|FAIL) (epilogue|demod) (.*?) \| (.*)$")
EPILOGUE = re.compile(r"^vec (\d+) (\d+) n (\d+) chunks (\d+) tiles (\d+);")
DEMOD = re.compile(r"^passes (\d+);")

emulator = driver_fixture("modconv_emu.cpp")


def test_modconv_emulated(emulator):
    """Every case of the emulator driver passes, and the cases reach every path they are meant to."""
    (cases,), results = run_driver(emulator, RESULT)
    assert len(results) == cases >= 200, f"expected {cases} results, got {len(results)}"
    epilogue = [(m[3], EPILOGUE.match(m[4])) for m in results if m[2] == "epilogue"]
    demod = [(m[3], DEMOD.match(m[4])) for m in results if m[2] == "demod"]
    assert all(d for _, d in epilogue) and all(d for _, d in demod), "a RESULT line without its details"

    # Epilogue: vector widths 1, 4 and 8 in both directions; a forward vector case with a scalar tail;
    # backward partials over several chunks (both layouts) and several channel tiles.
    fvec = {int(d[1]) for _, d in epilogue}
    bvec = {int(d[2]) for _, d in epilogue}
    assert fvec == {1, 4, 8} and bvec == {1, 4, 8}, (fvec, bvec)
    assert any(int(d[1]) > 1 and int(d[3]) % int(d[1]) for _, d in epilogue), "no forward vector case with a tail"
    for layout in ("channels-first", "channels-last"):
        assert any(f" {layout} " in n and int(d[4]) > 1 for n, d in epilogue), f"no {layout} case of several chunks"
        assert any(f" {layout} " in n and int(d[4]) == 1 for n, d in epilogue), f"no {layout} case of one chunk"
    assert any(int(d[5]) > 1 for _, d in epilogue), "no case of several channel tiles"
    names = [n for n, _ in epilogue]
    for act in ("linear", "relu", "lrelu", "tanh", "sigmoid", "silu", "gelu"):
        assert any(f" {act} " in n for n in names), act
    for dtype in ("f32", "f16", "bf16"):
        assert any(n.startswith(f"{dtype} ") for n in names), dtype
        assert any(f":{dtype}" in n for n in names), f"no {dtype} noise"
    for option in (" dcoef", " bias", " clamp", " noise1", " noiseN", " strength", " misaligned", " H1 W1"):
        assert any(option in n for n in names), option
    for option in (" dcoef", " bias", " clamp", " noise", " strength", " misaligned"):
        assert any(option not in n for n in names), f"every case has {option.strip()}"

    # Demodulation: every weight dtype, one pass and several over I, K = 1 and K > 1, N = 1 and N > 1.
    dnames = [n for n, _ in demod]
    for dtype in ("f32", "f16", "bf16"):
        assert any(n.startswith(f"{dtype} ") for n in dnames), dtype
    assert {int(d[1]) for _, d in demod} >= {1, 2, 3}, "demod passes"
    assert any(" K1 " in n for n in dnames) and any(" K9 " in n for n in dnames)
    assert any(n.endswith(" N1") for n in dnames) and any(not n.endswith(" N1") for n in dnames)
