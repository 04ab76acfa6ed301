"""The Triton group_norm, attention, sampler step, reparameterize, flow (affine coupling, ActNorm), modulated
convolution (demodulation, epilogue) and bias_act kernels compile for real GPUs (sm_90, sm_80), checked on a
machine without one.

Why this exists: without a GPU the suite runs the Triton kernels under ``TRITON_INTERPRET=1``, and the
interpreter accepts code the compiler rejects (a loop-variable type error got through that way once);
it also says nothing about registers, spills or load widths. Triton's compiler
needs no GPU, so this compiles the launches that real ``group_norm`` calls make, for the test suite's
shapes and for the benchmark's, those of ``attention`` calls (head dims 40 to 256 in bf16 and fp16,
causal or not, with or without a key padding mask, and one fp32 call), and those of the fused sampler
step and of reparameterize (forward and backward) for the benchmark's cases and a small set covering
their other paths (each noise source, the flags, channels_last moments, odd sizes), and those of the
flow ops, affine coupling and ActNorm (forward, inverse, backward), for the benchmark's cases and a small
set covering theirs (each scale mode, channels_last, odd C, S = 1, absent gradients), and checks the
result: everything compiles, no kernel spills registers (beyond the known cases below), shared memory
fits, and the benchmark's bf16 loads are vectorized.

The work runs in subprocesses (``tests/triton/_compile_kernels.py``, which explains how launches are
chosen and compiled) because triton reads ``TRITON_INTERPRET`` when it decorates a kernel and the
conftest has set it in this process. A triton that cannot be driven that way makes the tests skip.
Run with ``-s`` to see the registers / spills table. By default about 380 chosen launches compile (230 of
group_norm, under a minute on 2 cores; 45 of attention, about 40 s more: each attention kernel takes
seconds of ptxas; 60 of the sampler step and reparameterize, about 15 s more; 50 of the flow ops, about
20 s more); ``GENKERNELS_COMPILE_EVERY=1`` compiles all ~2,700 distinct specializations instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 3600  # GENKERNELS_COMPILE_EVERY=1 takes about 7 minutes on 2 cores

# Kernel configurations that spill today, with triton 3.9 (whose ptxas for sm_90 is CUDA 13.4's, run
# with --regAllocOptLevel=2; sm_80's is CUDA 12.9's) or triton 3.6 (the GPU machines', marked). They
# warn instead of failing until the kernels or _num_warps change; empty the list then. Most are
# num_warps=16 tiles at the 128-register cap of 512 threads, from the GPU tests' odd shapes
# (1, 32, 257, 255) G=2 (no vector loads), (1, 320, 35, 35) G=32 and (2, 36, 17, 19) G=6 channels last;
# the 8-byte ones at 64-80 registers look like ptxas artifacts (triton 3.9 only: fp32, and sm_80's forced
# split path). sm_80's beyond the benchmark's are compiled with GENKERNELS_COMPILE_EVERY=1 only.
SPILL_KEYS = ("CHANNELS_LAST", "SPAN", "BLOCK_S", "BLOCK_C", "BLOCK_G", "num_warps")
KNOWN_SPILLS = [  # (arch, kernel, *SPILL_KEYS)
    (90, "_bwd_dx_kernel", False, 16, 512, 16, 1, 16),
    (90, "_bwd_dx_kernel", False, 60, 128, 64, 8, 16),
    (90, "_bwd_partial_sums_kernel", False, 16, 256, 16, 1, 8),
    (90, "_bwd_partial_sums_kernel", False, 16, 512, 16, 1, 16),
    (90, "_bwd_partial_sums_kernel", False, 60, 64, 64, 8, 8),
    (90, "_bwd_partial_sums_kernel", False, 60, 128, 64, 8, 16),
    (90, "_fwd_apply_kernel", False, 32, 256, 32, 2, 16),
    (90, "_fwd_partial_stats_kernel", False, 32, 256, 32, 2, 16),  # triton 3.6
    (90, "_fwd_single_pass_kernel", True, 24, 512, 32, 4, 16),
    (80, "_bwd_dx_kernel", False, 16, 512, 16, 1, 16),
    (80, "_bwd_dx_kernel", False, 60, 128, 64, 8, 16),
    (80, "_bwd_partial_sums_kernel", False, 16, 512, 16, 1, 16),
    (80, "_bwd_partial_sums_kernel", False, 60, 128, 64, 8, 16),
    (80, "_fwd_apply_kernel", False, 4, 1024, 4, 1, 8),
    (80, "_fwd_apply_kernel", False, 32, 256, 32, 2, 16),
    (80, "_fwd_partial_stats_kernel", True, 32, 256, 32, 2, 16),
    (80, "_fwd_single_pass_kernel", True, 24, 512, 32, 4, 16),
]


def _run_shards(tmp_path: Path) -> dict:
    pytest.importorskip("triton", reason="triton is not installed")
    shards = max(1, min(os.cpu_count() or 1, 16))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    every = ["--every"] if os.environ.get("GENKERNELS_COMPILE_EVERY") == "1" else []
    paths = [tmp_path / f"shard{i}.json" for i in range(shards)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.triton._compile_kernels", "--report", str(path), "--shard", f"{i}/{shards}"]
            + every,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, path in enumerate(paths)
    ]
    try:
        outputs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs):
        if proc.returncode != 0:
            pytest.fail(f"the compile harness exited with {proc.returncode}:\n{output[-6000:]}")
    reports = [json.loads(path.read_text()) for path in paths]
    skips = [r["skip"] for r in reports if "skip" in r]
    if skips:
        pytest.skip(f"cannot compile triton kernels ahead of time here: {skips[0]}")
    merged = {key: reports[0][key] for key in ("triton", "resources_read", "launches", "distinct", "chosen")}
    merged["seconds"] = max(r["seconds"] for r in reports)
    merged["variants"] = [v for r in reports for v in r["variants"]]
    merged["failures"] = [f for r in reports for f in r["failures"]]
    return merged


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return _run_shards(tmp_path_factory.mktemp("compile"))


# Known spills of kernels without the group-norm tile keys: (arch, kernel, constexprs that must all match).
KNOWN_SPILLS_BY_CONSTEXPRS = [
    # triton 3.6 only: one register stored to the stack at 80 registers (a ptxas artifact), the RMSNorm backward with
    # per-token scale and no affine weight at D = 40 (the transformer sweep's small "paths" calls).
    (
        90,
        "_adaln_backward_kernel",
        {"RMS": True, "HAS_W": False, "SCALE_TOKEN": True, "BLOCK_R": 8, "BLOCK_D": 64, "num_warps": 4},
    ),
]
# Every known spill in that form: the tables above by their SPILL_KEYS (each key must match, absent ones as None).
_KNOWN = [(arch, kernel, dict(zip(SPILL_KEYS, keys))) for arch, kernel, *keys in KNOWN_SPILLS]
_KNOWN += KNOWN_SPILLS_BY_CONSTEXPRS


def _is_known_spill(variant: dict) -> bool:
    constexprs = variant["constexprs"]
    return any(
        (arch, kernel) == (variant["arch"], variant["kernel"]) and all(constexprs.get(k) == v for k, v in flags.items())
        for arch, kernel, flags in _KNOWN
    )


def _spills(variant: dict) -> int:
    return variant.get("stack_bytes", 0) + variant.get("local_bytes", 0)


def _bytes(form: str) -> int:
    """Bytes one thread moves with a PTX access of this form: 'v4.b32' -> 16, 'b16' -> 2."""
    *vector, element = form.split(".")
    return (int(vector[0][1:]) if vector else 1) * int(element[1:]) // 8


def _widest(forms: list[str]) -> str:
    return max(forms, key=_bytes, default="-")


def _print_tables(report: dict) -> None:
    variants = report["variants"]
    print(
        f"\ntriton {report['triton']}: {len(variants)} specializations compiled in {report['seconds']} s, "
        f"chosen from {report['distinct']} distinct ones ({report['launches']} launches)"
    )
    print(f"{'arch':>4}  {'kernel':<26} {'variants':>8} {'registers':>10} {'max spill B':>11}  spilling")
    groups = defaultdict(list)
    for v in variants:
        groups[(v["arch"], v["kernel"])].append(v)
    for (arch, kernel), vs in sorted(groups.items(), reverse=True):
        regs = [v.get("registers", -1) for v in vs]
        spilling = sum(1 for v in vs if _spills(v))
        print(
            f"sm{arch:<2}  {kernel:<26} {len(vs):>8} {min(regs):>4}-{max(regs):<5} "
            f"{max(map(_spills, vs)):>11}  {spilling}"
        )
    print("\nbenchmark cases, bf16:")
    for v in sorted((v for v in variants if v["bench_bf16"]), key=lambda v: (-v["arch"], v["call"], v["kernel"])):
        print(
            f"sm{v['arch']} {v['call'][6:]:<44} {v['kernel']:<26} regs {v.get('registers', '?'):>3} "
            f"spill {_spills(v):>3}  load {_widest(v['loads']):<7} store {_widest(v['stores'])}"
        )
    spilling = [v for v in variants if _spills(v)]
    if spilling:
        print("\nspilling:")
    for v in spilling:
        print(
            f"sm{v['arch']} {v['kernel']} stack {v.get('stack_bytes')} B, local {v.get('local_bytes')} B, "
            f"{v.get('registers')} registers, {v['constexprs']}: {v['call']}"
        )


def test_every_launch_compiles(report):
    """Each chosen launch compiles for its target: the interpreter's blind spot."""
    _print_tables(report)
    assert report["variants"], "nothing was compiled: the harness no longer intercepts the launches"
    messages = [
        f"sm_{f['arch']} {f['kernel']} failed for {len(f['calls'])} call(s), first {f['calls'][0]}:\n{f['error']}"
        for f in report["failures"]
    ]
    assert not messages, "\n\n".join(messages)


