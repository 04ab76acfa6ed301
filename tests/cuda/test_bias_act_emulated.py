"""The CUDA bias_act kernels compute the right thing, checked on the CPU.

Why this exists: no GPU runs the suite, and the CUDA kernels of ``bias_act``
(``csrc/include/genkernels/bias_act.cuh``, compiled by ``csrc/bias_act.cu``) would otherwise be checked
only when a GPU runs them. The same device source compiles with a plain C++ compiler against the emulated
CUDA built-ins of ``tests/cuda/emulator/simt.h``; ``tests/cuda/emulator/bias_act_emu.cpp`` runs the
forward kernel, the gradient-map kernel and the gradient map with the bias gradient reduced in the same
pass (dz bit for bit the gradient kernel's, or not written; per-tile and per-column partials summed per
channel against float64, and by the finishing kernel into the bias gradient in the bias's dtype) on about
350 small cases: every activation; fp32, fp16 and bf16, dz in x's dtype or float32; a bias along the
channels of contiguous (stride_c = S) and channels_last (stride_c = 1) tensors, along dim 0 of a matrix,
or none; with and without a clamp;
16-byte vectors with a scalar tail, the scalar path (misaligned pointers), vectors forward and scalars
in the gradient (dz alone misaligned); |z| up to 1e4. y and dz are compared with a float64 reference
(the bias index taken from logical coordinates, not the kernel's formula) under an error model of the
kernels' float32 arithmetic (see the driver's header), and sentinels around every output catch stray
or missing stores. What the emulator cannot see (the device's expf / tanhf / erff rounding, speed,
registers) is listed in simt.h.

Needs what ``tests/cuda/_emulator.py`` builds with, and skips without it.
About 30 s to compile and a few seconds to run.
"""

from __future__ import annotations

import re

from tests.cuda._emulator import driver_fixture, run_driver

RESULT = re.compile(r"^RESULT (ok|FAIL) (.*?) \| vec (\d+) (\d+) n (\d+); (.*)$")
CODES = re.compile(r"; codes fwd (\d+) grad (\d+)( bias)?")
BIAS_GRAD = re.compile(
    r"bias-grad vec (\d+) tq (\d+) (per-tile|per-column) (uniform|mixed) (store|no-store) blocks (\d+)x(\d+)"
    r"; finish per (\d+) terms (\d+)"
)

emulator = driver_fixture("bias_act_emu.cpp")


def test_bias_act_emulated(emulator):
    """Every case of the emulator driver passes, and the cases reach every path they are meant to."""
    (cases,), results = run_driver(emulator, RESULT)
    assert len(results) == cases >= 150, f"expected {cases} results, got {len(results)}"

    # Vector widths 1, 4 (fp32) and 8 (fp16 / bf16) in both kernels, and the two kernels on different paths.
    assert {int(m[3]) for m in results} == {1, 4, 8}
    assert {int(m[4]) for m in results} == {1, 4, 8}
    assert any(m[3] != m[4] for m in results), "no case where forward and gradient take different vector widths"
    # A vector path whose length is not a multiple of the width (scalar tail), and several blocks of the
    # elementwise kernels (256 threads of 4 vectors) at every width.
    assert any(int(m[3]) > 1 and int(m[5]) % int(m[3]) for m in results), "no vector case with a scalar tail"
    for width in (4, 8):
        assert any(int(m[3]) == width and int(m[5]) > 256 * 4 * width for m in results), width
    names = [m[2] for m in results]
    for act in ("linear", "relu", "lrelu", "tanh", "sigmoid", "silu", "gelu"):
        assert any(f" {act} " in n for n in names), act
    for dtype in ("f32", "f16", "bf16"):
        assert any(n.startswith(f"{dtype} dz:{dtype} ") for n in names), dtype
    assert any(n.startswith(("f16 dz:f32", "bf16 dz:f32")) for n in names), "no float32 dz of a 16-bit x"
    for option in (" channels-first ", " channels-last ", " rows ", " no-bias ", " clamp", " large"):
        assert any(option in n for n in names), option
    for option in (" misaligned", " misaligned-out"):
        assert any(n.endswith(option) for n in names), option
    for dtype in ("f32", "f16", "bf16"):  # the bias read in its own dtype, with and without vectors
        assert any(f" bias:{dtype}" in n and " no-bias " not in n for n in names), dtype
    assert any(" clamp" not in n for n in names), "no unclamped case"

    # The gradient map with the bias gradient in the same pass: both partial forms, with and without dz,
    # vectors and scalars, and several row tiles.
    tiles = [BIAS_GRAD.search(m[6]) for m in results]
    tiles = [t for t in tiles if t]
    assert len(tiles) >= 100, f"only {len(tiles)} cases ran the bias-gradient kernel"
    assert {t[3] for t in tiles} == {"per-tile", "per-column"}
    assert {t[5] for t in tiles} == {"store", "no-store"}
    assert {int(t[1]) for t in tiles} == {1, 4, 8}
    assert any(t[3] == "per-tile" and int(t[1]) > 1 for t in tiles), "no vectorized per-tile case"
    assert any(t[3] == "per-column" and int(t[7]) > 8 for t in tiles), "no per-column case of many row tiles"
    # Vectors in one channel (one bias value and one sum a thread) and across channels, per column too.
    assert {t[4] for t in tiles if int(t[1]) > 1} == {"uniform", "mixed"}
    assert any(t[3] == "per-column" and t[4] == "uniform" and int(t[1]) > 1 for t in tiles), "no uniform per-column"
    # The finishing kernel (dbias from the partials, one warp a channel) walks more than 32 partials a channel
    # with one partial per row tile, with a few per row tile (its walk wraps to the next tile within a lane's
    # step), and with more than 32 per row tile.
    finish = [(int(t[8]), int(t[9])) for t in tiles]
    assert any(per == 1 and terms > 32 for per, terms in finish), "no finish over many row tiles"
    assert any(1 < per < 32 and terms > 32 for per, terms in finish), "no finish that wraps within a lane's step"
    assert any(per > 32 for per, terms in finish), "no finish over many partials a row tile"

    # Gradient codes (linear, relu, lrelu on the forward's vector path): the forward writes them at both
    # widths, and the gradients read them on the vector paths and on the scalar one (dz misaligned), with
    # and without the bias gradient and the clamp; every other case runs none.
    coded = [(m, CODES.search(m[6])) for m in results]
    ran = [(m, c) for m, c in coded if c]
    assert all(bool(c) == (int(m[3]) > 1 and m[2].split()[2] in ("linear", "relu", "lrelu")) for m, c in coded), (
        "codes ran where they should not, or not where they should"
    )
    assert {int(c[1]) for _, c in ran} == {4, 8} and {int(c[2]) for _, c in ran} == {1, 4, 8}
    assert any(c[3] for _, c in ran) and any(not c[3] for _, c in ran)
    assert any(" clamp" in m[2] for m, _ in ran) and any(" clamp" not in m[2] for m, _ in ran)
    assert any(int(m[5]) % 8 for m, _ in ran), "no coded case with a partial last word"
