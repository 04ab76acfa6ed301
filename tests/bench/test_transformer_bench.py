"""The transformer family's benchmarks on CPU: adaln, rope, dit (one DiT block) and imagegpt (KV-cache sampling):
their cases, the baseline formulas, the checks before timing, the goals on synthetic timings, the self-checks."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from genkernels.bench import _model, adaln, core, dit, imagegpt, main, report, rope, runner
from genkernels.ops import gated_residual_layer_norm_modulate_reference, layer_norm_modulate_reference, rope_reference

from .test_bench import timed_record
from .test_unet_bench import model_record

CPU = torch.device("cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def test_registered_in_the_runner():
    """The memory-bound ops after bias_act, ImageGPT sampling before the whole models, the DiT block first of them."""
    ops = runner.OPS
    assert ops.index("adaln") == ops.index("bias_act") + 1 and ops.index("rope") == ops.index("adaln") + 1
    assert ops[-5:] == ("imagegpt", "dit", "vae", "gan", "unet")
    for name, module in (("adaln", adaln), ("rope", rope), ("dit", dit), ("imagegpt", imagegpt)):
        assert runner.op_module(name) is module and module.OP == name and module.BUDGET_SHARE == 0.5


# --------------------------------------------------------------------------- adaln


def test_adaln_cases():
    cases = adaln.cases()
    assert [(c.params["kernel"], c.params["workload"], c.params["mode"]) for c in cases] == [
        (which, w, mode) for mode in adaln.MODES for which in adaln.OPS for w in ("DiT-XL", "FLUX")
    ]
    assert [c.label for c in adaln.cases(quick=True)] == [c.label for c in cases[:4]]
    assert len({c.label for c in cases}) == 8 and all(c.params["dtype"] == "bf16" for c in cases)
    graphs = [core.EAGER, core.COMPILE, "triton", "cuda"]
    graphs = [n + adaln.GRAPH_SUFFIX for n in graphs]
    assert all(
        c.variant_names() == [core.EAGER, core.COMPILE, *graphs[:2], "triton", "cuda", *graphs[2:]] for c in cases
    )
    # Bytes that must move: DiT-XL forward of layer_norm_modulate = x read + y written + shift, scale read.
    n, bd = 2 * 4096 * 1152, 2 * 1152
    assert cases[0].work == (2 * n + 2 * bd) * 2 == adaln.work_bytes(adaln.NORM, "fwd", (2, 4096, 1152))
    for c in cases:
        assert c.work == pytest.approx(adaln.work_bytes(c.params["kernel"], c.params["mode"], c.shape))
    fused_bwd = next(c for c in cases if c.params["kernel"] == adaln.FUSED and c.params["mode"] == "fwd+bwd")
    assert fused_bwd.params["row_tensors_moved"] == 10 and fused_bwd.params["modulation_tensors_moved"] == 9
    # The floor at 4,000 GB/s: DiT-XL forward, 37.8 MB in 0.0094 ms (ANCHORS: torch.compile 0.037 ms on an H200).
    assert core.floor_ms(cases[0].work, "GB/s", 4000.0) == pytest.approx(cases[0].work / 4e12 * 1e3)


def test_adaln_formulas_are_the_ops():
    """The eager baselines are the ops' specification (no affine, per-sample modulations), values and gradients."""
    args, grads = adaln._inputs(adaln.FUSED, (2, 5, 12), torch.float64, CPU, seed=1)
    x, y, gate, shift, scale = args
    (got,) = adaln.eager_layer_norm_modulate(x, shift, scale)
    torch.testing.assert_close(got, layer_norm_modulate_reference(x, shift=shift, scale=scale, eps=adaln.EPS))
    got = adaln.eager_gated_residual_layer_norm_modulate(x, y, gate, shift, scale)
    want = gated_residual_layer_norm_modulate_reference(x, y, gate, shift=shift, scale=scale, eps=adaln.EPS)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    for a in args:
        a.requires_grad_(True)
    mine = adaln._forward_backward(adaln.eager_gated_residual_layer_norm_modulate, args, grads)

    def reference(*a):
        return gated_residual_layer_norm_modulate_reference(*a[:3], shift=a[3], scale=a[4], eps=adaln.EPS)

    for g, w in zip(mine, adaln._forward_backward(reference, args, grads)):
        torch.testing.assert_close(g, w)
    assert [t.shape for t in mine] == [(2, 5, 12)] * 2 + [(2, 12)] * 3


