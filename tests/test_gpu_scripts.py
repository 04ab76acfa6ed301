"""The GPU diagnostics in scripts/ (gpu_profile.py, gpu_host_probe.py, gpu_bandwidth_probe.py,
gpu_attention_sweep.py, gpu_check.sh): without a GPU each says so and exits 0; their CPU paths run (the host
probe's float32 error breakdown, the dry runs) and their tables say what they measured."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import genkernels

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """The module scripts/<name>.py, imported as the GPU machine runs it (scripts/ on the path for its imports)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _skip_without_the_interpreter() -> None:
    """Skip a dry run here unless the triton backend takes CPU tensors: a script's dry run calls its triton kernels
    on the CPU, which the interpreter does (the suite sets it without a GPU, and a script with --dry-run as its
    own process); on a GPU machine the suite runs the compiled kernels, which need CUDA tensors."""
    from genkernels.triton._common import triton_unavailable

    reason = triton_unavailable(torch.empty(0))
    if reason is not None:
        pytest.skip(f"the dry run calls triton on CPU tensors: {reason}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
@pytest.mark.parametrize("script", ["gpu_profile.py", "gpu_host_probe.py", "gpu_bandwidth_probe.py"])
def test_script_without_a_gpu(script, tmp_path):
    out = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU" in out.read_text()


def test_bandwidth_probe(capsys, monkeypatch):
    """scripts/gpu_bandwidth_probe.py: its dry run calls every variant on every input set (the triton ones under
    the interpreter, bias_act's forward on each tile), and its table turns times into % of the copy rate and
    ratios to torch.compile."""
    _skip_without_the_interpreter()
    probe = _script("gpu_bandwidth_probe")
    monkeypatch.setattr(probe, "OUT", sys.stdout)
    assert probe.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    tiles = [f"triton {b}/{w}w" for b, w in probe.BIAS_ACT_TILES]
    for name in ["copy_", "triton copy", "torch.compile", "triton (default)", *tiles]:
        assert f"bias_act lrelu (32, 512, 64, 64): {name}: 2 input sets called" in out
    assert out.count("layer_norm_modulate") == 10  # copy_, triton copy, eager, torch.compile, reference; 2 shapes
    x = torch.randn(3, 1000)
    assert torch.equal(probe.triton_copy(x), x)
    # 10 MB a call at 1,000 GB/s: a 0.01 ms floor.
    variants = {"copy_": (10e6, [None] * 3), "torch.compile": (10e6, [None] * 3)}
    times = {
        "cold": {"copy_": [0.02, 0.0125, 0.03], "torch.compile": [0.02] * 3},
        "batch": {"copy_": [0.01] * 3, "torch.compile": [0.0125] * 3},
    }
    probe.report("t", variants, times, 1000.0)
    out = capsys.readouterr().out
    assert "input sets: 3; rounds: 3" in out
    assert "| variant | MB a call | cold ms | cold % copy BW | cold vs compile | batch ms |" in out
    assert "| copy_ | 10.0 | 0.0200 | 50% | 1.000x | 0.0100 | 100% | 1.250x |" in out
    assert "| torch.compile | 10.0 | 0.0200 | 50% | 1.000x | 0.0125 | 80% | 1.000x |" in out
    assert "cold ms per round: copy_ 0.0200 0.0125 0.0300;" in out


def test_float32_error_breakdown_runs(capsys, monkeypatch):
    gpu_host_probe = _script("gpu_host_probe")
    monkeypatch.setattr(gpu_host_probe, "OUT", sys.stdout)
    gpu_host_probe.dit_float32_sources(torch.device("cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("## tiny DiT float32") for line in lines)
    rows = [line for line in lines if line.startswith("  ")]
    assert len(rows) == 6 and all(re.match(r"\s+\d", row) for row in rows), rows


def test_sampling_loops_run(capsys, monkeypatch):
    gpu_host_probe = _script("gpu_host_probe")
    from genkernels.models import DiTConfig

    monkeypatch.setattr(gpu_host_probe, "OUT", sys.stdout)
    times = gpu_host_probe.sampling_loops(torch.device("cpu"), DiTConfig.tiny(num_classes=3), steps=2, modes=("plain",))
    assert set(times) == {"genkernels, plain", "PyTorch layers, plain"} and all(v > 0 for v in times.values())
    assert "## sampling loop: DiT dim 32 depth 2, 8x8x1, " in capsys.readouterr().out


def test_profile_dit_cases_build(monkeypatch):
    """The DiT block and head-dim-72 attention cases of scripts/gpu_profile.py build their models and inputs (on the
    CPU here: the calls themselves are GPU-sized and run on a GPU only), one per variant the profile compares."""
    gpu_profile = _script("gpu_profile")
    cases = dict(gpu_profile._dit_cases(torch.device("cpu")))
    assert list(cases) == [
        "DiT-XL/2 block L=4096 genkernels",
        "DiT-XL/2 block L=4096 genkernels, adaLN on triton",
        "DiT-XL/2 block L=4096 PyTorch layers",
        "attention d72 L=4096 cuda",
        "attention d72 L=4096 triton",
        "attention d72 L=4096 triton, d128's 128 x 64 tiles",
        "attention d72 L=4096 SDPA flash",
        "attention d72 L=4096 SDPA cuDNN",
        "attention d72 L=4096 SDPA mem-efficient",
    ]
    assert all(callable(fn) for fn in cases.values())
    # The d128-tile variant runs the forward on those tiles and then restores the choice (on the interpreter here,
    # whose own tiles ignore the choice: what is checked is the swap).
    import genkernels.triton.attention as tri

    chosen, seen = tri._config_block, []
    record = lambda *a, **k: seen.append(tri._config_block(72, 90, "fwd", False))  # noqa: E731
    monkeypatch.setattr(gpu_profile.ops, "attention", record)
    cases["attention d72 L=4096 triton, d128's 128 x 64 tiles"]()
    assert seen == [128] and tri._config_block is chosen and chosen(72, 90, "fwd", False) == 64
    assert chosen(72, 90, "fwd", True) == chosen(72, 80, "fwd", False) == chosen(72, 90, "dq", False) == 128
    assert chosen(72, 90, "decode", False) == 128
    # The adaLN-on-triton variant asks for triton for the three adaLN ops alone, inside its call only.
    from genkernels import _registry
    from genkernels.ops.adaln import OPS

    def asked():
        return [_registry.requested(None, op) for op in (*OPS, "attention")]

    before, seen = asked(), []
    gpu_profile._adaln_on("triton", lambda: seen.append(asked()))()
    assert seen == [["triton"] * 3 + before[-1:]] and asked() == before


def test_profile_imagegpt_cases_run(monkeypatch):
    """The ImageGPT decoding-step cases of scripts/gpu_profile.py, on the benchmark's tiny config on the CPU (the
    CUDA-graph ones need a GPU): each runs its step again and again (the caches rewound to step t), and the two
    models write the same keys and values there from the same cache and token."""
    from genkernels.bench import imagegpt

    gpu_profile = _script("gpu_profile")
    monkeypatch.setitem(imagegpt.CONFIGS, "bench", imagegpt.CONFIGS["tiny"])
    monkeypatch.setattr(imagegpt, "BATCH", 2)
    cases = dict(gpu_profile._imagegpt_cases(torch.device("cpu")))
    assert list(cases) == [f"ImageGPT decode step t=4 batch 2 {label}" for label in ("genkernels", "PyTorch layers")]
    decoders = [fn.__defaults__[1] for fn in cases.values()]
    for d in decoders:  # the same inputs to both: cached positions 0 .. 3 and a token 3 of every level's range
        g = torch.Generator().manual_seed(0)
        for cache in d.caches:
            cache.qkv.copy_(torch.randn(cache.qkv.shape, generator=g))
        d.tokens[:, 3] = torch.tensor([3, 11])
    with genkernels.backend("reference"):  # the models run in bf16, which the triton interpreter mishandles
        for fn in cases.values():
            for _ in range(3):
                fn()
    assert all(c.length == 5 for d in decoders for c in d.caches)
    # Step 4 ran on both models: the same rotated keys and values written at position 4 of every layer.
    for ours, twin in zip(*(d.caches for d in decoders)):
        assert ours.k[:, :, 4].abs().amax() > 0
        torch.testing.assert_close(ours.k[:, :, 4].float(), twin.k[:, :, 4].float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(ours.v[:, :, 4].float(), twin.v[:, :, 4].float(), rtol=2e-2, atol=2e-2)


def test_attention_sweep_dry_run(capsys, monkeypatch):
    """scripts/gpu_attention_sweep.py on the CPU under the interpreter: the forward runs on each tile it is given
    (and on its own choice again after), a tile that cannot launch is listed with its error, and the table
    lists every row."""
    _skip_without_the_interpreter()
    sweep = _script("gpu_attention_sweep")
    import genkernels.triton.attention as tri
    from genkernels import ops

    seen, chosen, attention = [], tri._config, ops.attention

    def spy(q, *args, **kwargs):
        seen.append(tri._config(q, "fwd"))
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(ops, "attention", spy)
    time_ms = lambda fn: fn() is not None and 1.0  # noqa: E731  # one more call, as do_bench makes many
    rows = sweep.sweep((1, 2, 20, 72), torch.device("cpu"), [(16, 32, 4, 1), (24, 16, 4, 1)], float("inf"), time_ms)
    assert [r[0] for r in rows] == ["triton, current choice", "(16, 32, 4, 1)", "(24, 16, 4, 1)"]
    assert seen == [tri._INTERPRETER_CONFIGS["fwd"]] * 2 + [(16, 32, 4, 1)] * 2 + [(24, 16, 4, 1)]
    assert rows[1][1] == 1.0 and rows[2][1] is None and "Error" in rows[2][2]  # 24 rows: no power of two
    assert tri._config is chosen
    monkeypatch.undo()
    assert sweep.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "## tiny d72" in out and out.count("| err ") == 3


@pytest.mark.parametrize("kernel", ["dkdv", "dq"])
def test_attention_sweep_backward_dry_run(capsys, monkeypatch, kernel):
    """scripts/gpu_attention_sweep.py --kernel dkdv / dq: the backward runs with that kernel on each tile and the
    other backward kernel on its own choice, its gradients are checked against SDPA's (a wrong one is listed
    as WRONG, not timed), and the table counts the backward's FLOPs."""
    _skip_without_the_interpreter()
    sweep = _script("gpu_attention_sweep")
    import genkernels.triton.attention as tri

    other = {"dkdv": "dq", "dq": "dkdv"}[kernel]
    seen, chosen, backward = [], tri._config, tri.attention_backward

    def spy(dout, q, *args):
        seen.append((tri._config(q, kernel), tri._config(q, other)))
        return backward(dout, q, *args)

    monkeypatch.setattr(tri, "attention_backward", spy)
    time_ms = lambda fn: fn() is not None and 1.0  # noqa: E731
    rows = sweep.sweep((1, 2, 20, 72), torch.device("cpu"), [(16, 32, 4, 1)], float("inf"), time_ms, kernel)
    assert [r[0] for r in rows] == ["triton, current choice", "(16, 32, 4, 1)"]
    assert all(r[1] == 1.0 and r[2].startswith("err ") for r in rows)
    own = tri._INTERPRETER_CONFIGS
    assert seen == [(own[kernel], own[other])] * 2 + [((16, 32, 4, 1), own[other])] * 2
    assert tri._config is chosen

    def wrong(dout, q, *args):  # a backward whose dq is off: reported, not timed
        dq, dk, dv = backward(dout, q, *args)
        return 2 * dq, dk, dv

    monkeypatch.setattr(tri, "attention_backward", wrong)
    rows = sweep.sweep((1, 2, 20, 72), torch.device("cpu"), [], float("inf"), time_ms, kernel)
    assert rows[0][1] is None and rows[0][2].startswith("WRONG")
    table = sweep._table("DiT", (2, 16, 4096, 72), [("x", 2.0, "")], kernel)
    assert f"backward, {kernel} tiles swept" in table[0]
    assert table[4] == "| x | 2.0000 | 193 |  |"  # 2.5 x the forward's 4 B H L^2 D FLOPs in 2 ms
    monkeypatch.undo()
    assert sweep.main(["--dry-run", "--kernel", kernel]) == 0
    assert capsys.readouterr().out.count("| err ") == 3


@pytest.mark.parametrize(
    ("deadline", "elapsed", "asked", "bench_min", "want"),
    [
        (400, 141, 140, 120, 60),  # run 5's first call: 259 s left, less the 105 s reserve and 120 s: 34 -> 60
        (450, 130, 150, 120, 95),  # 320 - 105 - 120
        (600, 130, 150, 120, 150),  # room for what was asked
        (400, 141, 140, 0, 140),  # GPU_CHECK_BENCH_MIN_S=0: the tests first
        (400, 141, 30, 120, 30),  # never more than what was asked
    ],
)
def test_gpu_check_leaves_the_benchmarks_their_time(tmp_path, deadline, elapsed, asked, bench_min, want):
    """scripts/gpu_check.sh's GPU test step stops early enough to leave the benchmarks GPU_CHECK_BENCH_MIN_S of
    the deadline (a test step that left them 30 s once cost a run its benchmarks), and says so when it cuts."""
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "GPU_CHECK_DEADLINE_S": str(deadline),
        "GPU_CHECK_TEST_LIMIT_S": str(asked),
        "GPU_CHECK_BENCH_MIN_S": str(bench_min),
    }
    script = f'source "{ROOT}/scripts/gpu_check.sh"; SECONDS={elapsed}; gpu_test_limit'
    got = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == str(want)
    assert ("the GPU tests get" in got.stderr) == (want < asked)


def test_host_probe_breakdown_runs_as_a_script(tmp_path):
    """`python scripts/gpu_host_probe.py` puts scripts/ on sys.path, not the checkout: the float32 breakdown's
    helpers from the tests package must import there too (the probe once stopped at it on the GPU, losing the
    sampling loop and the profiles after it). Run with genkernels importable and the checkout not on the path."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "genkernels").symlink_to(ROOT / "genkernels")
    code = (
        f"import sys; sys.path[0] = {str(ROOT / 'scripts')!r}; import torch, gpu_host_probe as p; "
        "p.dit_float32_sources(torch.device('cpu'))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "## tiny DiT float32" in done.stdout


def test_bandwidth_probe_compiles_each_shape_static(monkeypatch):
    """scripts/gpu_bandwidth_probe.py compiles its torch.compile baselines with dynamic=False, as the suite does:
    the two layer_norm_modulate groups share one formula's code object, and dynamo's automatic dynamic shapes
    recompiled it for FLUX's shape with symbolic sizes, a different kernel from the suite's baseline."""
    probe = _script("gpu_bandwidth_probe")
    calls = []
    monkeypatch.setattr(probe.torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    fn = lambda x: x  # noqa: E731
    assert probe.compiled_fn(fn, torch.device("cuda")) is fn and calls == [{"dynamic": False}]
    assert probe.compiled_fn(fn, torch.device("cpu")) is fn and len(calls) == 1  # a dry run compiles nothing
    seen = []
    monkeypatch.setattr(probe, "compiled_fn", lambda f, device: seen.append(device) or f)
    probe.layer_norm_cases((2, 8, 16), torch.device("cpu"), True)
    probe.bias_act_cases((2, 4, 4, 4), torch.device("cpu"), True)
    assert len(seen) == 2


@pytest.mark.parametrize("rounds", ["0", "-1", "two"])
def test_bandwidth_probe_refuses_rounds_below_one(rounds, capsys):
    """--rounds 0 ran every timing's setup and then failed at the first table (the median of no rounds): it is
    refused by the parser, dry run included."""
    probe = _script("gpu_bandwidth_probe")
    with pytest.raises(SystemExit):
        probe.main(["--dry-run", "--rounds", rounds])
    assert "--rounds: expected an integer >= 1" in capsys.readouterr().err


def test_attention_sweep_writes_each_shape_as_it_finishes(tmp_path, monkeypatch, capsys):
    """scripts/gpu_attention_sweep.py writes OUT_FILE after every shape, so a run stopped by its time limit keeps
    the shapes it finished (it wrote the file once, after the last shape); an unknown --shapes name is refused
    before any work."""
    sweep = _script("gpu_attention_sweep")
    out = tmp_path / "sweep.md"

    def fake_sweep(shape, device, grid, deadline, time_ms, kernel="fwd"):
        if shape == sweep.SHAPES["SDXL d64"]:
            raise KeyboardInterrupt  # the run's time limit, mid-shape
        return [("triton, current choice", 1.0, "err 1e-3")]

    monkeypatch.setattr(sweep.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sweep.torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(sweep, "sweep", fake_sweep)
    with pytest.raises(KeyboardInterrupt):
        sweep.main([str(out), "--shapes", "DiT-XL d72,SDXL d64"])
    text = out.read_text()
    assert "## DiT-XL d72" in text and "| triton, current choice | 1.0000 |" in text and "SDXL" not in text
    with pytest.raises(SystemExit):
        sweep.main(["--dry-run", "--shapes", "DiT-XL d72,DiT d72"])
    assert "unknown shape(s) ['DiT d72']" in capsys.readouterr().err