def test_no_register_spills(report):
    """Registers spilled to local memory make a memory-bound kernel slower: none may spill (the known
    cases above only warn), which also checks that _num_warps keeps tiles within the register file."""
    if not report["resources_read"]:
        pytest.skip("no cuobjdump next to triton's ptxas: cannot read registers and spills")
    known, new = [], []
    for v in report["variants"]:
        if _spills(v):
            (known if _is_known_spill(v) else new).append(
                f"sm_{v['arch']} {v['kernel']}: {v.get('stack_bytes')} B stack, {v.get('local_bytes')} B local, "
                f"{v.get('registers')} registers, {v['constexprs']} ({v['call']})"
            )
    for line in known:
        warnings.warn(f"known register spill: {line}", stacklevel=1)
    assert not new, "kernels spill registers:\n" + "\n".join(new)


def test_wgmma_is_not_serialized(report):
    """ptxas serializes every wgmma of a kernel (each waited for before the next one issues: no two tensor-core
    products in flight, within a dot or across dots) when it finds a non-wgmma instruction defining registers a
    wgmma in flight uses (ptxas -v's C7515). The attention forward and dq kernels walked the key blocks in two
    loops (the unmasked blocks, then those Lkv's end or the causal diagonal cuts) and were serialized at every
    head dim that way; one loop with a run-time test of the block is not (at head dim 256, whose key blocks are
    16 and 32 wide, the test's branch itself made ptxas serialize them: selects in every block instead). Each
    sm_90 variant with wgmma is read again by the ptxas triton compiled it with."""
    checked = [v for v in report["variants"] if v.get("wgmma_serialized") is not None]
    if not checked:
        pytest.skip("no kernel compiled with wgmma, or no ptxas of this triton to read it again")
    serialized = [
        f"sm_{v['arch']} {v['kernel']} {v['constexprs']}: serialized due to {v['wgmma_serialized']} ({v['call']})"
        for v in checked
        if v["wgmma_serialized"]
    ]
    assert not serialized, "ptxas serializes the wgmmas of:\n" + "\n".join(serialized)
    assert any(v["kernel"] == "_attn_fwd_kernel" for v in checked), "no attention forward was checked"


