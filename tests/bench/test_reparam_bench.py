"""The reparameterize + KL benchmark on CPU: its cases, the baseline formula, the checks, goals, reports and
the self-check."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from genkernels.bench import core, reparam, report
from genkernels.ops import reparameterize

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


def _record(case: reparam.ReparamCase, ms: dict[str, float | None]) -> core.CaseRecord:
    rec = core.record_of(case)
    rec.floor_ms = core.floor_ms(case.work, case.unit, 4000.0)
    for name in case.variant_names():
        role = "baseline" if name in (core.EAGER, core.COMPILE) else "genkernels"
        value = ms.get(name)
        if value is None:
            rec.results.append(core.Result(name, role, "skipped", "extension not built"))
        else:
            rec.results.append(core.Result(name, role, "ok", ms=value, pct_ceiling=100 * rec.floor_ms / value))
    core.add_speedups(rec)
    return rec


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
    records = [_record(c, ms) for c in reparam.cases()]
    summary = reparam.summarize(records)
    assert [g.passed for g in summary.goals] == passed * 4  # fp32, bf16 forward; then forward + backward
    assert [g.target for g in summary.goals[:2]] == [">= 3x", ">= 1.0x"]
    for goal in summary.goals:
        assert goal.measured.startswith("unmeasured") if goal.passed is None else f"({backend})" in goal.measured
    assert len(summary.rows) == 4 * 4 and summary.rows[0][2] == core.EAGER and summary.rows[0][4] == "-"


def test_goals_without_records():
    summary = reparam.summarize([])
    assert [g.passed for g in summary.goals] == [None] * 8 and summary.rows == []
    assert all("did not run" in g.measured for g in summary.goals)


def test_reports(tmp_path):
    records = [_record(c, {core.EAGER: 0.45, core.COMPILE: 0.12, "triton": 0.1}) for c in reparam.cases()]
    meta = {"device": "test", "torch": torch.__version__}
    summaries = [reparam.summarize(records)]
    report.write(tmp_path, meta, core.Ceilings(4000.0, 700.0), records, summaries, with_chart=False)
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert [c["op"] for c in data["cases"]] == ["reparam"] * 4
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert "reparameterize + KL, forward + backward" in text and "8 tensors" in text and "PASS" in text


def test_self_check_on_cpu():
    check = reparam.self_check("reference")
    assert check.status == "ok", check.detail
    skipped = reparam.self_check("cuda")
    assert skipped.status == "skipped" and "cuda" in skipped.detail


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="triton runs on CPU only under its interpreter")
def test_self_check_triton_interpreted():
    pytest.importorskip("triton")
    check = reparam.self_check("triton")
    assert check.status == "ok", check.detail


def test_run_case_on_cpu(monkeypatch):
    """core.run_case on a small case, the GPU timer and torch.compile's compile stubbed out: every variant
    checks and is 'timed', cuda says why it cannot run, and the summary reads the record."""
    monkeypatch.setattr(core, "time_ms", lambda fn, timing=None: 0.5)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    case = reparam.ReparamCase(torch.float32, "fwd+bwd", shape=SMALL)
    rec = core.run_case(case, CPU, core.QUICK_TIMING, core.Ceilings(1.0, 1.0))
    status = {r.variant: r.status for r in rec.results}
    assert status == {core.EAGER: "ok", core.COMPILE: "ok", "triton": "ok", "cuda": "skipped"}, rec.results
    assert rec.floor_ms == pytest.approx(8 * math.prod(SMALL) * 4 / 1e9 * 1e3)
    assert rec.result("triton").vs_eager == 1.0 and rec.result("triton").err is not None
    rows = reparam.summarize([rec]).rows
    assert [r[2] for r in rows] == [core.EAGER, core.COMPILE, "triton", "cuda"] and rows[3][3] == "skipped"
