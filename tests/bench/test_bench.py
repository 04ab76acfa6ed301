"""genkernels.bench on CPU: cases, the correctness check, goals, reports and the no-GPU path."""

from __future__ import annotations

import functools
import json
import math
import os
import sys

import pytest
import torch

from genkernels.bench import (
    _elementwise,
    _model,
    attention,
    core,
    coupling,
    gan,
    group_norm,
    main,
    modconv,
    reparam,
    report,
    runner,
    schedule_step,
)
from genkernels.triton._common import triton_unavailable


def test_cases_cover_the_anchor_shapes():
    cases = group_norm.cases()
    assert len(cases) == 4 * 2 * 2 * 2 and len(group_norm.cases(quick=True)) == 16
    assert len({c.label for c in cases}) == len(cases)
    big = next(c for c in cases if c.params["shape"] == [1, 128, 512, 512] and c.params["mode"] == "fwd+bwd")
    assert big.work == 5 * 128 * 512 * 512 * 2  # x, y, dy, x again, dx in 2-byte dtypes


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
    records[0].results[2].host_ms = 0.0123
    meta = {"device": "test", "torch": torch.__version__, "flush_ms": 0.0875}
    written = report.write(tmp_path, meta, core.Ceilings(3000.0, 700.0), records, [group_norm.summarize(records)])
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert len(data["cases"]) == len(records)
    assert data["cases"][0]["results"][2]["host_ms"] == 0.0123
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert "PASS" in text and "GB/s (x, dy read + y, dx written, and x read again by the backward: 5 tensors)" in text
    # The CPU time a call takes to issue its work, next to its GPU time, and the flush that hides it.
    assert "| ms | host ms |" in text and "| 0.2500 | 0.0123 |" in text and "0.0875 ms in this run" in text
    assert str(tmp_path / report.CHART_NAME) in written or any(w.startswith("no chart") for w in written)


def test_redraw_reads_back_the_records(tmp_path):
    """bench.json holds every field of every result, so a run's chart can be drawn again from it alone."""
    pytest.importorskip("matplotlib")
    records = _records(4.0, 2.0, 70.0)
    records[0].results[2].host_ms = 0.0123
    meta = {"device": "test", "torch": torch.__version__, "flush_ms": 0.0875}
    report.write(tmp_path, meta, core.Ceilings(3000.0, 700.0), records, [], with_chart=False)
    got_meta, got = report.records_from_json(tmp_path / report.JSON_NAME)
    assert got_meta == meta and got == records
    out = tmp_path / "again"
    assert runner.main(["--redraw", str(tmp_path / report.JSON_NAME), "--out", str(out)]) == 0
    assert (out / report.CHART_NAME).stat().st_size > 10_000
    assert report._family("triton + CUDA graph") == "triton" and report._family("genkernels (no cache)") == "genkernels"


def test_host_ms_is_the_median_unsynchronized_call(monkeypatch):
    """On a clock the calls advance by set amounts (a real one would time this machine's load too)."""
    syncs, calls, clock = [], [], [100.0]
    delays = iter([0.0, 0.03, 0.001, 0.03, 0.0])  # seconds: mean 12.2 ms, max 30 ms, median 1 ms
    monkeypatch.setattr(core.time, "perf_counter", lambda: clock[0])

    def fn():
        calls.append(len(syncs))  # no sync between the calls
        clock[0] += next(delays)

    took = core.host_ms(fn, calls=5, sync=lambda: syncs.append(1))
    assert calls == [1] * 5 and len(syncs) == 2  # one sync before, one after
    assert took == pytest.approx(1.0)  # the median: neither the mean nor the maximum of the calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without a GPU")
def test_main_without_gpu_runs_the_self_check(tmp_path, capsys, monkeypatch):
    # The suite runs with TRITON_INTERPRET=1, which would run the triton checks here (they have tests of their own).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["--out", str(tmp_path), "--no-interpret"]) == 0
    assert "No CUDA GPU is present" in capsys.readouterr().out
    checks = {
        (c["op"], c["backend"]): c["status"] for c in json.loads((tmp_path / "selfcheck.json").read_text())["checks"]
    }
    for op in ("group_norm", "attention", "schedule_step", "modconv", "gan", "unet"):
        assert checks[op, "reference"] == "ok" and checks[op, "cuda"] == "skipped"
        assert checks[op, "triton"] == "skipped"  # --no-interpret