def test_shared_memory_fits(report):
    """A launch needing more shared memory than the target has fails at run time, not at compile time."""
    too_big = [
        f"sm_{v['arch']} {v['kernel']}: {v['shared_bytes']} > {v['max_shared_bytes']} B ({v['call']})"
        for v in report["variants"]
        if v["shared_bytes"] > v["max_shared_bytes"]
    ]
    assert not too_big, "\n".join(too_big)


def test_benchmark_bf16_loads_are_vectorized(report):
    """The benchmark shapes are memory bound: the group_norm kernels that stream x must use 16-byte loads
    in NCHW (contiguous positions) and at least 8-byte loads in channels last (spans of channels), or the
    alignment facts the kernels pass to the compiler (c_lo, SPAN, 16-divisible sizes) were lost. The
    elementwise kernels (sampler step, reparameterize, the flow ops' affine coupling and ActNorm:
    contiguous runs of a sample, 16-divisible sizes) must use 16-byte loads and stores."""
    bad = []
    for v in report["variants"]:
        if not v["bench_bf16"] or v["kernel"] == "_bwd_weight_bias_kernel":  # that one reads float32 partials
            continue
        wanted = 8 if "channels_last" in v["call"] else 16
        if max(map(_bytes, v["loads"]), default=0) < wanted:
            bad.append(f"sm_{v['arch']} {v['kernel']}: loads {v['loads']}, want {wanted} B ({v['call']})")
        if v["kernel"] in ELEMENTWISE_KERNELS + COUPLING_KERNELS and max(map(_bytes, v["stores"]), default=0) < 16:
            bad.append(f"sm_{v['arch']} {v['kernel']}: stores {v['stores']}, want 16 B ({v['call']})")
    assert not bad, "scalar global accesses on benchmark shapes:\n" + "\n".join(bad)


