"""The reparameterize + KL benchmark on CPU: its cases, the baseline formula, the checks, goals and reports
(what it shares with the other memory-bound ops is tested once, in test_bench.py)."""

from __future__ import annotations

import math

import pytest
import torch

from genkernels.bench import core, reparam
from genkernels.ops import reparameterize

from .test_bench import timed_record

CPU = torch.device("cpu")
SMALL = (2, 4, 8, 8)


def test_cases():
    cases = reparam.cases()
    assert [(c.params["dtype"], c.params["mode"]) for c in cases] == [
        ("fp32", "fwd"),
        ("bf16", "fwd"),
        ("fp32", "fwd+bwd"),
        ("bf16", "fwd+bwd"),
    ]
    assert [c.label for c in reparam.cases(quick=True)] == [c.label for c in cases[:2]]
    assert len({c.label for c in cases}) == len(cases)
    n = math.prod(reparam.SHAPE)
    assert reparam.SHAPE == (64, 16, 128, 128) and all(c.params["shape"] == [64, 16, 128, 128] for c in cases)
    assert cases[0].work == 3 * n * 4 and cases[3].work == 8 * n * 2
    assert all(c.unit == "GB/s" and c.variant_names() == [core.EAGER, core.COMPILE, "triton", "cuda"] for c in cases)
    # The floor: 201 MB forward in fp32 at 4,000 GB/s.
    assert core.floor_ms(cases[0].work, "GB/s", 4000.0) == pytest.approx(3 * n * 4 / 4e12 * 1e3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_formula_and_noise_are_the_ops(layout):
    """The baseline formula is the op's specification, and philox_noise is the op's in-kernel noise."""
    mean, logvar, _ = reparam._inputs((2, 6, 5, 5), torch.float64, CPU, seed=3, layout=layout)
    logvar[0, 0, 0, 0] = -40.0
    eps = reparam.philox_noise(mean, seed=11, offset=5)
    z, kl = reparameterize(mean, logvar, seed=11, offset=5, backend="reference")
    z_f, kl_f = reparam.reparameterize_formula(mean, logvar, eps.double())
    torch.testing.assert_close(z, z_f, rtol=1e-6, atol=1e-6)  # eps is float32 on both sides
    torch.testing.assert_close(kl, kl_f, rtol=1e-12, atol=1e-12)
    z_e, kl_e = reparam.eager_reparameterize(mean, logvar)
    assert z_e.shape == z.shape and not torch.allclose(z_e, z)  # its own noise
    torch.testing.assert_close(kl_e, kl_f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", reparam.MODES)
def test_case_end_to_end_on_cpu(mode, monkeypatch):
    """A small case through prepare and the variants, without timing: eager is checked on the noise-free
    output, a genkernels backend on every output; noise from another seed fails."""
    case = reparam.ReparamCase(torch.float32, mode, shape=SMALL)
    case.prepare(CPU)
    try:
        eager = case.variant(core.EAGER)
        assert eager.strict and eager.first_call_s is not None
        assert [e.name for e in case.expected()] == list(reparam.NOISE_FREE[mode])
        assert core.compare(eager.fn(), case.expected()).ok
        ref = case.variant("reference")
        assert [e.name for e in case.expected()] == list(reparam.OUTPUTS[mode])
        if mode == "fwd":  # kl, a sum: the floor scaled by its magnitude, as the test suite does for reductions
            kl = case.expected()[1]
            assert kl.bound >= core.FLOOR[torch.float32] * kl.truth.abs().max().item() > 1e-4
        check = core.compare(ref.fn(), case.expected())
        assert check.ok, check.detail
        monkeypatch.setattr(reparam, "SEED", reparam.SEED + 1)
        wrong = case.variant("reference")
        assert not core.compare(wrong.fn(), case.expected()).ok
    finally:
        case.release()
    cuda = reparam.ReparamCase(torch.float32, mode, shape=SMALL)
    cuda.prepare(CPU)
    v = cuda.variant("cuda")
    assert v.fn is None and "cuda" in v.skip


@pytest.mark.parametrize(
    ("ms", "passed", "backend"),
    [
        ({core.EAGER: 0.45, core.COMPILE: 0.12, "triton": 0.1, "cuda": 0.06}, [True, True], "cuda"),
        ({core.EAGER: 0.45, core.COMPILE: 0.12, "triton": 0.13}, [True, False], "triton"),
        ({core.EAGER: 0.45, core.COMPILE: 0.09, "triton": 0.2}, [False, False], "triton"),
        ({core.EAGER: 0.45, "triton": 0.1}, [True, None], "triton"),
        ({core.EAGER: 0.45, core.COMPILE: 0.12}, [None, None], None),
    ],
)
def test_goals(ms, passed, backend):
    records = [timed_record(c, ms) for c in reparam.cases()]
    summary = reparam.summarize(records)
    assert [g.passed for g in summary.goals] == passed * 4  # fp32, bf16 forward; then forward + backward
    assert [g.target for g in summary.goals[:2]] == [">= 3x", ">= 1.0x"]
    for goal in summary.goals:
        assert goal.measured.startswith("unmeasured") if goal.passed is None else f"({backend})" in goal.measured
    assert len(summary.rows) == 4 * 4 and summary.rows[0][2] == core.EAGER and summary.rows[0][4] == "-"
