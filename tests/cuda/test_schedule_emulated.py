"""The CUDA fused sampler-step kernels compute the right thing, checked on the CPU.

Why this exists: no GPU runs the suite, and the CUDA kernels of ``schedule_step``
(``csrc/include/genkernels/schedule_step.cuh``, compiled by ``csrc/schedule.cu``) would otherwise be
checked only when a GPU runs them. The same device source compiles with a plain C++ compiler against the
emulated CUDA built-ins of ``tests/cuda/emulator/simt.h``; ``tests/cuda/emulator/schedule_step_emu.cpp``
runs the step kernel and the two guidance-rescale statistics kernels, one fiber per CUDA thread, on about
400 small cases: no model output, unguided, guided and guided with rescale (one chunk per sample, three,
and more than a warp's worth); scalar and per-sample coefficients; clipping (a NaN model output stays NaN
through it, as in torch.clamp); x0 returned or not; x0_prev;
noise from a tensor, from the in-kernel Philox stream (seed by value or in an int64 tensor) or none; fp32,
fp16, bf16 and mixed input dtypes; 16-byte vectors and the scalar path (misaligned pointers, N not a
multiple of the vector width); one block striding over the tensor or one thread per vector. prev, x0 and
the rescale factor are compared with a float64 reference under an error model of the kernels' float32
arithmetic (see the driver's header), the in-kernel noise bit for bit with the host Philox stream of
``genkernels/philox.cuh``, and sentinels around every output catch stores out of bounds. Indexing,
per-sample, guidance, vector/scalar dispatch and reduction mistakes show up here; what the emulator cannot
see (memory-model races, the device's logf / sincosf rounding, speed, registers) is listed in simt.h.

Needs what ``tests/cuda/_emulator.py`` builds with, and skips without it.
About 5 s to compile and 5 s to run on 2 cores.
"""

from __future__ import annotations

import re

from tests.cuda._emulator import driver_fixture, run_driver

RESULT = re.compile(r"^RESULT (ok|FAIL) (.*?) \| vec (\d+) grid (\d+); (.*)$")
# The kernel leaves the noise and x0_prev registers unset when those inputs are absent and reads them
# only under the same conditions, which g++'s flow analysis does not follow.
emulator = driver_fixture("schedule_step_emu.cpp", ("-Wno-maybe-uninitialized",))


def test_schedule_step_emulated(emulator):
    """Every case of the emulator driver passes, and the cases reach every path they are meant to."""
    (cases,), results = run_driver(emulator, RESULT)
    assert len(results) == cases >= 300, f"expected {cases} results, got {len(results)}"

    # The case list covers the kernels' paths: vector widths 1, 4 (fp32) and 8 (fp16 / bf16), a
    # grid-stride loop with several iterations, each model-output and noise kind, mixed dtypes.
    widths = {int(m[3]) for m in results}
    assert widths == {1, 4, 8}, widths
    assert any(m[4] == "1" and " N197 " in m[2] for m in results), "no case where one block strides over everything"
    names = [m[2] for m in results]
    for kind in ("no-model", "plain", "guided", "rescale", "no-noise", "noise-tensor", "philox ", "philox-seed-tensor"):
        assert any(f" {kind}" in n for n in names), kind
    for option in (" per-sample", " clip", " x0 ", " x0_prev", " misaligned", " noise-only", " chunk1 ", " nonfinite"):
        assert any(option in n for n in names), option
    assert any(n.startswith("f16 mo:f32 noise:bf16") for n in names), "no mixed-dtype case"