# The attention sweep of the harness (ATTENTION_HEAD_DIMS there; the harness module cannot be imported
# here, where TRITON_INTERPRET is set).
ATTENTION_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel")
ATTENTION_HEAD_DIMS = (40, 64, 80, 128, 256)


def test_attention_launches_compiled(report):
    """Each attention kernel compiled for each head dim on each target, in bf16 with the causal and key
    padding masks (the variant with the most live values, so the one closest to spilling), and the
    float32-only delta kernel once: the sweep still reaches the attention launches."""
    compiled = {(v["arch"], v["kernel"], v["constexprs"].get("HEAD_DIM")) for v in report["variants"]}
    wanted = {(arch, k, d) for arch in (90, 80) for k in ATTENTION_KERNELS for d in ATTENTION_HEAD_DIMS}
    assert not wanted - compiled, f"attention launches not compiled: {sorted(wanted - compiled)}"
    assert any(v["kernel"] == "_attn_bwd_delta_kernel" for v in report["variants"])
    # Decoding (one query against a KV cache's rows) takes the forward's 16-row tiles, on 4 warps, every head dim.
    decoding = {
        (v["arch"], v["constexprs"].get("HEAD_DIM"))
        for v in report["variants"]
        if v["kernel"] == "_attn_fwd_kernel"
        and "decode" in v["call"]
        and (v["constexprs"].get("BLOCK_M"), v["constexprs"].get("num_warps")) == (16, 4)
    }
    wanted = {(arch, d) for arch in (90, 80) for d in ATTENTION_HEAD_DIMS}
    assert not wanted - decoding, f"decoding attention launches not compiled: {sorted(wanted - decoding)}"
    # DiT's head dim 72 without a mask takes FWD_90_UNMASKED on sm_90 (128 x 64 tiles on one warpgroup); with the
    # mask (the sweep's causal, masked workload at 80) d128's 128 x 64 on 8 warps.
    tiles = {
        (c.get("HEAD_DIM"), "key_padding_mask" in v["call"], c.get("BLOCK_N"), v["num_warps"])
        for v in report["variants"]
        for c in (v["constexprs"],)
        if (v["arch"], v["kernel"]) == (90, "_attn_fwd_kernel") and v["constexprs"].get("BLOCK_M") == 128
    }
    assert {(72, False, 64, 4), (80, True, 64, 8)} <= tiles, tiles
    assert not {(72, False, 128, 8), (80, True, 128, 8), (80, True, 64, 4)} & tiles, tiles
    # Head dims 64 and 128, neither causal nor masked, take FWD_90_UNSPLIT there: 64 x 64 tiles, 4 warps, 3 stages.
    unsplit = {
        (c.get("HEAD_DIM"), c.get("BLOCK_M"), c.get("BLOCK_N"), v["num_warps"], c.get("num_stages"))
        for v in report["variants"]
        for c in (v["constexprs"],)
        if (v["arch"], v["kernel"]) == (90, "_attn_fwd_kernel")
        and c.get("HEAD_DIM") in (64, 128)
        and not (c.get("CAUSAL") or c.get("HAS_MASK") or "decode" in v["call"])
    }
    assert unsplit == {(64, 64, 64, 4, 3), (128, 64, 64, 4, 3)}, unsplit