@pytest.mark.parametrize("which", adaln.OPS)
@pytest.mark.parametrize("mode", adaln.MODES)
def test_adaln_case_end_to_end_on_cpu(which, mode):
    """A small case through prepare and the variants, without timing: every output checked; a wrong eps fails;
    cuda says why it cannot run."""
    case = adaln.AdaLNCase(which, "small", (2, 6, 40), mode, dtype=torch.float32)
    case.prepare(CPU)
    try:
        names = [e.name for e in case.expected()]
        assert names == list(adaln._output_names(which, mode))
        for name in (core.EAGER, "reference"):
            v = case.variant(name)
            check = core.compare(v.fn(), case.expected())
            assert check.ok, (name, check.detail)
        s = case._state

        def wrong(*a):
            if which == adaln.NORM:
                return (layer_norm_modulate_reference(a[0], shift=a[1], scale=a[2], eps=1e-1),)
            return gated_residual_layer_norm_modulate_reference(*a[:3], shift=a[3], scale=a[4], eps=1e-1)

        assert not core.compare(adaln._forward_backward(wrong, s["args"], s["grads"]), case.expected()).ok
        cuda = case.variant("cuda")
        assert cuda.fn is None and "cuda" in cuda.skip.lower()
    finally:
        case.release()


FAST = {core.EAGER: 0.08, core.COMPILE: 0.037, "triton": 0.012, "cuda": 0.015}


@pytest.mark.parametrize(
    ("ms", "passed"),
    [
        (FAST, [True, True, True]),
        # 3.2x eager and 1.5x torch.compile, but 0.025 ms is 38% of the copy bandwidth on DiT-XL (floor 0.0094 ms).
        ({core.EAGER: 0.08, core.COMPILE: 0.037, "triton": 0.025}, [True, True, False]),
        ({core.EAGER: 0.08, core.COMPILE: 0.011, "triton": 0.012}, [True, False, True]),
        ({core.EAGER: 0.03, core.COMPILE: 0.037, "triton": 0.012}, [False, True, True]),
        ({core.EAGER: 0.08, core.COMPILE: 0.037}, [None, None, None]),
    ],
)
def test_adaln_goals(ms, passed):
    """The issue's goals on layer_norm_modulate's bf16 forward, per shape: 3x eager, 1.0x compile, 75% copy BW."""
    records = [timed_record(c, ms) for c in adaln.cases() if c.params["workload"] == "DiT-XL"]
    summary = adaln.summarize(records)
    assert len(summary.goals) == 6 and [g.target for g in summary.goals[:3]] == [
        ">= 3x",
        ">= 1.0x",
        ">= 75% of copy BW",
    ]
    assert [g.passed for g in summary.goals[:3]] == passed
    assert all(g.passed is None and "did not run" in g.measured for g in summary.goals[3:])  # FLUX not run
    assert summary.goals[0].name.startswith("layer_norm_modulate bf16 fwd DiT-XL 2x4096x1152")
    assert len(summary.rows) == 4 * len(adaln.variants_of()) and summary.rows[0][2] == core.EAGER


TRITON_GRAPH = "triton" + adaln.GRAPH_SUFFIX


