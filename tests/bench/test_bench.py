"""genkernels.bench on CPU: cases, the correctness check, goals, reports and the no-GPU path."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from genkernels.bench import (
    _elementwise,
    attention,
    core,
    coupling,
    group_norm,
    main,
    reparam,
    report,
    runner,
    schedule_step,
)


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
def test_main_without_gpu_runs_the_self_check(tmp_path, capsys, monkeypatch):
    # The suite runs with TRITON_INTERPRET=1, which would run the triton checks here (they have tests of their own).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["--out", str(tmp_path), "--no-interpret"]) == 0
    assert "No CUDA GPU is present" in capsys.readouterr().out
    checks = {
        (c["op"], c["backend"]): c["status"] for c in json.loads((tmp_path / "selfcheck.json").read_text())["checks"]
    }
    for op in ("group_norm", "attention", "schedule_step", "unet"):
        assert checks[op, "reference"] == "ok" and checks[op, "cuda"] == "skipped"
        assert checks[op, "triton"] == "skipped"  # --no-interpret


# --------------------------------------------------------------------------- attention


def test_attention_cases_cover_the_anchor_shapes():
    cases = attention.cases()
    assert len(cases) == 6 * 2 * 2 and len({c.label for c in cases}) == len(cases)
    quick = attention.cases(quick=True)
    assert [c.params["dtype"] for c in quick] == ["bf16"] * 12
    # Most important first: DiT/FLUX forward, then its forward + backward, and so on down the workloads.
    assert [c.params["mode"] for c in quick] == ["fwd", "fwd+bwd"] * 6
    assert [c.params["workload"] for c in quick[::2]] == [s.workload for s in attention.SHAPES]
    assert quick[0].params["workload"] == "DiT/FLUX" and attention.SHAPES[-1].workload == "long"
    shapes = {(tuple(c.params["shape"]), c.params["causal"]) for c in cases}
    assert shapes == {
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
    summary = attention.summarize(_attention_records(ours=1.1, bwd=1.0))
    assert [g.passed for g in summary.goals] == [False, True, False, False, False]  # cuDNN: 0.8 ms vs 0.91 ms
    triton_col = summary.headers.index("triton")
    agg = [r for r in summary.rows if r[0].startswith("forward: vs SDPA flash")]
    assert agg and agg[0][triton_col] == "1.10x (1.10x)"
    assert len(summary.rows) == 12 + 2


def test_attention_goals_unmeasured():
    records = _attention_records(ours=1.3, flex=None)
    flex_goal = attention.summarize(records).goals[1]
    assert flex_goal.passed is None and "FlexAttention did not run" in flex_goal.measured
    # A case where no genkernels backend ran leaves "every case" unmeasured, unless another case misses.
    first, second = [rec for rec in records if rec.params["mode"] == "fwd"][:2]
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
        "vae",
        "unet",
    )
    assert attention.BUDGET_SHARE == 2.0 and schedule_step.BUDGET_SHARE == 0.5


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
        role = "baseline" if name in (core.EAGER, core.COMPILE) else "genkernels"
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
        ({core.EAGER: 1.0, core.COMPILE: 0.3}, ["unmeasured (no genkernels backend ran)"] * 2, [None] * 2),
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
    assert status == {core.EAGER: "ok", core.COMPILE: "ok", "triton": "ok", "cuda": "skipped"}, rec.results
    assert rec.floor_ms == pytest.approx(tensors * math.prod(case.shape) * 4 / 1e9 * 1e3)
    assert rec.result("triton").vs_eager == 1.0 and rec.result("triton").err is not None
    rows = sys.modules[type(case).__module__].summarize([rec]).rows
    assert [r[2] for r in rows] == [core.EAGER, core.COMPILE, "triton", "cuda"] and rows[3][3] == "skipped"
    assert rows[0][4] == rows[1][5] == "-" and rows[2][4] == "1.00x"


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