# The kernels of the sampler step (genkernels.triton.schedule) and of reparameterize (genkernels.triton.reparam).
ELEMENTWISE_KERNELS = ("_step_kernel", "_forward_kernel", "_backward_kernel")


def test_schedule_and_reparam_launches_compiled(report):
    """The sampler step and reparameterize kernels compiled on each target (the benchmark's cases) and,
    on sm_90, with every way of drawing eps (none, a noise tensor, Philox from an int and from a tensor
    seed, grouped and per element), the guidance statistics kernel, and reparameterize's general path
    (the halves of channels_last moments): the sweeps still reach those launches."""
    compiled = {(v["arch"], v["kernel"]) for v in report["variants"]}
    wanted = {(arch, k) for arch in (90, 80) for k in ELEMENTWISE_KERNELS} | {(90, "_guidance_stats_kernel")}
    assert not wanted - compiled, f"launches not compiled: {sorted(wanted - compiled)}"
    for kernel in ELEMENTWISE_KERNELS:
        flags = [v["constexprs"] for v in report["variants"] if v["arch"] == 90 and v["kernel"] == kernel]
        paths = {("noise", c["NOISE"]) for c in flags}
        paths |= {(name, c[name]) for c in flags if c["NOISE"] == 2 for name in ("SEED_FROM_TENSOR", "GROUPED_NOISE")}
        wanted = {("noise", 0), ("noise", 1), ("noise", 2)}
        wanted |= {(name, on) for name in ("SEED_FROM_TENSOR", "GROUPED_NOISE") for on in (False, True)}
        assert not wanted - paths, f"{kernel}: eps paths not compiled: {sorted(wanted - paths)}"
        if kernel != "_step_kernel":
            assert {c["FLAT"] for c in flags} == {False, True}, f"{kernel}: both address paths"


def test_reparam_general_path_loads(report):
    """The halves of channels_last moments take reparameterize's general path (row r and channel k from j
    by a division). With 16 channels (K and the row stride 2K multiples of 16, which triton knows) its
    bf16 loads of mean and logvar stay 16-byte. (With fewer channels, e.g. the 4 of SD's VAE, triton
    cannot prove any run contiguous and they are 2-byte loads: not asserted either way.)"""
    checked = [v for v in report["variants"] if v["label"] == "latent16"]
    assert {v["kernel"] for v in checked} == {"_forward_kernel", "_backward_kernel"}
    bad = [f"{v['kernel']}: loads {v['loads']} ({v['call']})" for v in checked if max(map(_bytes, v["loads"])) < 16]
    assert not bad, "scalar loads on the general path with 16 channels:\n" + "\n".join(bad)


# The kernels of the flow ops (genkernels.triton.coupling): affine coupling and ActNorm, forward and backward.
COUPLING_KERNELS = (
    "_coupling_forward_kernel",
    "_coupling_backward_kernel",
    "_actnorm_forward_kernel",
    "_actnorm_backward_kernel",
)