@pytest.mark.parametrize(
    ("ms", "measured", "passed"),
    [
        # The plain call waits for its CPU time; replayed from a graph, the kernel meets all three.
        (
            {core.EAGER: 0.08, core.COMPILE: 0.037, "triton": 0.1, TRITON_GRAPH: 0.012},
            [
                "6.67x (triton + CUDA graph vs eager)",
                "3.08x (triton + CUDA graph vs torch.compile)",
                "79% (triton + CUDA graph)",
            ],
            [True, True, True],
        ),
        # Eager's own graph is its faster side: 0.03 / 0.012 = 2.5x, under 3x.
        (
            {core.EAGER: 0.08, adaln.EAGER_GRAPH: 0.03, core.COMPILE: 0.037, TRITON_GRAPH: 0.012},
            ["2.50x (triton + CUDA graph vs eager + CUDA graph)", "3.08x", "79% (triton + CUDA graph)"],
            [False, True, True],
        ),
        # torch.compile's graph is its faster side: 0.011 / 0.012, under 1.0x.
        (
            {core.EAGER: 0.08, core.COMPILE: 0.037, adaln.COMPILE_GRAPH: 0.011, TRITON_GRAPH: 0.012},
            ["6.67x", "0.92x (triton + CUDA graph vs torch.compile + CUDA graph)", "79% (triton + CUDA graph)"],
            [True, False, True],
        ),
        # No baseline at all: unmeasured, naming it.
        (
            {TRITON_GRAPH: 0.012},
            [
                "unmeasured (eager did not run (skipped))",
                "unmeasured (torch.compile did not run (skipped))",
                "79% (triton + CUDA graph)",
            ],
            [None, None, True],
        ),
    ],
)
def test_adaln_goals_take_each_side_at_its_fastest(ms, measured, passed):
    """Each goal compares the fastest genkernels variant (a backend, plain or replayed from a CUDA graph) with the
    faster of the baseline plain and replayed; the bandwidth goal takes the best genkernels variant."""
    records = [timed_record(c, ms) for c in adaln.cases() if c.params["workload"] == "DiT-XL"]
    goals = adaln.summarize(records).goals[:3]
    assert [g.passed for g in goals] == passed
    for goal, text in zip(goals, measured):
        assert goal.measured.startswith(text), (goal.measured, text)


def test_adaln_graph_variants_on_cpu():
    """Every case lists eager, torch.compile and each backend plain and replayed from a CUDA graph; the graph
    variants are genkernels' own (the backends') or baselines (eager's, torch.compile's), and on the CPU each
    graph variant is skipped with its reason."""
    case = adaln.AdaLNCase(adaln.NORM, "small", (2, 6, 40), "fwd", dtype=torch.float32)
    names = case.variant_names()
    assert names[:4] == [core.EAGER, core.COMPILE, adaln.EAGER_GRAPH, adaln.COMPILE_GRAPH]
    assert {core._role(case, n) for n in names[4:]} == {"genkernels"}
    assert {core._role(case, n) for n in names[:4]} == {"baseline"}
    case.prepare(CPU)
    try:
        for name in (adaln.EAGER_GRAPH, TRITON_GRAPH):
            v = case.variant(name)
            assert v.fn is None and "CUDA graphs need a CUDA device" in v.skip
    finally:
        case.release()


def test_adaln_bandwidth_goal_picks_the_best_backend():
    case = adaln.cases()[0]
    floor = core.floor_ms(case.work, "GB/s", 4000.0)
    rec = timed_record(case, {core.EAGER: 1.0, "triton": floor / 0.7, "cuda": floor / 0.8})
    goal = adaln.bandwidth_goal(rec, "bw", 75.0)
    assert goal.passed and goal.measured == "80% (cuda)"
    assert adaln.bandwidth_goal(None, "bw", 75.0).passed is None
    # On a GPU the record also holds a copy of the same bytes timed the same way: shown next to the best.
    rec.copy_ms = floor / 0.85
    assert adaln.bandwidth_goal(rec, "bw", 75.0).measured == "80% (cuda); a copy of the same bytes: 85%"


def test_same_bytes_copy_timed_like_the_variants(monkeypatch):
    """A copy_ of a memory-bound case's bytes (half read, half written) is timed with the variants' timer;
    run_case measures it on a CUDA device only."""
    timed, sizes = [], []
    monkeypatch.setattr(core, "time_ms", lambda fn, timing=None: timed.append(fn) or 0.5)
    monkeypatch.setattr(torch, "ones", lambda n, **kw: sizes.append((n, kw["device"])) or torch.zeros(n))
    assert core.same_bytes_copy_ms(8000.0) == 0.5 and sizes == [(1000, "cuda")] and len(timed) == 1
    monkeypatch.setattr(core, "same_bytes_copy_ms", lambda work, timing: work)
    monkeypatch.setattr(core, "run_variant", lambda case, name, timing, ceiling: core.Result(name, "x", "skipped"))
    case = adaln.cases()[0]
    monkeypatch.setattr(case, "prepare", lambda device: None)
    for device, copy_ms in (("cuda", case.work), ("cpu", None)):
        rec = core.run_case(case, torch.device(device), core.QUICK_TIMING, core.Ceilings(4000.0, 700.0))
        assert rec.copy_ms == copy_ms and rec.to_dict()["copy_ms"] == copy_ms, device


# --------------------------------------------------------------------------- rope