def test_command_line_errors_before_any_work(tmp_path, capsys):
    """An --out that is a file fails before the self-check runs (the reports are written last); an unknown
    --self-check backend and a --budget-s <= 0 are argparse errors."""
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert main(["--out", str(a_file), "--ops", "rope", "--no-interpret"]) == 2
    captured = capsys.readouterr()
    assert "exists and is not a folder" in captured.err and "No CUDA GPU" not in captured.out
    for argv, message in ((["--self-check", "bogus"], "invalid choice: 'bogus'"), (["--budget-s", "-5"], "> 0")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------- attention


def test_attention_cases_cover_the_anchor_shapes():
    cases = attention.cases()
    assert len(cases) == 7 * 2 * 2 and len({c.label for c in cases}) == len(cases)
    quick = attention.cases(quick=True)
    assert [c.params["dtype"] for c in quick] == ["bf16"] * 14
    # Most important first: the DiT-XL block's attention (reported, no goal), then DiT/FLUX forward, its
    # forward + backward, and so on down the ANCHORS workloads.
    assert [c.params["mode"] for c in quick] == ["fwd", "fwd+bwd"] * 7
    assert [c.params["workload"] for c in quick[::2]] == [s.workload for s in attention.SHAPES]
    assert [c.params["workload"] for c in quick[:3:2]] == ["DiT-XL self", "DiT/FLUX"]
    assert attention.SHAPES[-1].workload == "long"
    assert [c.params["goal"] for c in quick[::2]] == [False] + [True] * 6
    shapes = {(tuple(c.params["shape"]), c.params["causal"]) for c in cases}
    assert shapes == {
        ((2, 16, 4096, 4096, 72), False),
        ((2, 8, 4096, 4096, 40), False),
        ((2, 8, 4096, 77, 40), False),
        ((2, 10, 4096, 4096, 64), False),
        ((1, 24, 4608, 4608, 128), False),
        ((1, 16, 16384, 16384, 64), False),
        ((4, 16, 4096, 4096, 128), True),
    }
    assert cases[0].variant_names()[:5] == [
        core.EAGER,
        attention.FLASH,
        attention.CUDNN,
        attention.EFFICIENT,
        "FlexAttention",
    ]
    assert all(c.peer == attention.FLASH for c in cases)


def test_attention_flops():
    by_label = {(c.params["workload"], c.params["dtype"], c.params["mode"]): c for c in attention.cases()}
    dit = by_label["DiT/FLUX", "bf16", "fwd"]
    assert dit.work == 4 * 1 * 24 * 4608 * 4608 * 128
    assert by_label["DiT/FLUX", "fp16", "fwd+bwd"].work == 3.5 * dit.work
    lm = by_label["causal LM", "bf16", "fwd"]
    assert lm.work == 4 * 4 * 16 * 4096 * 4096 * 128 / 2
    assert by_label["causal LM", "bf16", "fwd+bwd"].work == 3.5 * lm.work
    # The floor: FLOPs at the measured matmul rate. 700 TFLOP/s on DiT/FLUX forward: 0.0233 TFLOP -> 0.0332 ms.
    assert math.isclose(core.floor_ms(dit.work, "TFLOP/s", 700.0), dit.work / 700e12 * 1e3)


def test_attention_eager_skips_the_long_case():
    long_fwd = next(c for c in attention.cases() if c.params["workload"] == "long")
    assert long_fwd.score_bytes() == 16 * 16384 * 16384 * 2
    v = long_fwd.variant(core.EAGER)  # decided from the shape alone, before any input exists
    assert v.fn is None and "8.6 GB" in v.skip
    others = [c for c in attention.cases() if c.params["workload"] != "long"]
    assert all(c.score_bytes() <= attention.EAGER_MAX_SCORE_BYTES for c in others)


def test_attention_case_on_cpu_checks_every_variant():
    """A small case run end to end on CPU (no timing): inputs, float32 truth, eager and SDPA checked against it."""
    case = attention.AttentionCase(attention.Shape("tiny", 1, 2, 40, 40, 16, causal=True), torch.float16, "fwd+bwd")
    case.prepare(torch.device("cpu"))
    try:
        assert [e.name for e in case.expected()] == ["dq", "dk", "dv"]
        for name in (core.EAGER, attention.FLASH):
            v = case.variant(name)
            assert v.skip is None and not v.strict
            assert core.compare(v.fn(), case.expected()).ok
        wrong = core.Variant("wrong", "genkernels", lambda: [t + 0.01 for t in case.expected()[0].truth.unsqueeze(0)])
        assert not core.compare(wrong.fn(), case.expected()).ok
        cudnn = case.variant(attention.CUDNN)  # no cuDNN attention on CPU: skipped with torch's error
        assert cudnn.fn is None and cudnn.skip
    finally:
        case.release()


def test_attention_reference_in_chunks_matches_one_piece(monkeypatch):
    q, k, v, dout = (torch.randn(2, 3, 9, 8, dtype=torch.float16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    whole = attention.reference_truth(q, k, v, dout, True, 0.3)
    monkeypatch.setattr(attention, "REFERENCE_CHUNK_BYTES", 1)  # one head at a time
    pieces = attention.reference_truth(q, k, v, dout, True, 0.3)
    for a, b in zip(whole, pieces):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _attention_records(ours: float, flex: float | None = 1.0, bwd: float = 1.5) -> list[core.CaseRecord]:
    """Synthetic bf16 records: SDPA flash 1 ms, cuDNN 0.8 ms; triton ``ours`` (fwd) or ``bwd`` (fwd+bwd) x flash."""
    records = []
    for case in attention.cases(quick=True):
        rec = core.record_of(case)
        fwd = case.params["mode"] == "fwd"
        speed = ours if fwd else bwd
        rec.results = [
            core.Result(core.EAGER, "baseline", "ok", ms=5.0, rate=1.0, pct_ceiling=1.0),
            core.Result(attention.FLASH, "baseline", "ok", ms=1.0, rate=100.0, pct_ceiling=14.0),
            core.Result(attention.CUDNN, "baseline", "ok", ms=0.8, rate=125.0, pct_ceiling=18.0),
            core.Result(attention.EFFICIENT, "baseline", "skipped", "not here"),
            core.Result(attention.FLEX, "baseline", "ok", ms=flex, rate=1.0, pct_ceiling=1.0)
            if flex is not None
            else core.Result(attention.FLEX, "baseline", "skipped", "FlexAttention needs torch >= 2.5"),
            core.Result("triton", "genkernels", "ok", ms=1 / speed, rate=100.0 * speed, pct_ceiling=14.0 * speed),
            core.Result("cuda", "genkernels", "skipped", "forward only")
            if not fwd
            else core.Result("cuda", "genkernels", "ok", ms=1 / (speed * 0.9), rate=90.0, pct_ceiling=13.0),
        ]
        core.add_speedups(rec)
        rec.floor_ms = core.floor_ms(rec.work, rec.unit, 700.0)
        records.append(rec)
    return records


def test_attention_goals_met_and_missed():
    summary = attention.summarize(_attention_records(ours=1.3, bwd=1.3))
    assert [g.passed for g in summary.goals] == [True, True, True, True, True]
    assert "worst 1.30x" in summary.goals[0].measured and "triton" in summary.goals[0].measured
    assert "(6)" in summary.goals[0].name  # the ANCHORS cases: the DiT-XL block's attention is reported only
    assert any(row[0].startswith("DiT-XL self") for row in summary.rows)
    summary = attention.summarize(_attention_records(ours=1.1, bwd=1.0))
    assert [g.passed for g in summary.goals] == [False, True, False, False, False]  # cuDNN: 0.8 ms vs 0.91 ms
    triton_col = summary.headers.index("triton")
    agg = [r for r in summary.rows if r[0].startswith("forward: vs SDPA flash")]
    assert agg and agg[0][triton_col] == "1.10x (1.10x)"
    assert len(summary.rows) == 14 + 2


def test_attention_goals_unmeasured():
    records = _attention_records(ours=1.3, flex=None)
    flex_goal = attention.summarize(records).goals[1]
    assert flex_goal.passed is None and "FlexAttention did not run" in flex_goal.measured
    # A case where no genkernels backend ran leaves "every case" unmeasured, unless another case misses.
    first, second = [rec for rec in records if rec.params["mode"] == "fwd" and rec.params["goal"]][:2]
    first.results = [
        r if r.role == "baseline" else core.Result(r.variant, r.role, "skipped", "no") for r in first.results
    ]
    assert attention.summarize(records).goals[0].passed is None
    second.result("triton").ms = 2.0
    second.result("cuda").ms = 2.0
    assert attention.summarize(records).goals[0].passed is False
    assert attention.summarize([]).goals[0].passed is None


def test_attention_reports(tmp_path):
    records = _attention_records(ours=1.1)
    records[0].result(core.EAGER).reason = "outside the criterion, timed anyway (a baseline): dq: ..."
    meta = {"device": "test", "torch": torch.__version__}
    summaries = [attention.summarize(records)]
    report.write(tmp_path, meta, core.Ceilings(3000.0, 700.0), records, summaries, with_chart=False)
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert "vs SDPA flash" in text and "floor ms" in text and "MISS" in text
    assert "vs compile" not in text.split("## attention, forward")[1]  # no torch.compile variant for attention
    assert "ok, outside the criterion" in text
    line = report.one_line(records[0])
    assert "triton" in line and "1.10x" in line
    assert report.goal_result(None) == "UNMEASURED"


def test_attention_self_check_on_cpu():
    assert attention.self_check("reference").status == "ok"
    assert attention.self_check("cuda").status == "skipped"
    if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        result = attention.self_check("triton")  # a few seconds under the interpreter
        assert result.status == "ok", result.detail


def test_attention_case_runs_end_to_end_on_cpu(monkeypatch):
    """run_case on a small case, the GPU timer replaced: skips carry reasons, baselines outside the
    criterion are still timed, and a genkernels backend with wrong numbers fails and is not timed."""
    monkeypatch.setattr(core, "time_ms", lambda fn, timing=None: 1.0)
    monkeypatch.setattr(attention, "BASELINES", (core.EAGER, attention.FLASH, attention.CUDNN))  # Flex: 10 s on CPU
    correct = attention._genkernels
    monkeypatch.setattr(attention, "_genkernels", lambda b, *a: correct("reference", *a) + 0.1)
    case = attention.AttentionCase(attention.Shape("tiny", 1, 2, 24, 24, 16), torch.float16, "fwd")
    rec = core.run_case(case, torch.device("cpu"), core.FULL_TIMING, core.Ceilings(100.0, 1e-3))
    status = {r.variant: r.status for r in rec.results}
    assert status == {
        core.EAGER: "ok",
        attention.FLASH: "ok",
        attention.CUDNN: "skipped",
        "triton": "failed",
        "cuda": "failed",
    }
    assert all(r.ms is None for r in rec.results if r.role == "genkernels")
    assert "wrong numbers" in rec.result("triton").reason
    assert rec.result(core.EAGER).vs_peer == 1.0 and rec.result(attention.FLASH).pct_ceiling is not None
    assert math.isclose(rec.floor_ms, case.work / 1e9 * 1e3)  # 1e-3 TFLOP/s = 1e9 FLOP/s; in ms
    assert rec.copy_gbs == 100.0  # the run's copy rate, for floors with a memory-bound part (dit)
    assert rec.peer == attention.FLASH and rec.result(attention.CUDNN).reason


def test_budget_split_between_ops():
    assert runner.op_budget(300.0, [1.0, 2.0]) == 100.0
    assert runner.op_budget(250.0, [2.0]) == 250.0  # the last op gets all that is left
    assert runner.op_budget(-5.0, [1.0, 2.0]) == 0.0
    assert runner.OPS == (
        "group_norm",
        "attention",
        "schedule_step",
        "reparam",
        "coupling",
        "bias_act",
        "adaln",
        "rope",
        "modconv",
        "imagegpt",
        "dit",
        "vae",
        "gan",
        "unet",
    )
    assert attention.BUDGET_SHARE == 2.0 and schedule_step.BUDGET_SHARE == 0.5
    assert modconv.BUDGET_SHARE == 1.0 and gan.BUDGET_SHARE == 0.5


# --------------------------------------------------------------------------- schedule_step


def test_schedule_step_cases_cover_the_anchor_shapes():
    cases = schedule_step.cases()
    assert [(c.step.name, c.shape, c.dtype) for c in cases[:2]] == [
        ("DDIM", (2, 4, 128, 128), torch.float32),
        ("DDIM", (1, 16, 32, 90, 160), torch.float32),
    ]
    assert {c.step.name for c in cases} == {s.name for s in schedule_step.STEPS}
    assert all(c.work == c.step.tensors_moved * math.prod(c.shape) * c.dtype.itemsize for c in cases)
    assert [(c.step.name, c.dtype) for c in schedule_step.cases(quick=True)] == [("DDIM", torch.float32)] * 2


@pytest.mark.parametrize("step", schedule_step.STEPS, ids=lambda s: s.name)
def test_schedule_step_ops_compute_the_eager_steps(step):
    """Each named op (reference backend) computes its diffusers-style eager step, in float64."""
    args = schedule_step._inputs((2, 3, 4, 5), torch.float64, torch.device("cpu"))
    torch.testing.assert_close(step.genkernels("reference", *args), step.eager(*args))


def test_schedule_step_ddim_coefficients_are_the_ddim_step():
    from genkernels.ops import schedule_step_reference

    model_output, sample, noise = schedule_step._inputs((2, 3, 4, 5), torch.float64, torch.device("cpu"))
    fused = schedule_step_reference(
        sample, model_output, schedule_step.ddim_coeffs(), guidance_scale=schedule_step.GUIDANCE
    )
    torch.testing.assert_close(fused, schedule_step.eager_ddim_cfg(model_output, sample, noise))


def test_schedule_step_goals_take_the_worst_step():
    def record(step, shape, vs_eager, vs_compile, pct):
        params = {"step": step, "shape": list(shape), "dtype": "fp32"}
        rec = core.CaseRecord(schedule_step.OP, "x", "t", params, "GB/s", 1.0, "GB/s")
        result = core.Result("triton", "genkernels", "ok", vs_eager=vs_eager, vs_compile=vs_compile, pct_ceiling=pct)
        rec.results = [result]
        return rec

    records = [
        record(s.name, shape, 5.0 if s.name != "DDPM" else 3.0, 1.2, 85.0)
        for s in schedule_step.STEPS
        for _, shape in schedule_step.SHAPES
    ]
    goals = schedule_step.summarize(records).goals
    assert [g.passed for g in goals] == [False, True, True, True]
    assert "worst: DDPM" in goals[0].measured
    assert all(g.passed is None for g in schedule_step.summarize(records[:-1]).goals[2:])


def test_schedule_step_self_check_on_cpu():
    assert schedule_step.self_check("reference").status == "ok"
    assert schedule_step.self_check("cuda").status == "skipped"


# --------------------------------------------------------------------------- memory-bound ops (_elementwise)

#: The memory-bound ops whose cases, summaries, goals and self-checks are _elementwise's.
MEMORY_BOUND = (reparam, coupling)


def timed_record(case: core.Case, ms: dict[str, float | None], copy_gbs: float = 4000.0) -> core.CaseRecord:
    """A record of ``case`` as if run: each variant in ``ms`` ok at that time, the others skipped."""
    rec = core.record_of(case)
    rec.floor_ms = core.floor_ms(case.work, case.unit, copy_gbs)
    for name in case.variant_names():
        role = core._role(case, name)
        value = ms.get(name)
        if value is None:
            rec.results.append(core.Result(name, role, "skipped", "extension not built"))
        else:
            rec.results.append(core.Result(name, role, "ok", ms=value, pct_ceiling=100 * rec.floor_ms / value))
    core.add_speedups(rec)
    return rec


@pytest.mark.parametrize(
    ("ms", "measured", "passed"),
    [
        (
            {core.EAGER: 1.0, core.COMPILE: 0.3, "triton": 0.25, "cuda": 0.2},
            ["5.00x (cuda)", "1.50x (cuda)"],
            [True] * 2,
        ),
        ({core.EAGER: 1.0, core.COMPILE: 0.2, "triton": 0.25}, ["4.00x (triton)", "0.80x (triton)"], [True, False]),
        (
            {core.EAGER: 1.0, "triton": 0.25},
            ["4.00x (triton)", "unmeasured (torch.compile did not run (skipped))"],
            [True, None],
        ),
        ({core.EAGER: 1.0, core.COMPILE: 0.3}, ["unmeasured (no genkernels variant ran)"] * 2, [None] * 2),
    ],
)
def test_speedup_goal_on_the_best_backend(ms, measured, passed):
    """A goal is met or missed on the genkernels backend that does best, or unmeasured with the reason."""
    rec = timed_record(reparam.ReparamCase(torch.float32, "fwd"), ms)
    goals = [
        _elementwise.speedup_goal(rec, "g", core.EAGER, 3.0),
        _elementwise.speedup_goal(rec, "g", core.COMPILE, 1.0),
    ]
    assert [g.measured for g in goals] == measured and [g.passed for g in goals] == passed
    assert [g.target for g in goals] == [">= 3x", ">= 1.0x"]
    missing = _elementwise.speedup_goal(None, "g", core.EAGER, 3.0)
    assert missing.passed is None and missing.measured == "unmeasured (the case did not run)"


@pytest.mark.parametrize("module", MEMORY_BOUND, ids=lambda m: m.OP)
def test_memory_bound_goals_without_records(module):
    summary = module.summarize([])
    assert summary.rows == [] and summary.goals
    assert all(g.passed is None and "did not run" in g.measured for g in summary.goals)


def test_memory_bound_cases_count_bytes_moved():
    """Every memory-bound case times eager, torch.compile and the backends, its work the bytes that must move."""
    for case in [*reparam.cases(), *coupling.cases()[:10], *schedule_step.cases(), *group_norm.cases()]:
        assert case.unit == "GB/s" and case.variant_names() == [core.EAGER, core.COMPILE, "triton", "cuda"]
        tensors = case.params.get("tensors_moved") or group_norm.TENSORS_MOVED[case.mode]
        assert case.work == tensors * math.prod(case.shape) * case.dtype.itemsize


@pytest.mark.parametrize(
    ("case", "tensors"),
    [
        (reparam.ReparamCase(torch.float32, "fwd+bwd", shape=(2, 4, 8, 8)), 8),
        (coupling.FlowOpCase("coupling", torch.float32, "fwd+bwd", shape=(2, 4, 8, 8)), 7.5),
    ],
    ids=lambda c: getattr(c, "op", None),
)
def test_memory_bound_run_case_on_cpu(case, tensors, monkeypatch):
    """core.run_case on a small case, the GPU timer and torch.compile's compile stubbed out: every variant
    checks and is 'timed', cuda says why it cannot run, and the summary reads the record."""
    monkeypatch.setattr(core, "time_ms", lambda fn, timing=None: 0.5)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    rec = core.run_case(case, torch.device("cpu"), core.QUICK_TIMING, core.Ceilings(1.0, 1.0))
    status = {r.variant: r.status for r in rec.results}
    # triton runs CPU tensors under its interpreter only (set without a GPU); otherwise it is skipped, saying why.
    interpreted = triton_unavailable(torch.empty(0)) is None
    triton = "ok" if interpreted else "skipped"
    assert status == {core.EAGER: "ok", core.COMPILE: "ok", "triton": triton, "cuda": "skipped"}, rec.results
    assert rec.floor_ms == pytest.approx(tensors * math.prod(case.shape) * 4 / 1e9 * 1e3)
    if interpreted:
        assert rec.result("triton").vs_eager == 1.0 and rec.result("triton").err is not None
    else:
        assert "cpu" in rec.result("triton").reason
    rows = sys.modules[type(case).__module__].summarize([rec]).rows
    assert [r[2] for r in rows] == [core.EAGER, core.COMPILE, "triton", "cuda"] and rows[3][3] == "skipped"
    assert rows[0][4] == rows[1][5] == "-" and rows[2][4] == ("1.00x" if interpreted else rows[3][4])


@pytest.mark.parametrize(
    ("module", "texts"),
    [
        (reparam, ["reparameterize + KL, forward + backward", "8 tensors"]),
        (coupling, ["affine coupling, forward + backward", "7.5 tensors", "Glow step (ActNorm, InvConv1x1", "TFLOP/s"]),
    ],
    ids=lambda m: getattr(m, "OP", None),
)
def test_memory_bound_reports(module, texts, tmp_path):
    """One JSON record per case; the op's tables, rate notes and met goals in the markdown."""
    records = [timed_record(c, {core.EAGER: 0.45, core.COMPILE: 0.12, "triton": 0.04}) for c in module.cases()]
    meta = {"device": "test", "torch": torch.__version__}
    report.write(tmp_path, meta, core.Ceilings(4000.0, 700.0), records, [module.summarize(records)], with_chart=False)
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert [c["op"] for c in data["cases"]] == [module.OP] * len(module.cases())
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert all(t in text for t in texts) and "PASS" in text


@pytest.mark.parametrize("module", MEMORY_BOUND, ids=lambda m: m.OP)
def test_memory_bound_self_check_on_cpu(module):
    check = module.self_check("reference")
    assert check.status == "ok", check.detail
    skipped = module.self_check("cuda")
    assert skipped.status == "skipped" and "cuda" in skipped.detail


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="triton runs on CPU only under its interpreter")
@pytest.mark.parametrize("module", MEMORY_BOUND, ids=lambda m: m.OP)
def test_memory_bound_self_check_triton_interpreted(module):
    pytest.importorskip("triton")
    check = module.self_check("triton")
    assert check.status == "ok", check.detail


# --------------------------------------------------------------------------- modconv

#: A small modulated conv case (batch 2, 4 -> 4 channels, 8x8).
SMALL_MODCONV = {"channels": 4, "size": 8, "batch": 2}


def test_modconv_cases_cover_the_config_f_layers():
    cases = modconv.cases()
    assert [(c.params["shape"], c.params["mode"]) for c in cases] == [
        ([32, 512, 64, 64], "fwd"),
        ([32, 256, 128, 128], "fwd"),
        ([32, 128, 256, 256], "fwd"),
        ([32, 512, 64, 64], "fwd+bwd"),
        ([32, 256, 128, 128], "fwd+bwd"),
        ([32, 128, 256, 256], "fwd+bwd"),
    ]
    assert [c.label for c in modconv.cases(quick=True)] == [c.label for c in cases[:3]]
    assert len({c.label for c in cases}) == len(cases)
    assert all(c.params["dtype"] == "bf16" and c.params["layout"] == "channels_last" for c in cases)
    assert cases[0].variant_names() == [
        core.EAGER,
        modconv.GROUPED,
        core.COMPILE,
        "triton",
        "cuda",
        "triton grouped",
        "cuda grouped",
    ]
    # Conv FLOPs: 2 * 32 * 512 * 512 * 9 * 64 * 64 = 0.618 TFLOP at every layer; x3 forward + backward.
    assert all(c.work == 2 * 32 * 9 * 2**30 * (3 if c.mode == "fwd+bwd" else 1) for c in cases)
    assert cases[0].unit == "TFLOP/s" and "0.618 TFLOP" in cases[0].rate_note
    act, noise = 32 * 512 * 64 * 64 * 2, 32 * 64 * 64 * 2
    assert cases[0].epilogue_bytes == 2 * act + noise and cases[3].epilogue_bytes == 5 * act + 2 * noise
    # Roles before the variants are built: the grouped eager is a baseline, the grouped backends genkernels'.
    assert core._role(cases[0], modconv.GROUPED) == "baseline" and core._role(cases[0], "cuda grouped") == "genkernels"


def test_modconv_formulations_compute_the_same_function():
    """Eager, grouped and both paths on the ops (reference backend) agree in float64, forward and gradients;
    the bias keeps every pre-activation away from the kink."""
    args, dout = modconv.make_inputs((2, 5, 6, 6), 3, 3, torch.float64, torch.device("cpu"), seed=3)
    assert [a.dtype for a in args] == [torch.float64, *[torch.float32] * 2, torch.float64, *[torch.float32] * 2]
    args = modconv._differentiable(tuple(a.double() for a in args))  # the float32 parameters too: an exact comparison
    assert args[3].requires_grad is False and args[4].dim() == 0
    impls = [
        modconv.eager_grouped_modconv,
        functools.partial(modconv.genkernels_modconv, "reference"),
        functools.partial(modconv.genkernels_grouped_modconv, "reference"),
    ]
    for mode_dout in (None, dout):
        want = modconv.forward_backward(modconv.eager_modconv, args, mode_dout)
        for impl in impls:
            for g, w in zip(modconv.forward_backward(impl, args, mode_dout), want):
                torch.testing.assert_close(g, w)
    out = modconv.eager_modconv(*args)
    assert out.shape == (2, 3, 6, 6)
    z = out / modconv.GAIN  # lrelu(z): z where positive, 0.2 z where negative
    assert (z > 1).all(dim=(0, 2, 3))[0] and (z < -0.2).all(dim=(0, 2, 3))[1]


def test_modconv_pick_faster():
    times = {"a": 2.0, "b": 1.0}
    assert modconv.pick_faster({"a": lambda: "a", "b": lambda: "b"}, lambda fn: times[fn()]) == ("b", times)

    def timer(fn):
        if fn() == "b":
            raise torch.cuda.OutOfMemoryError("out of memory")
        return 3.0

    name, ms = modconv.pick_faster({"a": lambda: "a", "b": lambda: "b"}, timer)
    assert name == "a" and ms == {"a": 3.0, "b": math.inf}


@pytest.mark.parametrize("mode", modconv.MODES)
def test_modconv_case_end_to_end_on_cpu(mode):
    """A small case through prepare and the variants, without timing: every variant is checked on every output,
    a wrong one fails, cuda says why it cannot run, and torch.compile takes the training formulation off the GPU."""
    case = modconv.ModConvCase(mode=mode, dtype=torch.float32, **SMALL_MODCONV)
    rec = core.record_of(case)
    case.prepare(torch.device("cpu"))
    try:
        assert [e.name for e in case.expected()] == list(modconv.OUTPUTS[mode])
        for name in (core.EAGER, modconv.GROUPED, "reference", "reference grouped"):
            v = case.variant(name)
            assert v.skip is None and v.strict == (name != modconv.GROUPED), name
            check = core.compare(v.fn(), case.expected())
            assert check.ok, (name, check.detail)
        wrong = [t + 2 * e.bound for t, e in zip(case.variant(core.EAGER).fn(), case.expected())]
        assert not core.compare(wrong, case.expected()).ok
        for name in ("cuda", "cuda grouped"):
            v = case.variant(name)
            assert v.fn is None and "cuda" in v.skip.lower()
        case._faster_eager()
        assert case.measured == {"compiled": core.EAGER} and rec.params["measured"] is case.measured
    finally:
        case.release()


def modconv_record(case: modconv.ModConvCase, ms: dict[str, float], copy_gbs: float | None = 3000.0):
    """``case``'s record as if run: the variants in ``ms`` ok, the others skipped; the run's copy rate."""
    rec = timed_record(case, ms)
    for r in rec.results:
        if r.variant == modconv.GROUPED:
            r.role = "baseline"
    rec.floor_ms = core.floor_ms(case.work, case.unit, 700.0)
    rec.copy_gbs = copy_gbs
    return rec


@pytest.mark.parametrize(
    ("triton_ms", "grouped_ms", "passed", "worst"),
    [
        (1.0, 3.0, True, "2.00x"),  # eager 2 ms is the faster eager
        (1.0, 1.2, False, "1.20x"),  # the grouped eager is faster: the goal is measured against it
        (1.6, 3.0, False, "1.25x"),
    ],
)
def test_modconv_goal_against_the_faster_eager(triton_ms, grouped_ms, passed, worst):
    ms = {core.EAGER: 2.0, modconv.GROUPED: grouped_ms, core.COMPILE: 0.9, "triton": triton_ms, "cuda grouped": 5.0}
    records = [modconv_record(c, ms) for c in modconv.cases()]
    summary = modconv.summarize(records)
    (goal,) = summary.goals
    assert goal.passed is passed and goal.target == ">= 1.3x" and goal.measured.startswith(f"worst {worst}")
    assert "3 of 3 cases" in goal.measured and "(3)" in goal.name
    assert len(summary.rows) == 6 * 7 and summary.rows[0][0] == "512ch 64x64 bf16 fwd"
    faster = core.EAGER if grouped_ms > 2.0 else modconv.GROUPED
    rows = {r[2]: r for r in summary.rows[:7]}
    assert rows[f"{faster} (faster eager)"][4] == "-"
    assert rows["triton"][4] == f"{min(2.0, grouped_ms) / triton_ms:.2f}x"
    assert rows["triton"][5] == f"{0.9 / triton_ms:.2f}x" and rows["cuda"][3] == "skipped"
    # The floor: conv FLOPs at 700 TFLOP/s plus the epilogue's bytes at 3,000 GB/s.
    case = modconv.cases()[0]
    floor = case.work / 700e12 * 1e3 + case.epilogue_bytes / 3000e9 * 1e3
    assert modconv.floor_ms(records[0]) == pytest.approx(floor) and rows["triton"][1] == f"{floor:.4f}"


def test_modconv_goal_unmeasured():
    summary = modconv.summarize([])
    assert summary.rows == [] and summary.goals[0].passed is None
    assert "did not run" in summary.goals[0].measured
    cases = modconv.cases(quick=True)
    no_backend = [modconv_record(c, {core.EAGER: 2.0}, copy_gbs=None) for c in cases]
    goal = modconv.summarize(no_backend).goals[0]
    assert goal.passed is None and "no genkernels variant ran" in goal.measured
    assert modconv.floor_ms(no_backend[0]) is None
    missing_one = [modconv_record(c, {core.EAGER: 2.0, "triton": 1.0}) for c in cases[:2]]
    goal = modconv.summarize(missing_one).goals[0]
    assert goal.passed is None and "128ch 256x256 (did not run)" in goal.measured
    missing_one[0].result("triton").ms = 1.8  # one case missing the goal fails it, whatever did not run
    assert modconv.summarize(missing_one).goals[0].passed is False


def test_modconv_run_case_on_cpu(monkeypatch):
    """core.run_case on a small case, the GPU timer and torch.compile's compile stubbed out."""
    monkeypatch.setattr(core, "time_ms", lambda fn, timing=None: 0.5)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    case = modconv.ModConvCase(mode="fwd+bwd", dtype=torch.bfloat16, **SMALL_MODCONV)
    rec = core.run_case(case, torch.device("cpu"), core.QUICK_TIMING, core.Ceilings(1.0, 1.0))
    status = {r.variant: r.status for r in rec.results}
    assert status["triton"] in ("ok", "skipped") and status["triton grouped"] == status["triton"]
    assert {k: v for k, v in status.items() if not k.startswith("triton")} == {
        core.EAGER: "ok",
        modconv.GROUPED: "ok",
        core.COMPILE: "ok",
        "cuda": "skipped",
        "cuda grouped": "skipped",
    }, rec.results
    assert rec.floor_ms == pytest.approx(3 * 2 * 2 * 4 * 4 * 9 * 64 / 1e12 * 1e3)
    assert rec.params["measured"] == {"compiled": core.EAGER}  # no copy bandwidth off the GPU
    assert rec.result(modconv.GROUPED).role == "baseline" and rec.result("cuda grouped").role == "genkernels"


def test_modconv_reports(tmp_path):
    ms = {core.EAGER: 2.0, modconv.GROUPED: 3.0, core.COMPILE: 1.0, "triton": 1.2}
    records = [modconv_record(c, ms) for c in modconv.cases()]
    meta = {"device": "test", "torch": torch.__version__}
    report.write(tmp_path, meta, core.Ceilings(3000.0, 700.0), records, [modconv.summarize(records)], with_chart=False)
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert [c["op"] for c in data["cases"]] == ["modconv"] * 6
    assert data["cases"][0]["copy_gbs"] == 3000.0
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert all(t in text for t in ["modulated conv, forward + backward", "vs faster eager", "PASS", "x3 forward"])


def test_modconv_self_check_on_cpu():
    check = modconv.self_check("reference")
    assert check.status == "ok" and "36 checks" in check.detail and "fp32, fp16, bf16" in check.detail, check.detail
    skipped = modconv.self_check("cuda")
    assert skipped.status == "skipped" and "cuda" in skipped.detail


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="triton runs on CPU only under its interpreter")
def test_modconv_self_check_triton_interpreted():
    pytest.importorskip("triton")
    check = modconv.self_check("triton")
    assert check.status == "ok" and "24 checks" in check.detail and "bf16" not in check.detail, check.detail


# --------------------------------------------------------------------------- gan


def test_gan_case_and_flops():
    (case,) = gan.cases()
    (quick,) = gan.cases(quick=True)
    assert quick.label == case.label
    # torch.compile last: the generator's compile is this op's slowest step.
    assert case.variant_names() == list(_model.COMPILE_LAST)
    # eager, genkernels plain and replayed, eager replayed (after the genkernels peaks), torch.compile and its graph.
    assert _model.COMPILE_LAST == (
        core.EAGER,
        _model.GENKERNELS,
        _model.GRAPH,
        _model.EAGER_GRAPH,
        core.COMPILE,
        _model.COMPILE_GRAPH,
    )
    assert _model.VARIANTS.index(_model.GRAPH) < _model.VARIANTS.index(_model.EAGER_GRAPH)
    assert case.params["image"] == [3, 256, 256] and case.params["z"] == [512] and case.params["batch"] == 32
    assert case.params["dtype"] == "bf16" and case.params["config"] == "stylegan2"
    assert case.params["noise_mode"] == "const" and case.params["truncation_psi"] == 1.0
    assert case.unit == "TFLOP/s" and "TFLOP per forward" in case.rate_note and case.measures_peak
    # Convolutions alone: about 168 GFLOP per 256x256 image (the 3x3 modulated convs at 64 to 256 pixels).
    assert 5.2e12 < case.work < 5.5e12
    one = gan.GeneratorCase("tiny", batch=1, size=8).work
    assert gan.GeneratorCase("tiny", batch=2, size=8).work == 2 * one > 0


def test_gan_case_on_cpu():
    """The tiny generator in bf16 passes the criterion, the models share the weights (noise strengths set), and
    the CUDA graph variant says why it cannot run."""
    case = gan.GeneratorCase("tiny", batch=2, size=8, backend="reference")
    case.prepare(torch.device("cpu"))
    try:
        model, twin = case._state["model"], case._state["model_torch"]
        assert twin.torch_layers and not model.torch_layers
        assert twin.synthesis.blocks[0].conv1.weight is model.synthesis.blocks[0].conv1.weight
        strengths = [p for n, p in model.named_parameters() if n.endswith("noise_strength")]
        assert strengths and all(p.item() == pytest.approx(gan.NOISE_STRENGTH, rel=1e-2) for p in strengths)
        assert not any(p.requires_grad for p in model.parameters())
        (exp,) = case.expected()
        assert exp.name == "images" and exp.truth.shape == (2, 1, 8, 8) and exp.truth.std() > 0.05
        for name in (core.EAGER, _model.GENKERNELS):
            v = case.variant(name)
            assert v.skip is None and core.compare(v.fn(), case.expected()).ok, name
        graph = case.variant(_model.GRAPH)
        assert graph.fn is None and "CUDA" in graph.skip
    finally:
        case.release()


def gan_record(ms: dict[str, float | None], peaks: dict[str, float]) -> core.CaseRecord:
    (case,) = gan.cases()
    case.peaks.update(peaks)
    rec = core.record_of(case)
    for name in case.variant_names():
        role = "genkernels" if name in _model.GK_VARIANTS else "baseline"
        if ms.get(name) is None:
            rec.results.append(core.Result(name, role, "failed", "build raised RuntimeError: out of memory"))
        else:
            rec.results.append(core.Result(name, role, "ok", ms=ms[name], first_call_s=1.0))
    core.add_speedups(rec)
    return rec


@pytest.mark.parametrize(
    ("ms", "passed", "best"),
    [
        ({core.EAGER: 57.0, _model.GENKERNELS: 45.0, _model.GRAPH: 44.0, core.COMPILE: 14.0}, True, _model.GRAPH),
        ({core.EAGER: 57.0, _model.GENKERNELS: 60.0, core.COMPILE: 14.0}, False, _model.GENKERNELS),
        ({core.EAGER: 57.0, core.COMPILE: 14.0}, None, None),
    ],
)
def test_gan_goal_and_summary(ms, passed, best):
    """One goal, >= 1.0x eager; the speedup vs torch.compile and the peak memory are reported, not goals."""
    peaks = {core.EAGER: 3.4, _model.GENKERNELS: 3.4, _model.GRAPH: 3.5, core.COMPILE: 1.7}
    summary = gan.summarize([gan_record(ms, peaks)])
    (goal,) = summary.goals
    assert goal.passed is passed and goal.target == ">= 1.0x (floor for resolving)"
    assert goal.name == "generator forward, genkernels vs eager"
    assert goal.measured.startswith("unmeasured") if best is None else f"({best} vs eager)" in goal.measured
    assert summary.headers == ["variant", "ms", "vs eager", "vs torch.compile", "peak GiB", "first call s"]
    rows = {r[0]: r for r in summary.rows}
    assert rows[core.COMPILE][1:5] == ["14.00", f"{57.0 / 14.0:.2f}x", "-", "1.70"]
    assert any("convolutions' FLOPs" in n for n in summary.notes)


def test_model_goals_take_each_side_at_its_fastest():
    """The whole-model goals compare the fastest genkernels variant with the faster of eager and eager + CUDA
    graph (of torch.compile and torch.compile + CUDA graph): a baseline bound by its CPU time is not left
    slower than it need be."""
    ms = {core.EAGER: 57.0, _model.EAGER_GRAPH: 40.0, _model.GENKERNELS: 45.0, _model.GRAPH: 44.0}
    ms |= {core.COMPILE: 50.0, _model.COMPILE_GRAPH: 30.0}
    rec = gan_record(ms, {})
    eager, compile_goal = _model.goals(rec, gan.GeneratorCase)[:2]
    assert eager.passed is False and eager.measured.startswith(f"0.91x ({_model.GRAPH} vs {_model.EAGER_GRAPH})")
    assert f"vs {_model.EAGER_GRAPH}: {_model.GENKERNELS} 0.89x, {_model.GRAPH} 0.91x" in eager.measured
    assert compile_goal.passed is False and compile_goal.measured.startswith(f"0.68x ({_model.GRAPH} vs")
    # Plain baselines only (the graphs failed): as before, against eager and torch.compile themselves.
    rec = gan_record({k: v for k, v in ms.items() if k not in (_model.EAGER_GRAPH, _model.COMPILE_GRAPH)}, {})
    eager, compile_goal = _model.goals(rec, gan.GeneratorCase)[:2]
    assert eager.passed and eager.measured.startswith(f"1.30x ({_model.GRAPH} vs eager)")
    assert compile_goal.passed and compile_goal.measured.startswith(f"1.14x ({_model.GRAPH} vs torch.compile)")


def test_model_peaks_only_while_no_graph_holds_memory(monkeypatch):
    """With measures_peak, each variant's peak is measured while no CUDA graph of the case holds its pool: eager,
    genkernels and the genkernels graph (captured first), not the variants built after it (the GPU's calls
    stubbed: a pretend CUDA device, the capture and the memory statistics)."""
    monkeypatch.setattr(_model.ModelCase, "_on_cuda", lambda self: True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)

    class Graph:
        def replay(self):
            pass

    monkeypatch.setattr(_model, "capture_graph", lambda fn: (Graph(), fn()))
    measured = []
    monkeypatch.setattr(_model, "peak_gib", lambda fn: measured.append(fn) or 1.0)
    case = gan.GeneratorCase("tiny", batch=1, size=8, dtype=torch.float32, backend="reference")
    case.prepare(torch.device("cpu"))
    try:
        for name in case.variant_names():
            assert case.variant(name).fn is not None, name
    finally:
        case.release()
    assert set(case.peaks) == {core.EAGER, _model.GENKERNELS, _model.GRAPH}
    assert len(measured) == 3


def test_gan_run_case_on_cpu(monkeypatch):
    """core.run_case on the tiny generator, the GPU timer and torch.compile's compile stubbed out."""
    monkeypatch.setattr(core, "time_ms", lambda fn, timing=None: 2.0)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    case = gan.GeneratorCase("tiny", batch=1, size=8, dtype=torch.float32, backend="reference")
    rec = core.run_case(case, torch.device("cpu"), core.QUICK_TIMING, core.Ceilings(1.0, 1.0))
    assert [(r.variant, r.status) for r in rec.results] == [
        (core.EAGER, "ok"),
        (_model.GENKERNELS, "ok"),
        (_model.GRAPH, "skipped"),
        (_model.EAGER_GRAPH, "skipped"),
        (core.COMPILE, "ok"),
        (_model.COMPILE_GRAPH, "skipped"),
    ]
    assert rec.result(_model.GENKERNELS).vs_compile == 1.0 and rec.params["peak_memory_gib"] == {}


def test_gan_self_check_on_cpu():
    check = gan.self_check("reference")
    assert check.status == "ok" and check.detail.startswith("tiny generator forward, fp32, batch 2, 8x8 image vs")
    skipped = gan.self_check("cuda")
    assert skipped.status == "skipped" and "cuda" in skipped.detail


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="triton runs on CPU only under its interpreter")
def test_gan_self_check_triton_interpreted():
    pytest.importorskip("triton")
    check = gan.self_check("triton")
    assert check.status == "ok", check.detail