def test_coupling_launches_compiled(report):
    """The affine coupling and ActNorm kernels compiled on each target (the benchmark's cases: forward,
    inverse, forward + backward) and, on sm_90, the coupling in every scale mode forward and backward,
    in channels_last and with samples packed several to a program (odd C, S = 1), its backward with each
    of dy and dlogdet absent and each gradient unwanted, and ActNorm in both directions, channels_last
    (B == 1) and without dx: the sweep still reaches those launches."""
    variants = [v for v in report["variants"] if v["kernel"] in COUPLING_KERNELS]
    compiled = {(v["arch"], v["kernel"]) for v in variants}
    wanted = {(arch, k) for arch in (90, 80) for k in COUPLING_KERNELS}
    assert not wanted - compiled, f"launches not compiled: {sorted(wanted - compiled)}"
    bench = defaultdict(set)
    for v in variants:
        if v["label"] == "bench":
            bench[v["arch"], v["kernel"]].add((v["args"][0], v["constexprs"].get("REVERSE")))
    for arch in (90, 80):
        for dtype in ("*float32:16", "*bfloat16:16"):
            for kernel, reverse in (
                ("_coupling_forward_kernel", False),
                ("_coupling_forward_kernel", True),
                ("_coupling_backward_kernel", None),
                ("_actnorm_forward_kernel", False),
                ("_actnorm_backward_kernel", None),
            ):
                assert (dtype, reverse) in bench[arch, kernel], f"sm_{arch} {kernel} {dtype} {reverse}: bench case"
    main = defaultdict(list)
    for v in variants:
        if v["arch"] == 90:
            main[v["kernel"]].append(v["constexprs"])
    for kernel in ("_coupling_forward_kernel", "_coupling_backward_kernel"):
        scales = {c["SCALE"] for c in main[kernel]}
        assert scales == set(range(5)), f"{kernel}: scale modes compiled {sorted(scales)}, want 0 to 4"
        assert any(c["BLOCK_K"] < c["BLOCK_J"] for c in main[kernel]), f"{kernel}: several rows per tile"
        assert any(c["BLOCK_N"] > 1 for c in main[kernel]), f"{kernel}: several samples per program"
    flags = {(name, c[name]) for c in main["_coupling_backward_kernel"] for name in c if name.isupper()}
    for name in ("HAS_DY", "HAS_DLOGDET", "NEED_DX", "NEED_DH"):
        assert {(name, False), (name, True)} <= flags, f"_coupling_backward_kernel: {name} both ways"
    assert {c["REVERSE"] for c in main["_actnorm_forward_kernel"]} == {False, True}
    assert {c["NEED_DX"] for c in main["_actnorm_backward_kernel"]} == {False, True}
    for kernel in ("_actnorm_forward_kernel", "_actnorm_backward_kernel"):
        assert {c["BLOCK_B"] == 1 for c in main[kernel]} == {False, True}, f"{kernel}: B == 1 (channels_last)"


# The kernels of the modulated-convolution ops (genkernels.triton.modconv).
MODCONV_KERNELS = (
    "_demod_forward_kernel",
    "_demod_styles_grad_kernel",
    "_demod_weight_grad_kernel",
    "_epilogue_forward_kernel",
    "_epilogue_backward_kernel",
)


def test_modconv_launches_compiled(report):
    """The demodulation and epilogue kernels compiled on each target (StyleGAN2 layer shapes), the epilogue
    in both layouts with 16-byte loads and stores of bf16 there, and on sm_90 with every activation and
    each side input and gradient absent: the sweep still reaches those launches."""
    variants = [v for v in report["variants"] if v["kernel"] in MODCONV_KERNELS]
    compiled = {(v["arch"], v["kernel"]) for v in variants}
    wanted = {(arch, k) for arch in (90, 80) for k in MODCONV_KERNELS}
    assert not wanted - compiled, f"launches not compiled: {sorted(wanted - compiled)}"
    bad = [
        f"sm_{v['arch']} {v['kernel']}: loads {v['loads']}, stores {v['stores']} ({v['call']})"
        for v in variants
        if v["label"] == "stylegan2"
        and v["kernel"].startswith("_epilogue")
        and min(max(map(_bytes, v["loads"]), default=0), max(map(_bytes, v["stores"]), default=0)) < 16
    ]
    assert not bad, "scalar global accesses on StyleGAN2 shapes:\n" + "\n".join(bad)
    main = [v["constexprs"] for v in variants if v["arch"] == 90 and v["kernel"] == "_epilogue_forward_kernel"]
    assert {c["ACT"] for c in main} == set(range(7)), "every activation"
    for flag in ("CHANNELS_LAST", "HAS_DCOEF", "HAS_NOISE", "NOISE_PER_SAMPLE", "HAS_BIAS", "HAS_CLAMP"):
        assert {c[flag] for c in main} == {False, True}, f"_epilogue_forward_kernel: {flag} both ways"
    grads = [v["constexprs"] for v in variants if v["arch"] == 90 and v["kernel"] == "_epilogue_backward_kernel"]
    for flag in ("NEED_DCOEF", "NEED_BIAS", "NEED_STRENGTH"):
        assert {c[flag] for c in grads} == {False, True}, f"_epilogue_backward_kernel: {flag} both ways"


# The kernels of bias_act (genkernels.triton.bias_act).
BIAS_ACT_KERNELS = ("_bias_act_forward_kernel", "_bias_act_grad_kernel", "_bias_act_grad_bias_kernel")