def test_rope_cases():
    cases = rope.cases()
    assert [(c.params["workload"], c.params["mode"]) for c in cases] == [
        ("FLUX", "fwd"),
        ("DiT-XL", "fwd"),
        ("FLUX", "fwd+bwd"),
        ("DiT-XL", "fwd+bwd"),
    ]
    assert [c.label for c in rope.cases(quick=True)] == [c.label for c in cases[:2]]
    assert [c.shape for c in cases[:2]] == [(1, 24, 4608, 128), (2, 16, 4096, 72)]
    q = math.prod((1, 24, 4608, 128)) * 2
    assert cases[0].work == 4 * q + 2 * 4608 * 64 * 4 == rope.work_bytes("fwd", cases[0].shape)
    assert cases[2].work == 8 * q + 2 * 2 * 4608 * 64 * 4
    assert rope.summarize([]).goals == []  # reported: no goal in the issue


def test_rope_formula_is_the_ops():
    q, k, dqo, dko = rope._inputs((2, 3, 7, 8), torch.float64, CPU, seed=2)
    cos, sin = rope.tables(7, 8, CPU)
    full = rope.full_tables(cos, sin, torch.float64)
    for got, want in zip(rope.eager_rope(q, k, *full), rope_reference(q, k, cos, sin)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", rope.MODES)
def test_rope_case_end_to_end_on_cpu(mode):
    case = rope.RopeCase("small", (1, 2, 9, 16), mode, dtype=torch.float32)
    case.prepare(CPU)
    try:
        for name in (core.EAGER, "reference"):
            check = core.compare(case.variant(name).fn(), case.expected())
            assert check.ok, (name, check.detail)
        s = case._state
        cos, sin = s["tables"]
        swapped = rope._forward_backward(_ref, s["q"], s["k"], sin, cos, None)  # cos and sin swapped
        if mode == "fwd":
            assert not core.compare(swapped, case.expected()).ok
        cuda = case.variant("cuda")
        assert cuda.fn is None and cuda.skip
    finally:
        case.release()


def _ref(q, k, cos, sin):
    return rope_reference(q, k, cos, sin)


# --------------------------------------------------------------------------- dit


def test_dit_cases_and_flops():
    cases = dit.cases()
    assert [c.params["tokens"] for c in cases] == [4096, 256] and len(dit.cases(quick=True)) == 1
    case = cases[0]
    assert case.variant_names() == list(_model.COMPILE_LAST)  # torch.compile last (tests/bench/test_bench.py)
    assert case.params["dim"] == 1152 and case.params["heads"] == 16 and case.params["batch"] == 2
    # Linear layers (qkv, proj, fc1, fc2; the (B, D) modulation is negligible) and attention's two matmuls.
    rows, d = 2 * 4096, 1152
    linear = 2 * rows * d * (3 * d + d + 2 * 4 * d)
    attention = 4 * 2 * 16 * 4096 * 4096 * 72
    assert case.work == pytest.approx(linear + attention, rel=1e-3)


def test_dit_bytes_outside_matmuls():
    """The counted traffic at L = 4096 in units of one (2, 4096, 1152) bf16 tensor T: the PyTorch layers 48 T
    (LayerNorm + modulation 6 twice, rotate-half RoPE 9 for q and 9 for k, gated residuals 5 twice, GELU on the
    4x wide hidden 8) plus the casts and statistics; the genkernels ops 13 T (norm 2, RoPE 4, residual + norm 4,
    gated residual 3; the GELU runs in fc1's epilogue) plus the (B, D) modulations, the RoPE tables and the
    statistics."""
    t = 2 * 4096 * 1152 * 2
    counted = dit.cases()[0].params["bytes_outside_matmuls"]
    assert 48 * t < counted[core.EAGER] < 48.5 * t
    assert 13 * t < counted[_model.GENKERNELS] < 13.1 * t
    assert counted == dit.traffic_bytes("dit_xl_2", 2, 64, torch.bfloat16)


def test_dit_floors():
    """floor = FLOPs at the matmul rate + the variant's bytes at the copy rate; the CUDA graph has genkernels'
    bytes, torch.compile none counted; the eager / genkernels floor ratio is in the notes; n/a without rates."""
    ms = {core.EAGER: 1.2, core.COMPILE: 0.9, _model.GENKERNELS: 0.95, _model.GRAPH: 0.9}
    records = [model_record(c, ms) for c in dit.cases()]
    no_rates = dit.summarize(records)
    assert no_rates.rows[0][3:6] == ["912", "n/a", "n/a"] and "n/a (no rates measured)" in no_rates.notes[-1]
    for rec in records:
        rec.floor_ms, rec.copy_gbs = rec.work / 759e12 * 1e3, 3002.0
    summary = dit.summarize(records)
    rows = {(r[0], r[1]): r for r in summary.rows}
    counted = records[0].params["bytes_outside_matmuls"]
    floors = {n: records[0].floor_ms + counted[n] / 3002e9 * 1e3 for n in (core.EAGER, _model.GENKERNELS)}
    assert dit.floors_ms(records[0])[_model.GRAPH] == floors[_model.GENKERNELS]
    assert rows["4096", core.EAGER][4:6] == [f"{floors[core.EAGER]:.3f}", f"{100 * floors[core.EAGER] / 1.2:.0f}%"]
    assert rows["4096", _model.GRAPH][3:6] == ["247", f"{floors[_model.GENKERNELS]:.3f}", "70%"]
    assert rows["4096", core.COMPILE][3:6] == ["n/a"] * 3
    ratio = floors[core.EAGER] / floors[_model.GENKERNELS]
    assert 1.3 < ratio < 1.4 and f"L = 4096: {ratio:.2f}x" in summary.notes[-1]


def test_dit_count_failure_is_reported(monkeypatch):
    """A count that raises leaves the case without floors (n/a) and says why in its params."""
    from genkernels.bench import traffic

    def broken(fn, genkernels_ops=False):
        raise RuntimeError("no meta kernel")

    monkeypatch.setattr(traffic, "count", broken)
    monkeypatch.setattr(dit, "_TRAFFIC", {})
    case = dit.DiTBlockCase(size=16)
    assert case.params["bytes_outside_matmuls"] == {"error": "RuntimeError: no meta kernel"}
    rec = model_record(case, {core.EAGER: 1.0, _model.GENKERNELS: 0.5})
    rec.floor_ms, rec.copy_gbs = 0.1, 3000.0
    assert dit.floors_ms(rec) == {} and dit.summarize([rec]).rows[-4][3:6] == ["n/a"] * 3


def test_dit_case_on_cpu():
    """The tiny block in bf16: shared weights, the modulation re-drawn (gates not zero), eager and genkernels
    within the criterion, the CUDA graph says why it cannot run."""
    case = dit.DiTBlockCase("tiny", batch=2, size=4, backend="reference")
    case.prepare(CPU)
    try:
        model, twin = case._state["model"], case._state["model_torch"]
        assert twin.block.attn.qkv.weight is model.block.attn.qkv.weight and twin.block.torch_layers
        assert model.block.modulation.weight.abs().max() > 0
        x = case._state["inputs"][0]
        (exp,) = case.expected()
        assert (exp.truth - x.float()).abs().max() > 0.1  # not the identity
        for name in (core.EAGER, _model.GENKERNELS):
            assert core.compare(case.variant(name).fn(), case.expected()).ok, name
        for name in (_model.GRAPH, _model.EAGER_GRAPH, _model.COMPILE_GRAPH):
            assert case.variant(name).fn is None and "CUDA graphs need a CUDA device" in case.variant(name).skip
    finally:
        case.release()


@pytest.mark.parametrize(
    ("ms", "passed"),
    [
        ({core.EAGER: 1.0, core.COMPILE: 0.8, _model.GENKERNELS: 0.9, _model.GRAPH: 0.7}, True),
        ({core.EAGER: 1.0, core.COMPILE: 0.8, _model.GENKERNELS: 0.9, _model.GRAPH: 0.8}, False),
        ({core.EAGER: 1.0, core.COMPILE: 0.8}, None),
        # L = 256's shape of run 4: the graph 11x plain eager, but eager's own graph is 4x faster than its plain call.
        ({core.EAGER: 1.08, _model.EAGER_GRAPH: 0.27, _model.GENKERNELS: 1.14, _model.GRAPH: 0.097}, True),
        ({core.EAGER: 1.08, _model.EAGER_GRAPH: 0.12, _model.GENKERNELS: 1.14, _model.GRAPH: 0.097}, False),
    ],
)
def test_dit_goals(ms, passed):
    """genkernels' faster variant against eager's faster (plain or + CUDA graph), >= 1.3x, on each case."""
    records = [model_record(c, ms) for c in dit.cases()]
    summary = dit.summarize(records)
    assert [g.passed for g in summary.goals] == [passed, passed]
    assert [g.name for g in summary.goals] == [f"DiT block L={n}, genkernels vs eager" for n in (4096, 256)]
    assert summary.goals[0].target.startswith(">= 1.3x")
    assert len(summary.rows) == 2 * len(_model.VARIANTS) and summary.rows[0][:2] == ["4096", core.EAGER]
    if _model.EAGER_GRAPH in ms:
        assert f"(genkernels + CUDA graph vs {_model.EAGER_GRAPH})" in summary.goals[0].measured
    assert [g.passed for g in dit.summarize(records[:1]).goals] == [passed, None]


# --------------------------------------------------------------------------- imagegpt


def test_imagegpt_case_and_flops():
    (case,) = imagegpt.cases()
    assert case.variant_names() == [
        core.EAGER,
        imagegpt.EAGER_GRAPH,
        imagegpt.GENKERNELS,
        imagegpt.GK_GRAPH,
        imagegpt.NO_CACHE,
    ]
    assert case.tokens_per_call == 64 * 256 and case.params["model"]["dim"] == 512 and case.unit == "TFLOP/s"
    # Per token and layer: qkv, out (4 d^2), SwiGLU (3 d h); the head; attention 4 d (t + 1) summed over t.
    d, h, length, depth = 512, 1368, 256, 8
    assert imagegpt.CONFIGS["bench"]["depth"] == depth
    macs = depth * (4 * d * d + 3 * d * h) + d * 16
    want = 64 * (2 * macs * length + depth * 4 * d * length * (length + 1) / 2)
    assert case.work == pytest.approx(want, rel=0.02)


def test_imagegpt_case_on_cpu(monkeypatch):
    """core.run_case on the tiny model, the timer stubbed: every variant's logits checked, its tokens reproduced
    (the CUDA-graph variants skipped without a GPU); tokens/s in the summary; a model with a broken weight
    fails its check and is not timed."""
    monkeypatch.setattr(core, "time_ms", lambda fn, timing=None: 10.0)
    case = imagegpt.SamplingCase("tiny", batch=3, dtype=torch.float32, backend="reference", check_batch=2)
    rec = core.run_case(case, CPU, core.QUICK_TIMING, core.Ceilings(1.0, 1.0))
    want = {v: "skipped" if v in imagegpt.GRAPHED else "ok" for v in imagegpt.VARIANTS}
    assert {r.variant: r.status for r in rec.results} == want, rec.results
    assert rec.result(imagegpt.GK_GRAPH).reason == "CUDA graphs need a CUDA device"
    assert rec.params["sequences_equal_to_eager"] == {imagegpt.GENKERNELS: 1.0, imagegpt.NO_CACHE: 1.0}
    assert rec.params["sequences_equal_without_graph"] == {}
    summary = imagegpt.summarize([rec])
    rows = {r[0]: r for r in summary.rows}
    assert rows[imagegpt.GENKERNELS][1:6] == ["10.0", f"{3 * 9 / 10e-3:,.0f}", "1.00x", "100%", "-"]
    assert rows[imagegpt.GK_GRAPH][1] == "skipped" and rows[imagegpt.GK_GRAPH][5] == "n/a"
    assert summary.goals[0].passed is False  # 1.0x < 2x

    case.prepare(CPU)
    try:
        with torch.no_grad():
            case._state["model"].head.weight.mul_(1.5)  # after the truth was taken
        with pytest.raises(RuntimeError, match="wrong numbers: teacher-forced KV-cache decode logits"):
            case.variant(imagegpt.GENKERNELS)
    finally:
        case.release()


def test_imagegpt_baseline_timed_when_its_calls_differ(monkeypatch):
    """A sampler whose second call draws other tokens than its first at the same seed: the eager baseline is
    timed anyway (as users run it), its check column saying so; a genkernels variant doing the same fails."""
    monkeypatch.setattr(core, "time_ms", lambda fn, timing=None: 10.0)
    draw = imagegpt.sample
    calls = {}

    def drifting(model, n, use_cache, seed=imagegpt.SEED, cuda_graph=False):
        calls[id(model)] = calls.get(id(model), 0) + 1
        tokens = draw(model, n, use_cache, seed=seed, cuda_graph=cuda_graph)
        return tokens if calls[id(model)] == 1 else (tokens + 1) % model.config.levels

    monkeypatch.setattr(imagegpt, "sample", drifting)
    case = imagegpt.SamplingCase("tiny", batch=3, dtype=torch.float32, backend="reference", check_batch=2)
    rec = core.run_case(case, CPU, core.QUICK_TIMING, core.Ceilings(1.0, 1.0))
    eager, gk = rec.result(core.EAGER), rec.result(imagegpt.GENKERNELS)
    assert eager.status == "ok" and eager.ms == 10.0 and "timed anyway (a baseline)" in eager.reason
    assert gk.status == "failed" and "wrong numbers: tokens" in gk.reason


@pytest.mark.parametrize(
    ("gk_ms", "graph_ms", "eager_graph_ms", "passed", "on"),
    [
        (400.0, None, None, True, f"{imagegpt.GENKERNELS} vs eager"),
        (600.0, None, None, False, f"{imagegpt.GENKERNELS} vs eager"),
        # the goal is on the faster cached genkernels variant ...
        (900.0, 250.0, None, True, f"{imagegpt.GK_GRAPH} vs eager"),
        # ... against the faster eager one: eager's graph at 400 ms leaves 1.6x
        (900.0, 250.0, 400.0, False, f"{imagegpt.GK_GRAPH} vs {imagegpt.EAGER_GRAPH}"),
        (None, None, None, None, None),
    ],
)
def test_imagegpt_goal(gk_ms, graph_ms, eager_graph_ms, passed, on):
    (case,) = imagegpt.cases()
    rec = core.record_of(case)
    rec.results = [core.Result(core.EAGER, "baseline", "ok", ms=1000.0)]
    for name, ms in (
        (imagegpt.GENKERNELS, gk_ms),
        (imagegpt.GK_GRAPH, graph_ms),
        (imagegpt.EAGER_GRAPH, eager_graph_ms),
    ):
        if ms is not None:
            role = "baseline" if name == imagegpt.EAGER_GRAPH else "genkernels"
            rec.results.append(core.Result(name, role, "ok", ms=ms))
    core.add_speedups(rec)
    (goal,) = imagegpt.summarize([rec]).goals
    assert goal.passed is passed and goal.target == ">= 2x"
    if on is not None:
        assert goal.measured.endswith(f"({on})")
    else:
        assert goal.measured == "unmeasured (no genkernels variant ran)"
    assert imagegpt.summarize([]).goals[0].passed is None


# --------------------------------------------------------------------------- self-checks and the command


@pytest.mark.parametrize("module", [adaln, rope, dit, imagegpt])
def test_self_check_reference_and_cuda(module):
    check = module.self_check("reference")
    assert check.status == "ok", check.detail
    skipped = module.self_check("cuda")
    assert skipped.status == "skipped" and "cuda" in skipped.detail.lower()


@pytest.mark.skipif(not INTERPRETED, reason="triton runs on CPU only under its interpreter")
@pytest.mark.parametrize("module", [adaln, rope, dit, imagegpt])
def test_self_check_triton_interpreted(module):
    pytest.importorskip("triton")
    check = module.self_check("triton")
    assert check.status == "ok", check.detail
    if module in (adaln, rope):
        assert "fp32, fp16" in check.detail and "bf16" not in check.detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without a GPU")
def test_main_without_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["--out", str(tmp_path), "--ops", "adaln,rope,dit,imagegpt", "--no-interpret"]) == 0
    assert "No CUDA GPU is present" in capsys.readouterr().out
    data = json.loads((tmp_path / "selfcheck.json").read_text())
    checks = {(c["op"], c["backend"]): c["status"] for c in data["checks"]}
    for op in ("adaln", "rope", "dit", "imagegpt"):
        assert checks[op, "reference"] == "ok" and checks[op, "cuda"] == "skipped"


def test_reports(tmp_path):
    records = [timed_record(c, FAST) for c in adaln.cases()] + [timed_record(c, FAST) for c in rope.cases()]
    meta = {"device": "test", "torch": torch.__version__}
    summaries = [adaln.summarize(records), rope.summarize(records)]
    report.write(tmp_path, meta, core.Ceilings(4000.0, 700.0), records, summaries, with_chart=False)
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert [c["op"] for c in data["cases"]] == ["adaln"] * 8 + ["rope"] * 4
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert all(t in text for t in ("10 row tensors", "RoPE of q and k, forward + backward", "PASS"))
