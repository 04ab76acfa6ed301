"""The CUDA rope kernel computes the right thing, checked on the CPU.

Why this exists: no GPU runs the suite, and the CUDA kernel of ``rope`` (``csrc/include/genkernels/rope.cuh``,
compiled by ``csrc/rope.cu``) would otherwise be checked only when a GPU runs it. The same device source
compiles with a plain C++ compiler against the emulated CUDA built-ins of ``tests/cuda/emulator/simt.h``;
``tests/cuda/emulator/rope_emu.cpp`` runs the kernel on about 100 small cases: fp32, fp16 and bf16; rotate_half
and interleaved pairs; forward and inverse; full and partial rotary (odd P too); grouped k, no k, an empty q
beside k; contiguous, transposed (B, L, H, Dh) and padded-row inputs; outputs in the inputs' strides,
contiguous, in place, or k's into a slot of a longer KV cache (rope's k_out, the cache's other positions left
alone); float32 / float16 / bfloat16 tables with contiguous or padded rows (each its own row stride);
16-byte vectors and the scalar path (misaligned pointers, P or strides not a multiple of the width); grids of
one and of several blocks. Outputs are compared with a float64 reference (pair partners and angles from
logical coordinates), the pass-through channels bit for bit, and everything outside the logical tensors (row
padding, guard bytes, an out-of-place input) must be left as it was. What the emulator cannot see (speed,
registers) is listed in simt.h.

Needs what ``tests/cuda/_emulator.py`` builds with, and skips without it.
About 10 s to compile and a few seconds to run.
"""

from __future__ import annotations

import re

from tests.cuda._emulator import driver_fixture, run_driver

RESULT = re.compile(r"^RESULT (ok|FAIL) (.*?) \| vec (\d+) units (\d+) (\d+) total (\d+); (.*)$")

emulator = driver_fixture("rope_emu.cpp")


def _size(name: str, key: str) -> int:
    return int(re.search(rf" {key}(\d+) ", name + " ")[1])


def test_rope_emulated(emulator):
    """Every case of the emulator driver passes, and the cases reach every path they are meant to."""
    (cases,), results = run_driver(emulator, RESULT)
    assert len(results) == cases >= 80, f"expected {cases} results, got {len(results)}"
    names = [m[2] for m in results]

    # Both pair conventions on vectors of every width and on the scalar path, each dtype.
    for dtype, width in (("f32", 4), ("f16", 8), ("bf16", 8)):
        for pairs in ("rotate-half", "interleaved"):
            widths = {int(m[3]) for m in results if m[2].startswith(f"{dtype} {pairs} ")}
            assert widths == {1, width}, (dtype, pairs, widths)
    for option in (" forward ", " inverse ", " contiguous ", " bl ", " padded8 ", " padded3 "):
        assert any(option in n for n in names), option
    for option in (" out:same ", " out:contiguous ", " in-place ", " out:k-slot "):
        assert any(option in n for n in names), option
    for tables in ("f32/f32", "f16/f16", "bf16/f32", "f32/bf16"):
        assert any(f" tables:{tables}" in n for n in names), tables
    for option in (" padded-tables", " no-k", " misaligned"):
        assert any(option in n + " " for n in names), option
    assert any(_size(n, "H") == 0 for n in names), "no case with an empty q beside k"
    assert any(_size(n, "Hk") not in (0, _size(n, "H")) for n in names), "no grouped k"

    # Partial rotary: copy units out of place, none in place (the channels stay where they are).
    partial = [m for m in results if 2 * _size(m[2], "P") < _size(m[2], "Dh")]
    assert any(int(m[5]) > 0 for m in partial), "no case copying the pass-through channels"
    assert all(int(m[5]) == 0 for m in partial if " in-place " in m[2])
    assert any(" in-place " in m[2] for m in partial), "no in-place partial rotary case"
    assert any(int(m[5]) > 0 and int(m[3]) > 1 for m in partial), "no vectorized copy"
    # Several blocks on the vector and the scalar paths.
    assert any(int(m[6]) > 256 and int(m[3]) > 1 for m in results), "no vector case of several blocks"
    assert any(int(m[6]) > 256 and int(m[3]) == 1 for m in results), "no scalar case of several blocks"
