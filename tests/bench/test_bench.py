"""genkernels.bench on CPU: cases, the correctness check, goals, reports and the no-GPU path."""

from __future__ import annotations

import json

import pytest
import torch

from genkernels.bench import core, group_norm, main, report


def test_cases_cover_the_anchor_shapes():
    cases = group_norm.cases()
    assert len(cases) == 4 * 2 * 2 * 2 and len(group_norm.cases(quick=True)) == 16
    assert len({c.label for c in cases}) == len(cases)
    big = next(c for c in cases if c.params["shape"] == [1, 128, 512, 512] and c.params["mode"] == "fwd+bwd")
    assert big.work == 4 * 128 * 512 * 512 * 2  # x, y, dy, dx in 2-byte dtypes


def test_compare_applies_the_criterion():
    truth = torch.randn(64, dtype=torch.float64)
    exp = [core.expected("y", truth.to(torch.bfloat16), truth)]
    assert core.compare([truth.to(torch.bfloat16)], exp).ok
    assert not core.compare([truth.to(torch.bfloat16) + 1], exp).ok
    assert not core.compare([torch.full((64,), float("nan"))], exp).ok
    assert not core.compare([truth[:3]], exp).ok


def _records(speedup: float, compile_speedup: float, pct: float) -> list[core.CaseRecord]:
    records = []
    for case in group_norm.cases(quick=True):
        rec = core.record_of(case)
        rec.results = [
            core.Result(core.EAGER, "baseline", "ok", ms=1.0),
            core.Result(core.COMPILE, "baseline", "ok", ms=compile_speedup / speedup),
            core.Result("triton", "genkernels", "ok", ms=1 / speedup, pct_ceiling=pct),
            core.Result("cuda", "genkernels", "skipped", "extension not built"),
        ]
        core.add_speedups(rec)
        records.append(rec)
    return records


@pytest.mark.parametrize(("speedup", "vs_compile", "pct", "passed"), [(4.0, 2.0, 70.0, True), (1.5, 1.0, 30.0, False)])
def test_goals(speedup, vs_compile, pct, passed):
    summary = group_norm.summarize(_records(speedup, vs_compile, pct))
    assert [g.passed for g in summary.goals] == [passed] * 4
    assert all("(triton)" in g.measured for g in summary.goals)
    cuda_row = next(r for r in summary.rows if r[0] == "cuda")
    assert cuda_row[1].startswith("n/a")


def test_reports(tmp_path):
    records = _records(4.0, 2.0, 70.0)
    meta = {"device": "test", "torch": torch.__version__}
    written = report.write(tmp_path, meta, core.Ceilings(3000.0, 700.0), records, [group_norm.summarize(records)])
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert len(data["cases"]) == len(records)
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert "PASS" in text and "GB/s (x, dy read + y, dx written: 4 tensors)" in text
    assert str(tmp_path / report.CHART_NAME) in written or any(w.startswith("no chart") for w in written)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without a GPU")
def test_main_without_gpu_runs_the_self_check(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--no-interpret"]) == 0
    assert "No CUDA GPU is present" in capsys.readouterr().out
    checks = {c["backend"]: c["status"] for c in json.loads((tmp_path / "selfcheck.json").read_text())["checks"]}
    assert checks["reference"] == "ok" and checks["cuda"] == "skipped"
