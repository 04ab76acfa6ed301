"""The CUDA attention forward kernel computes the right thing, checked on the CPU.

Why this exists: no GPU runs the suite, and the CUDA kernel (``csrc/include/genkernels/attention_forward.cuh``,
compiled by ``csrc/attention.cu``) would otherwise be checked only when a GPU runs it. Its device source is
written against a small set of primitives (ldmatrix, mma.sync, cp.async, shuffles, barriers), so the same
source compiles with a plain C++ compiler against the emulated primitives of ``tests/cuda/emulator/simt.h``.
``tests/cuda/emulator/attention_forward_emu.cpp`` runs it, one fiber per CUDA thread, on cases covering fp16
and bf16, every padded head dim, ragged tiles, Lq > Lkv, GQA / MQA, strided and broadcast layouts, padding
masks, large magnitudes and a negative scale, with out in q's memory order as the launcher allocates it (heads
inner, "out-blhd", or contiguous, "out-bhld"), under two schedules (cp.async copies landing at once, or as
late as allowed; warp 0 or the last warp running ahead), and compares out and lse with a float64 reference
under an error model of the kernel's arithmetic (see the driver's header). Indexing, masking, pipelining and
barrier mistakes show up here; what the emulator cannot see (memory-model races, hardware rounding, speed,
registers) is listed in simt.h.

Needs what ``tests/cuda/_emulator.py`` builds with, and skips without it.
About 5 s to compile and 5 s to run on 2 cores.
"""

from __future__ import annotations

import re

from tests.cuda._emulator import driver_fixture, run_driver

RESULT = re.compile(r"^RESULT (ok|FAIL) (\S+) (.*?) \| (.*)$")

emulator = driver_fixture("attention_forward_emu.cpp")


def test_attention_forward_emulated(emulator):
    """Every case of the emulator driver passes in both cp.async landing modes (immediate and deferred)."""
    (cases, modes), results = run_driver(emulator, RESULT, "--mode", "both", header=r"^CASES (\d+) MODES (\d+)$")
    assert modes == 2 and {m[2] for m in results} == {"immediate", "deferred"}
    assert len(results) == cases * modes >= 40, f"expected {cases * modes} results, got {len(results)}"
    out_orders = {re.search(r" out-(\w+) ", m[3])[1] for m in results}
    assert out_orders == {"bhld", "blhd"}, f"out written in both memory orders, got {out_orders}"