def test_bias_act_launches_compiled(report):
    """bias_act's forward, gradient map and gradient map with the bias gradient compiled on each target; at
    the benchmark's shape in bf16 all three move 16 bytes a thread access (the bias gradient alone stores
    only its float32 partials); on sm_90 every activation, both partial forms of the bias gradient and the
    call without dz were reached."""
    variants = [v for v in report["variants"] if v["kernel"] in BIAS_ACT_KERNELS]
    compiled = {(v["arch"], v["kernel"]) for v in variants}
    wanted = {(arch, k) for arch in (90, 80) for k in BIAS_ACT_KERNELS}
    assert not wanted - compiled, f"launches not compiled: {sorted(wanted - compiled)}"
    bad = [
        f"sm_{v['arch']} {v['kernel']}: loads {v['loads']}, stores {v['stores']} ({v['call']})"
        for v in variants
        if v["label"] == "anchor"
        and "bfloat16" in v["call"]
        and v["constexprs"].get("STORE_DZ", True)  # without dz the only stores are the float32 partials
        and min(max(map(_bytes, v["loads"]), default=0), max(map(_bytes, v["stores"]), default=0)) < 16
    ]
    assert not bad, "scalar global accesses at the benchmark's shape:\n" + "\n".join(bad)
    forward = [v["constexprs"] for v in variants if v["arch"] == 90 and v["kernel"] == "_bias_act_forward_kernel"]
    assert {c["ACT"] for c in forward} == set(range(7)), "every activation"
    tiles = [v["constexprs"] for v in variants if v["arch"] == 90 and v["kernel"] == "_bias_act_grad_bias_kernel"]
    for flag in ("PER_TILE", "STORE_DZ"):
        assert {c[flag] for c in tiles} == {False, True}, f"_bias_act_grad_bias_kernel: {flag} both ways"


# The kernels of the transformer family (genkernels.triton.adaln, .rope, .gated_mlp).
TRANSFORMER_KERNELS = (
    "_adaln_forward_kernel",
    "_adaln_backward_kernel",
    "_rope_kernel",
    "_gelu_tanh_forward_kernel",
    "_gelu_tanh_grad_kernel",
    "_swiglu_forward_kernel",
    "_swiglu_grad_kernel",
)


def _widest_possible(variant) -> int:
    """The widest access, in bytes, a bf16 launch of the benchmark can make: 16, but for rope with P pairs a
    row's second half starts P elements in, so 2 bytes times the largest power of two dividing P (8 at
    DiT-XL's P = 36)."""
    pairs = re.search(r" P=(\d+)", variant["call"])
    if variant["kernel"] != "_rope_kernel" or pairs is None:
        return 16
    p = int(pairs[1])
    return min(16, 2 * (p & -p))


def test_transformer_launches_compiled(report):
    """adaln (layer_norm_modulate and the gated residual + norm, forward and backward), rope (forward and
    inverse) and the MLP activations compiled on each target at the benchmark's shapes, and on sm_90 with
    RMSNorm, the affine, per-token modulation, odd D and partial rotation; at the benchmark's shapes in bf16
    the forwards move 16 bytes a thread access."""
    variants = [v for v in report["variants"] if v["kernel"] in TRANSFORMER_KERNELS]
    compiled = {(v["arch"], v["kernel"]) for v in variants}
    wanted = {(arch, k) for arch in (90, 80) for k in TRANSFORMER_KERNELS}
    assert not wanted - compiled, f"launches not compiled: {sorted(wanted - compiled)}"
    bad = [
        f"sm_{v['arch']} {v['kernel']}: loads {v['loads']}, stores {v['stores']} ({v['call']})"
        for v in variants
        if v["label"] == "bench"
        and ("forward" in v["kernel"] or v["kernel"] == "_rope_kernel")
        and min(max(map(_bytes, v["loads"]), default=0), max(map(_bytes, v["stores"]), default=0)) < _widest_possible(v)
    ]
    assert not bad, "narrower global accesses than the shapes allow at the benchmark's shapes:\n" + "\n".join(bad)
    calls = {v["call"] for v in variants if v["arch"] == 90}
    for feature in ("rms", "affine", "per-token", "fused", "P=20", "interleaved"):
        assert any(feature in c for c in calls), f"no sm_90 launch with {feature}"
