"""Compile the launches of the triton kernels for real GPU targets (sm_90, sm_80), on a machine without a GPU.

Run by ``tests/triton/test_compile.py`` in subprocesses, because triton reads ``TRITON_INTERPRET`` when it
decorates kernels and the test process has it set; here it must be unset so that the kernels are real
``JITFunction``s (the interpreter accepts code that the compiler rejects):

    python -m tests.triton._compile_kernels --report report.json [--shard 0/2] [--arch 90] [--dry-run | --every]
    python -m tests.triton._compile_kernels --report report.json --arch 90 --label bench --label anchor --sass

It calls ``group_norm_forward`` / ``group_norm_backward`` with CPU tensors for the shapes, layouts, dtypes
and flags of the test suite and of the benchmark, so the planner picks the launches a GPU call would
make. Each ``kernel[grid](...)`` becomes ``kernel.warmup(...)``, which binds and specializes the
arguments as a launch does (dtypes, 16-byte alignment of pointers, integers equal to 1 or multiples of
16, constexprs, num_warps) and compiles, but runs nothing; a stand-in driver reports the target (sm_90,
sm_80) instead of a GPU. Resource usage comes from the cuobjdump shipped with triton.

A sweep makes over a thousand distinct specializations per target (the split path launches once per L2
batch, and batch offsets equal to 1 or to multiples of 16 are specializations of their own), too many to
compile in a test. So launches are chosen, deterministically and from their arguments alone, in two tiers:

- workloads: the first launch of each kernel in each call, i.e. the configuration that call compiles,
  with the alignment and divisibility of its own sizes (which decide vector widths and registers): for
  the benchmark cases on every target, and on sm_90 for the GPU tests' shapes and shapes at the
  single-pass size limits; in bf16 (fp16 compiles as bf16 does but for conversions; fp16 and fp32 calls
  go through the coverage tier);
- coverage, on sm_90 only: any other launch that brings something new for its kernel: a pointer
  signature (dtypes and 16-byte alignment), a class of any single argument or constexpr (integers equal
  to 1, multiples of 16 or neither; integer constexprs equal to 0, to 1 or more: tile sizes, modes such as
  NOISE; each flag value), or a pair of flag values.

Attention launches (genkernels.triton.attention) are chosen the same way from ``attention_calls``: the
workloads are the bf16 calls with a causal mask and a key padding mask, the variant with the most live
values, for every head dim of the sweep on every target; the other flag combinations, fp16 and fp32 go
through the coverage tier.

The elementwise families with in-kernel Philox noise are chosen the same way too: the fused sampler step
(genkernels.triton.schedule, ``step_calls``) and reparameterize (genkernels.triton.reparam,
``reparam_calls``, forward and backward on the canonical (B, R, K) views of genkernels.ops.reparam's
fused backend interface). Their workloads are the benchmark's cases, float32 and bf16, on every target;
a few small calls then cover the other paths on sm_90 (Philox from an int or a tensor seed, grouped or
per element, a noise tensor, deterministic, the KL and each gradient on or off, the halves of contiguous
and channels_last moments, odd sizes; guidance rescale, clipping, x0_prev and per-sample coefficients).
So are the flow ops (genkernels.triton.coupling, ``coupling_calls``: affine coupling and ActNorm, forward
and backward, through genkernels.ops.coupling's fused backend interface): the benchmark's coupling
(forward, inverse, forward + backward) and ActNorm (forward, forward + backward) cases, float32 and bf16,
on every target; then, on sm_90, small calls in every scale mode, channels_last, odd C and S = 1, the
coupling backward with dy or dlogdet absent or a gradient unwanted, ActNorm reversed and without dx. Those
small calls are workloads on sm_90 (the first launch of each kernel in each compiles), because the
selector sees the scale modes 2 to 4 as one class of SCALE.

``--every`` compiles every distinct specialization instead (minutes; for a GPU machine's many cores).

``--label L`` (repeatable) keeps only the calls of that label ("bench": the benchmark's shapes; "anchor":
bias_act's ANCHORS shape). ``--sass`` also counts each variant's SASS instructions (static, per thread,
NOPs left out) and the elements each thread handles (the first tensor argument's numel over the threads
launched), and prints a table of them: for a memory-bound kernel, instructions an element against the
issue budget (an SM issues 4 warp instructions a cycle; at an H100's 3 TB/s and 1.755 GHz a kernel
moving B bytes an element has about 10 * B instructions an element before the issue rate bounds it).
For kernels without loops the static count is the count each thread executes.

Shards split the chosen launches between processes. The JSON report lists each compiled specialization
(kernel, target, constexprs, registers, stack and local bytes, shared memory, vector widths of global
loads and stores, the call that chose it), the compile failures, or ``skip`` with the reason when this
triton cannot be driven this way.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
    raise SystemExit("run without TRITON_INTERPRET: the interpreter replaces the kernels this compiles")

import torch  # noqa: E402

from tests.transformer_calls import TransformerCall, run_transformer_call  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _canary_kernel(x_ptr, n, BLOCK: tl.constexpr):
        """Compiled first for each target: if this fails, the toolchain cannot be driven here."""
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


# What the planner sees per target: (SM count, L2 bytes) as torch reports them for an H100 / H200
# (sm_90) and an A100 (sm_80). They decide the split path's batches and splits.
PROFILES = {90: (132, 50 * 1024 * 1024), 80: (108, 40 * 1024 * 1024)}
# Shared memory one block may use (opt-in maximum): a kernel needing more fails at launch.
MAX_SHARED_BYTES = {90: 227 * 1024, 80: 163 * 1024}
ALL_ARCHS = tuple(PROFILES)
MAIN_ARCHS = (90,)  # the others compile the benchmark's workloads only

HALF = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, *HALF)
FORCED_SPLIT = {"SINGLE_PASS_MAX_ELEMENTS": 64, "L2_BATCH_BYTES": 2048}  # the suite's `forced` fixture


class Unsupported(Exception):
    """This triton lacks something the harness needs: the test skips with this reason."""


@dataclass
class Call:
    """One group_norm call: forward, then backward for each needs_dx (with dweight / dbias when present)."""

    label: str
    shape: tuple[int, ...]
    groups: int
    dtype: torch.dtype
    layout: str = "contiguous"  # contiguous, channels_last, offset (data pointer not 16-byte aligned)
    weight: bool = True
    bias: bool = True
    affine_dtype: torch.dtype | None = None  # None: x's dtype
    silu: bool = True
    needs_dx: tuple[bool, ...] = (True,)
    knobs: dict = field(default_factory=dict)  # module constants of genkernels.triton.group_norm
    workload: tuple[int, ...] = ()  # targets compiling the first launch of each kernel (module docstring)

    def __str__(self) -> str:
        text = f"{self.label} {tuple(self.shape)} G={self.groups} {str(self.dtype)[6:]} {self.layout}"
        if not (self.weight and self.bias and self.affine_dtype is None):
            text += f" w={self.weight} b={self.bias} affine={str(self.affine_dtype or self.dtype)[6:]}"
        if not self.silu:
            text += " silu=False"
        return text + (" forced-split" if self.knobs else "")


def calls(gn) -> Iterator[Call]:
    """The sweep, workloads first. Shapes take the usual flags (weight, bias, silu, every gradient);
    the flag combinations are swept on one single-pass and one forced-split shape in both layouts,
    since flags are constexprs independent of the tile shape. Workloads are bfloat16 calls (module
    docstring)."""
    from genkernels.bench import group_norm as bench
    from tests.ops import test_group_norm as suite

    layouts = {"NCHW": "contiguous", "channels_last": "channels_last"}
    bench_cases = dict.fromkeys((tuple(c.shape), layouts[c.layout], c.dtype) for c in bench.cases())
    for shape, layout, dtype in bench_cases:
        yield Call("bench", shape, bench.GROUPS, dtype, layout, workload=ALL_ARCHS if dtype == torch.bfloat16 else ())
    # Groups of 256 positions at the single-pass limits of the forward and (half of it) the backward:
    # the largest tiles held in registers.
    for limit in (gn.SINGLE_PASS_MAX_ELEMENTS, gn.SINGLE_PASS_MAX_ELEMENTS // 2):
        for layout in ("contiguous", "channels_last"):
            yield Call("limit", (1, 32 * (limit // 256), 16, 16), 32, torch.bfloat16, layout, workload=MAIN_ARCHS)
    for shape, groups in suite.GPU_SHAPES:
        for dtype in ALL_DTYPES:
            for layout in ("contiguous", "channels_last"):
                workload = MAIN_ARCHS if dtype == torch.bfloat16 else ()
                yield Call("gpu-test", shape, groups, dtype, layout, workload=workload)
    for shape, groups in suite.SHAPES:
        for dtype in ALL_DTYPES:
            for layout in ("contiguous", "channels_last", "offset"):
                yield Call("test", shape, groups, dtype, layout)
    for shape, groups in suite.SPLIT_SHAPES:
        for dtype in ALL_DTYPES:
            for layout in ("contiguous", "channels_last"):
                yield Call("split", shape, groups, dtype, layout)
                yield Call("split", shape, groups, dtype, layout, knobs=FORCED_SPLIT)
    for shape, groups, knobs in (((2, 12, 5, 3), 4, {}), ((2, 12, 33, 31), 3, FORCED_SPLIT)):
        for dtype in ALL_DTYPES:
            for layout in ("contiguous", "channels_last"):
                if dtype != torch.float16:  # compiles as bf16 does but for conversions
                    for (weight, bias), silu in itertools.product(
                        ((False, False), (True, False), (False, True), (True, True)), (False, True)
                    ):
                        yield Call(
                            "flags", shape, groups, dtype, layout, weight, bias, None, silu, (True, False), knobs
                        )
                if dtype in HALF:  # mixed precision: float32 parameters
                    yield Call("flags", shape, groups, dtype, layout, affine_dtype=torch.float32, knobs=knobs)


ATTENTION_HEAD_DIMS = (40, 64, 80, 128, 256)


@dataclass
class AttentionCall:
    """One attention call, forward then backward, on (B, Hq, L, D) queries and (B, Hkv, L, D) keys."""

    head_dim: int
    dtype: torch.dtype
    causal: bool
    mask: bool
    workload: tuple[int, ...] = ()
    label: str = "attention"
    shape: tuple[int, int, int, int] = (2, 8, 2, 1024)  # B, Hq, Hkv, L: GQA, lengths as in diffusion models
    heads_inner: bool = False  # q, k (and so out) as (B, L, H, D) memory viewed as (B, H, L, D)
    # Decoding (forward only, no grad): one query per sequence against L cached keys, q, k and v views of a
    # KVCache's (B, L, 3, H, D) rows, as ImageGPT's cached step calls it (genkernels.nn.CausalSelfAttention).
    decode: bool = False

    def __str__(self) -> str:
        b, hq, hkv, length = self.shape
        return (
            f"attention B={b} Hq={hq} Hkv={hkv} L={length} D={self.head_dim} {str(self.dtype)[6:]}"
            f"{' causal' if self.causal else ''}{' key_padding_mask' if self.mask else ''}"
            f"{' heads inner' if self.heads_inner else ''}{' decode Lq=1 KV cache' if self.decode else ''}"
        )


def attention_calls() -> Iterator[AttentionCall]:
    """The attention sweep, workloads first (module docstring)."""
    for d in ATTENTION_HEAD_DIMS:
        yield AttentionCall(d, torch.bfloat16, True, True, workload=ALL_ARCHS)
    # Projections split in heads (nn.Attention, DiT: D = 72), out written heads inner through its strides; and
    # SDXL's 64 and FLUX's 128 (FWD_90_UNSPLIT on sm_90).
    for d in (40, 64, 72, 128):
        yield AttentionCall(
            d, torch.bfloat16, False, False, workload=MAIN_ARCHS, shape=(2, 16, 16, 1024), heads_inner=True
        )
    for d, dtype, causal, mask in itertools.product(ATTENTION_HEAD_DIMS, HALF, (False, True), (False, True)):
        if not (dtype == torch.bfloat16 and causal and mask):
            yield AttentionCall(d, dtype, causal, mask)
    yield AttentionCall(64, torch.float32, True, True)  # float32: IEEE dots, no residual
    # float32 beyond 128: every kernel splits the head dim 128 + the rest, two FMA chains a product (_dot2).
    yield AttentionCall(200, torch.float32, True, True)
    # ImageGPT's cached decoding step (the imagegpt benchmark: batch 64, 8 heads of 64, up to 256 keys), and
    # the head dims of the sweep decoding, on every target: the 16-row decoding tiles.
    yield AttentionCall(64, torch.bfloat16, True, False, ALL_ARCHS, "bench", (64, 8, 8, 256), decode=True)
    for d in ATTENTION_HEAD_DIMS:
        yield AttentionCall(d, torch.bfloat16, True, False, ALL_ARCHS, shape=(2, 8, 8, 255), decode=True)


def run_attention_call(at, call: AttentionCall) -> None:
    """The forward and backward launches of ``call``, as a call that needs gradients makes them."""
    b, hq, hkv, length = call.shape
    if call.decode:
        rows = torch.empty((b, length, 3, hq, call.head_dim), dtype=call.dtype)
        q, k, v = (rows[:, -1:, 0], rows[:, :, 1], rows[:, :, 2])
        at.attention_forward(*(t.transpose(1, 2) for t in (q, k, v)), call.causal, 0.125, None)
        return
    if call.heads_inner:
        q = torch.empty((b, length, hq, call.head_dim), dtype=call.dtype).transpose(1, 2)
        k = torch.empty((b, length, hkv, call.head_dim), dtype=call.dtype).transpose(1, 2)
    else:
        q = torch.empty((b, hq, length, call.head_dim), dtype=call.dtype)
        k = torch.empty((b, hkv, length, call.head_dim), dtype=call.dtype)
    mask = torch.zeros((b, length), dtype=torch.bool) if call.mask else None
    out, lse, residual = at.attention_forward(q, k, k, call.causal, 0.125, mask, keep_residual=True)
    at.attention_backward(out, q, k, k, out, lse, call.causal, 0.125, mask, residual)


def _tensor(shape, dtype, layout):
    if layout == "offset":
        return torch.empty(math.prod(shape) + 1, dtype=dtype)[1:].view(shape)
    x = torch.empty(shape, dtype=dtype)
    if layout == "channels_last" and x.dim() >= 3:
        perm = (0, *range(2, x.dim()), 1)
        inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
        x = x.permute(perm).contiguous().permute(inv)
    return x


def run_call(gn, call: Call) -> None:
    """The forward and backward launches of ``call``. (The op layer's dense_layout runs before these
    functions: the suite's `strided` layout reaches them as a contiguous copy.)"""
    x = _tensor(call.shape, call.dtype, call.layout)
    adtype = call.affine_dtype or call.dtype
    w = torch.empty(call.shape[1], dtype=adtype) if call.weight else None
    b = torch.empty(call.shape[1], dtype=adtype) if call.bias else None
    saved = {name: getattr(gn, name) for name in call.knobs}
    try:
        for name, value in call.knobs.items():
            setattr(gn, name, value)
        _, mean, rstd = gn.group_norm_forward(x, w, b, call.groups, 1e-5, call.silu)
        dy = torch.empty_like(x)
        for needs_dx in call.needs_dx:
            if needs_dx or w is not None or b is not None:  # as autograd asks, for the tensors that exist
                gn.group_norm_backward(
                    dy, x, w, b, mean, rstd, call.groups, call.silu, needs_dx, w is not None, b is not None
                )
    finally:
        for name, value in saved.items():
            setattr(gn, name, value)


# What each benchmarked sampler step (genkernels.bench.schedule_step.STEPS) passes to the step besides
# sample and coefficients (Python floats there): the launch's flags. A step missing here fails the harness.
BENCH_STEP_INPUTS = {
    "DDIM": {},
    "DDPM": {"noise": "tensor"},
    "Euler": {},
    "Euler-ancestral": {"noise": "tensor"},
    "DPM-Solver++ 2M": {"x0_prev": True, "return_x0": True},
    "flow Euler": {},
    "add_noise": {"model_output": False, "guided": False, "noise": "tensor"},
}


@dataclass
class StepCall:
    """One schedule_step call (genkernels.triton.schedule): the statistics pass when it rescales, then the step."""

    label: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    model_output: bool = True
    guided: bool = True
    rescale: bool = False
    clip: bool = False
    noise: str | None = None  # None, "tensor", "seed" (a Python int) or "seed tensor" (in-kernel Philox)
    x0_prev: bool = False
    return_x0: bool = False
    tensor_coeffs: tuple[str, ...] = ()  # coefficients given as float32 (B,) tensors, the others floats
    out_dtype: torch.dtype | None = None  # the model output's (None: sample's)
    workload: tuple[int, ...] = ()

    def __str__(self) -> str:
        text = f"{self.label} step {tuple(self.shape)} {str(self.dtype)[6:]}"
        if self.model_output:
            text += " guided" if self.guided else " unguided"
            text += f" out={str(self.out_dtype)[6:]}" if self.out_dtype else ""
        flags = {"rescale": self.rescale, "clip": self.clip, "x0_prev": self.x0_prev, "return_x0": self.return_x0}
        text += "".join(f" {name}" for name, on in flags.items() if on)
        text += f" noise={self.noise}" if self.noise else ""
        return text + (f" tensor coeffs {','.join(self.tensor_coeffs)}" if self.tensor_coeffs else "")


def step_calls() -> Iterator[StepCall]:
    """The sampler step sweep: the benchmark's cases (every target), then a few small calls covering the
    other paths (sm_90): Philox from an int seed (N a multiple of 4: grouped) and from a tensor seed (N odd:
    per element), guidance rescale (its statistics pass) with clipping, x0_prev, x0 and per-sample
    coefficients, an unguided output of another dtype."""
    from genkernels.bench import schedule_step as bench

    missing = {step.name for step in bench.STEPS} - set(BENCH_STEP_INPUTS)
    if missing:
        raise RuntimeError(f"benchmarked steps {sorted(missing)} are not in BENCH_STEP_INPUTS: update this harness")
    for case in bench.cases():
        inputs = BENCH_STEP_INPUTS[case.step.name]
        yield StepCall("bench", tuple(case.shape), case.dtype, **inputs, workload=ALL_ARCHS)
    yield StepCall("philox", (2, 4, 8, 8), torch.float32, noise="seed")
    yield StepCall("philox", (3, 5, 7, 3), torch.float16, noise="seed tensor", tensor_coeffs=("cn",))
    yield StepCall(
        "flags",
        (2, 4, 16, 15),
        torch.bfloat16,
        rescale=True,
        clip=True,
        x0_prev=True,
        return_x0=True,
        tensor_coeffs=("px", "po", "ex", "e0", "cx", "c0", "ce", "cp"),
    )
    yield StepCall("flags", (3, 4, 5, 5), torch.float32, guided=False, noise="tensor", out_dtype=torch.bfloat16)


def run_step_call(sc, call: StepCall) -> None:
    """The launches of ``call``, with the tensors the op module passes (genkernels.ops.schedule's fused
    backend interface): a guided model output is (2B, *), coefficients are floats or float32 (B,)."""
    from genkernels.ops.schedule import COEFF_NAMES, StepCoeffs

    b = call.shape[0]
    sample = torch.empty(call.shape, dtype=call.dtype)
    rest = call.shape[1:]
    out_dtype = call.out_dtype or call.dtype
    model_output = None
    if call.model_output:
        model_output = torch.empty(((2 * b) if call.guided else b, *rest), dtype=out_dtype)
    noise = torch.empty_like(sample) if call.noise == "tensor" else None
    seed = {"seed": 1234, "seed tensor": torch.zeros(1, dtype=torch.int64)}.get(call.noise)
    x0_prev = torch.empty_like(sample) if call.x0_prev else None
    coeffs = StepCoeffs(
        **{name: torch.empty(b, dtype=torch.float32) if name in call.tensor_coeffs else 0.5 for name in COEFF_NAMES}
    )
    sc.schedule_step(
        sample,
        model_output,
        noise,
        x0_prev,
        coeffs,
        7.5 if call.guided else None,
        0.7 if call.rescale else 0.0,
        1.0 if call.clip else None,
        seed,
        3,
        call.return_x0,
    )


@dataclass
class ReparamCall:
    """One reparameterize call (genkernels.triton.reparam): forward, then one backward per entry of grads.

    mean and logvar are separate tensors of ``shape`` in ``layout`` ("contiguous"), or the two halves of
    a moments tensor (B, 2C, *) ("moments", "moments channels_last"), seen as genkernels.ops.reparam
    makes the canonical (B, R, K) views: (B, 1, C * S) in channels first (one run per sample), (B, S, C)
    with row stride 2C for channels_last moments (the general path)."""

    label: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "contiguous"
    eps: str = "seed"  # "seed", "seed tensor", "noise" (a tensor) or "deterministic"
    want_kl: bool = True
    grads: tuple[tuple[bool, bool, bool, bool], ...] = ((True, True, True, True),)  # dz, dkl, dmean, dlogvar
    workload: tuple[int, ...] = ()

    def __str__(self) -> str:
        text = f"{self.label} reparam {tuple(self.shape)} {str(self.dtype)[6:]} {self.layout} eps={self.eps}"
        text += "" if self.want_kl else " no kl"
        names = ("dz", "dkl", "dmean", "dlogvar")
        for grad in self.grads:
            text += " bwd(" + ",".join(n for n, on in zip(names, grad) if on) + ")"
        return text


def reparam_calls() -> Iterator[ReparamCall]:
    """The reparameterize sweep: the benchmark's cases (every target; its fwd+bwd's backward takes dz and
    dkl and wants both gradients), then a few small calls covering the other paths (sm_90)."""
    from genkernels.bench import reparam as bench

    for case in bench.cases():
        grads = () if case.mode == "fwd" else ((True, True, True, True),)
        yield ReparamCall("bench", tuple(case.shape), case.dtype, grads=grads, workload=ALL_ARCHS)
    each_off = tuple(tuple(i != j for i in range(4)) for j in range(4))  # dz absent, dkl absent, ...
    yield ReparamCall("moments", (2, 4, 8, 8), torch.float32, "moments")
    # A 16-channel VAE's channels_last moments (SD3, FLUX): the general path at the benchmark's tile size.
    yield ReparamCall(
        "latent16", (4, 16, 64, 64), torch.bfloat16, "moments channels_last", "seed tensor", workload=MAIN_ARCHS
    )
    # K = 7 channels in the general path and N = 105 (not a multiple of 4) in the flat one: Philox per element.
    yield ReparamCall("odd", (3, 7, 5, 3), torch.float16, "moments channels_last")
    yield ReparamCall("odd", (3, 5, 7, 3), torch.float32, "contiguous", "seed tensor", grads=each_off)
    yield ReparamCall("flags", (2, 4, 8, 8), torch.float16, "contiguous", "noise", grads=each_off)
    yield ReparamCall("flags", (2, 4, 8, 8), torch.float32, "contiguous", "deterministic", grads=each_off)
    yield ReparamCall("flags", (2, 4, 8, 8), torch.bfloat16, "contiguous", "deterministic", want_kl=False, grads=())


def _reparam_views(shape, dtype, layout):
    """(mean, logvar) canonical views and a function making each output pair (dmean, dlogvar) alike."""
    b, c, *spatial = shape
    s = math.prod(spatial)
    if layout == "contiguous":

        def pair():
            return torch.empty((b, 1, c * s), dtype=dtype), torch.empty((b, 1, c * s), dtype=dtype)

    elif layout == "moments":

        def pair():
            moments = torch.empty((b, 2 * c * s), dtype=dtype)
            return (moments.as_strided((b, 1, c * s), (2 * c * s, c * s, 1), offset) for offset in (0, c * s))

    elif layout == "moments channels_last":

        def pair():
            moments = torch.empty((b, s, 2 * c), dtype=dtype)  # (B, 2C, *) in channels_last order
            return moments[:, :, :c], moments[:, :, c:]

    else:
        raise ValueError(layout)
    return (*pair(), pair)


def run_reparam_call(rp, call: ReparamCall) -> None:
    """The forward and backward launches of ``call`` (genkernels.ops.reparam's fused backend interface)."""
    mean, logvar, pair = _reparam_views(call.shape, call.dtype, call.layout)
    b, r, k = mean.shape
    noise = torch.empty((b, r, k), dtype=call.dtype) if call.eps == "noise" else None
    seed = {"seed": 1234, "seed tensor": torch.zeros(1, dtype=torch.int64)}.get(call.eps)
    deterministic = call.eps == "deterministic"
    rp.forward(mean, logvar, noise, seed, 3, deterministic, call.want_kl)
    for has_dz, has_dkl, want_dmean, want_dlogvar in call.grads:
        dz = torch.empty((b, r, k), dtype=call.dtype) if has_dz else None
        dkl = torch.empty(b, dtype=torch.float32) if has_dkl else None
        dmean, dlogvar = pair()
        rp.backward(
            dz,
            dkl,
            mean,
            logvar,
            noise,
            seed,
            3,
            deterministic,
            dmean if want_dmean else None,
            dlogvar if want_dlogvar else None,
        )


@dataclass
class CouplingCall:
    """One call of the flow ops (genkernels.triton.coupling, genkernels.ops.coupling's fused backend
    interface): ``kind`` "coupling" (affine coupling: x (N, C, *) and h (N, 2 (C - C // 2), *), or
    (N, C - C // 2, *) for the additive scale) or "actnorm" (x and float32 (C,) log_scale and bias).

    The forward in each direction of ``directions`` (False: forward, True: reverse; the op always asks
    for the logdet), then one backward per entry of ``grads``: (has_dy, has_dlogdet, need_dx, need_dh)
    for the coupling, (need_dx,) for actnorm (dy is always given there)."""

    label: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "contiguous"  # contiguous or channels_last
    scale: str = "sigmoid"  # the coupling's scale mode
    directions: tuple[bool, ...] = (False,)
    grads: tuple[tuple[bool, ...], ...] = ()
    workload: tuple[int, ...] = ()

    def __str__(self) -> str:
        text = f"{self.label} {self.kind} {tuple(self.shape)} {str(self.dtype)[6:]} {self.layout}"
        text += f" {self.scale}" if self.kind == "coupling" else ""
        text += "".join(" reverse" if reverse else " fwd" for reverse in self.directions)
        names = ("dy", "dlogdet", "dx", "dh") if self.kind == "coupling" else ("dx",)
        for grad in self.grads:
            text += " bwd(" + ",".join(n for n, on in zip(names, grad) if on) + ")"
        return text


def coupling_calls() -> Iterator[CouplingCall]:
    """The flow ops' sweep: the benchmark's coupling and ActNorm cases (every target; Glow's sigmoid
    scale; inverse = reverse; forward + backward takes dy and dlogdet and wants dx and dh), then a few
    small calls covering the other paths (sm_90). Those are workloads on sm_90, so that the first launch
    of each kernel in each compiles: the selector sees the scale modes 2 to 4 as one class of the SCALE
    constexpr, and the additive scale already turns HAS_DLOGDET and WANT_LOGDET off."""
    from genkernels.bench import coupling as bench

    every = (True, True, True, True)
    for case in bench.cases():
        if not isinstance(case, bench.FlowOpCase):  # the Glow step: convolutions around the same ops
            continue
        directions = (case.mode == "inv",)
        grads = () if case.mode != "fwd+bwd" else (every,) if case.kind == "coupling" else ((True,),)
        yield CouplingCall(
            "bench", case.kind, tuple(case.shape), case.dtype, directions=directions, grads=grads, workload=ALL_ARCHS
        )
    both = (False, True)
    # Each scale mode (sigmoid above): forward, reverse, the full backward; clamp is a runtime argument.
    for scale in ("exp", "softclamp_tanh", "softclamp_atan", "additive"):
        yield CouplingCall(
            "scale",
            "coupling",
            (2, 4, 8, 8),
            torch.float32,
            scale=scale,
            directions=both,
            grads=(every,),
            workload=MAIN_ARCHS,
        )
    # channels_last: one row per position (rows = S, b_len = Cb); bf16 with 16-byte aligned a- and b-parts.
    yield CouplingCall(
        "layout",
        "coupling",
        (2, 32, 8, 8),
        torch.bfloat16,
        "channels_last",
        directions=both,
        grads=(every,),
        workload=MAIN_ARCHS,
    )
    # Odd C: Ca = 1, Cb = 2 and Ca = 2, Cb = 3 (unaligned rows, samples packed BLOCK_N to a program); S = 1.
    yield CouplingCall(
        "odd", "coupling", (2, 3, 5, 7), torch.float32, directions=both, grads=(every,), workload=MAIN_ARCHS
    )
    yield CouplingCall(
        "odd", "coupling", (3, 5, 4, 4), torch.float16, "channels_last", grads=(every,), workload=MAIN_ARCHS
    )
    yield CouplingCall(
        "odd", "coupling", (4, 6), torch.float32, "contiguous", "softclamp_tanh", grads=(every,), workload=MAIN_ARCHS
    )
    # The backward with dy or dlogdet absent (None: zero) and with each gradient unwanted.
    for grad in (
        (False, True, True, True),
        (True, False, True, True),
        (True, True, False, True),
        (True, True, True, False),
    ):
        yield CouplingCall(
            "flags", "coupling", (2, 4, 8, 8), torch.float32, directions=(), grads=(grad,), workload=MAIN_ARCHS
        )
    # ActNorm: channels_last (B == 1, C the contiguous axis), odd C, S = 1, the reverse, dx unwanted.
    yield CouplingCall(
        "layout",
        "actnorm",
        (2, 6, 5, 7),
        torch.bfloat16,
        "channels_last",
        directions=both,
        grads=((True,), (False,)),
        workload=MAIN_ARCHS,
    )
    yield CouplingCall(
        "odd", "actnorm", (3, 5, 7, 3), torch.float32, directions=both, grads=((True,), (False,)), workload=MAIN_ARCHS
    )
    yield CouplingCall("odd", "actnorm", (3, 5), torch.float32, grads=((True,),), workload=MAIN_ARCHS)


def run_coupling_call(cp, call: CouplingCall) -> None:
    """The forward and backward launches of ``call`` (genkernels.ops.coupling's fused backend interface)."""
    x = _tensor(call.shape, call.dtype, call.layout)
    n, c = call.shape[:2]
    if call.kind == "coupling":
        cb = c - c // 2
        h = _tensor((n, cb if call.scale == "additive" else 2 * cb, *call.shape[2:]), call.dtype, call.layout)
        for reverse in call.directions:
            cp.coupling_forward(x, h, call.scale, 2.0, reverse, True)
        for has_dy, has_dlogdet, need_dx, need_dh in call.grads:
            dy = torch.empty_like(x) if has_dy else None
            dlogdet = torch.empty(n, dtype=torch.float32) if has_dlogdet else None
            cp.coupling_backward(dy, dlogdet, x, h, call.scale, 2.0, need_dx, need_dh)
    elif call.kind == "actnorm":
        log_scale, bias = torch.empty(c, dtype=torch.float32), torch.empty(c, dtype=torch.float32)
        for reverse in call.directions:
            cp.actnorm_forward(x, log_scale, bias, reverse)
        for (need_dx,) in call.grads:
            cp.actnorm_backward(torch.empty_like(x), x, log_scale, bias, need_dx)
    else:
        raise ValueError(call.kind)


@dataclass
class ModconvCall:
    """One call of the modulated-convolution ops (genkernels.triton.modconv, genkernels.ops.modconv's fused
    backend interface): ``kind`` "demod" (weight (O, I, *k) and N styles: forward and backward) or
    "epilogue" (y (N, C, H, W) in ``layout``; forward, then one backward per entry of ``grads``:
    (need_dcoef, need_bias, need_strength)). ``inputs`` names the epilogue's side inputs present: "dcoef",
    "noise" (per sample) or "noise1" (shared), "strength", "bias"; ``clamp`` adds the clamp."""

    label: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "contiguous"
    n: int = 0  # demod: the batch of styles
    act: str = "lrelu"
    inputs: tuple[str, ...] = ("dcoef", "noise", "strength", "bias")
    clamp: bool = False
    grads: tuple[tuple[bool, bool, bool], ...] = ((True, True, True),)
    workload: tuple[int, ...] = ()

    def __str__(self) -> str:
        text = f"{self.label} modconv {self.kind} {tuple(self.shape)} {str(self.dtype)[6:]} {self.layout}"
        if self.kind == "demod":
            return text + f" N={self.n}"
        text += f" {self.act} {'+'.join(self.inputs) or 'y only'}" + (" clamp" if self.clamp else "")
        for grad in self.grads:
            text += " bwd(" + ",".join(n for n, on in zip(("dcoef", "bias", "strength"), grad) if on) + ")"
        return text


def modconv_calls() -> Iterator[ModconvCall]:
    """The modconv sweep: StyleGAN2 layer shapes (every target: the demodulation of 512-channel 3x3 and
    1x1 weights at batch 8 in float32 and bf16; the epilogue at (8, 512, 16, 16) and (4, 128, 64, 64) in
    bf16, both layouts, with every side input and every gradient), then small calls covering the other
    paths on sm_90 (each activation, shared noise, absent inputs and gradients, the clamp, odd C and H*W,
    fp16 and fp32)."""
    for shape in ((512, 512, 3, 3), (512, 512, 1, 1), (512, 512)):
        for dtype in (torch.float32, torch.bfloat16):
            yield ModconvCall("stylegan2", "demod", shape, dtype, n=8, workload=ALL_ARCHS)
    for shape in ((8, 512, 16, 16), (4, 128, 64, 64)):
        for layout in ("contiguous", "channels_last"):
            yield ModconvCall("stylegan2", "epilogue", shape, torch.bfloat16, layout, workload=ALL_ARCHS)
    yield ModconvCall("odd", "demod", (7, 5, 3, 3), torch.float16, n=33, workload=MAIN_ARCHS)
    for act in ("linear", "relu", "tanh", "sigmoid", "silu", "gelu"):
        yield ModconvCall("act", "epilogue", (2, 16, 8, 8), torch.float32, act=act, clamp=True, workload=MAIN_ARCHS)
    for layout in ("contiguous", "channels_last"):
        for inputs, grads in (
            (("dcoef", "noise1", "bias"), ((True, True, True), (False, False, False))),
            ((), ((False, False, False),)),
            (("noise", "strength"), ((False, False, True),)),
        ):
            yield ModconvCall(
                "flags", "epilogue", (2, 16, 8, 8), torch.float16, layout, inputs=inputs, grads=grads, clamp=True,
                workload=MAIN_ARCHS,
            )  # fmt: skip
        yield ModconvCall("odd", "epilogue", (3, 3, 1, 7), torch.float32, layout, workload=MAIN_ARCHS)


def run_modconv_call(mc, call: ModconvCall) -> None:
    """The forward and backward launches of ``call`` (genkernels.ops.modconv's fused backend interface)."""
    f32 = torch.float32
    if call.kind == "demod":
        o, i = call.shape[:2]
        w3 = torch.empty((o, i, math.prod(call.shape[2:])), dtype=call.dtype)
        styles = torch.empty((call.n, i), dtype=f32)
        dcoef = mc.demod_forward(w3, styles, 1e-8)
        mc.demod_backward(torch.empty_like(dcoef), dcoef, w3, styles)
        return
    n, c, h, w = call.shape
    y = _tensor(call.shape, call.dtype, call.layout)
    dcoef = torch.empty((n, c), dtype=f32) if "dcoef" in call.inputs else None
    noise = None
    if "noise" in call.inputs or "noise1" in call.inputs:
        noise = torch.empty((n if "noise" in call.inputs else 1, 1, h, w), dtype=call.dtype)
    strength = torch.empty(1, dtype=f32) if "strength" in call.inputs else None
    bias = torch.empty(c, dtype=f32) if "bias" in call.inputs else None
    clamp = 256.0 if call.clamp else None
    args = (dcoef, noise, strength, bias, call.act, 0.2, 1.4, clamp)
    mc.epilogue_forward(y, *args)
    for grad in call.grads:
        mc.epilogue_backward(torch.empty_like(y), y, *args, *grad)


@dataclass
class BiasActCall:
    """One bias_act call (genkernels.triton.bias_act, genkernels.ops.bias_act's fused backend interface) on
    x of ``shape`` in ``layout`` with a bias along dim 1 (in ``bias_dtype``, default x's): the forward, the
    gradient map, and the gradient map with the bias gradient, with and without dz."""

    label: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "contiguous"
    act: str = "lrelu"
    clamp: bool = False
    workload: tuple[int, ...] = ()
    bias_dtype: torch.dtype | None = None

    def __str__(self) -> str:
        return f"{self.label} bias_act {tuple(self.shape)} {str(self.dtype)[6:]} {self.layout} {self.act}" + (
            " clamp" if self.clamp else ""
        )


def bias_act_calls() -> Iterator[BiasActCall]:
    """The bias_act sweep: the benchmark's shape (ANCHORS: (32, 512, 64, 64)) in bf16 and float32, both
    layouts, on every target (the bias in x's dtype); then every activation with the clamp, and odd sizes
    in fp16 with a float32 bias, on sm_90."""
    for dtype in (torch.bfloat16, torch.float32):
        for layout in ("contiguous", "channels_last"):
            yield BiasActCall("anchor", (32, 512, 64, 64), dtype, layout, workload=ALL_ARCHS)
    for act in ("linear", "relu", "tanh", "sigmoid", "silu", "gelu"):
        yield BiasActCall("act", (2, 16, 8, 8), torch.float32, act=act, clamp=True, workload=MAIN_ARCHS)
    for layout in ("contiguous", "channels_last"):
        yield BiasActCall("odd", (3, 5, 7, 3), torch.float16, layout, workload=MAIN_ARCHS, bias_dtype=torch.float32)


def run_bias_act_call(ba, call: BiasActCall) -> None:
    """The forward and backward launches of ``call``."""
    x = _tensor(call.shape, call.dtype, call.layout)
    bias = torch.empty(call.shape[1], dtype=call.bias_dtype or call.dtype)
    args = (bias, call.act, 0.2, 1.4, 256.0 if call.clamp else None, 1)
    ba.forward(x, *args)
    dy = torch.empty_like(x)
    ba.grad(dy, x, *args)
    for need_dz in (True, False):
        ba.grad_bias(dy, x, *args, need_dz)


def transformer_calls() -> Iterator[TransformerCall]:
    """The transformer sweep: the benchmark's shapes on every target (DiT-XL rows (2 * 4096, 1152) and FLUX
    rows (4608, 3072) in bf16, per-sample modulation, plain and fused with the gated residual; FLUX's and
    DiT-XL's rope, (1, 24, 4608, 128) and (2, 16, 4096, 72); the MLP activations at DiT-XL's hidden size),
    then small calls covering the other paths on sm_90 (RMSNorm, affine, per-token modulation, odd D,
    partial and interleaved rope, fp16/fp32)."""
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    for rows, tokens, d in ((8192, 4096, 1152), (4608, 4608, 3072)):
        for fused in (False, True):
            yield TransformerCall("bench", "adaln", (rows, d), bf16, tokens, fused=fused, workload=ALL_ARCHS)
    yield TransformerCall("bench", "rope", (1, 24, 4608, 128), bf16, workload=ALL_ARCHS)
    yield TransformerCall("bench", "rope", (2, 16, 4096, 72), bf16, workload=ALL_ARCHS)
    yield TransformerCall("bench", "mlp", (8192, 4608), bf16, workload=ALL_ARCHS)
    for rms, affine, per_token, d in ((True, True, False, 72), (False, True, True, 1000), (True, False, True, 40)):
        for fused in (False, True):
            yield TransformerCall(
                "paths", "adaln", (6, d), f16, 3, rms, affine, per_token, fused, workload=MAIN_ARCHS
            )  # fmt: skip
    yield TransformerCall(
        "paths", "adaln", (6, 72), f16, 3, True, True, fused=True, gated=False, params_like_x=True, workload=MAIN_ARCHS
    )
    yield TransformerCall("paths", "rope", (2, 3, 5, 72), f32, pairs=20, workload=MAIN_ARCHS)
    yield TransformerCall("paths", "rope", (2, 3, 5, 40), f16, interleaved=True, workload=MAIN_ARCHS)
    yield TransformerCall("paths", "mlp", (3, 1000), f32, workload=MAIN_ARCHS)


def _arg_class(value):
    """How triton specializes a launch argument (pointer dtype and 16-byte alignment; integer width,
    == 1, multiple of 16), as a JSON-friendly value."""
    if isinstance(value, torch.Tensor):
        return f"*{str(value.dtype)[6:]}" + (":16" if value.data_ptr() % 16 == 0 else "")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        width = "i32" if -(2**31) <= value < 2**31 else "i64"
        return "1" if value == 1 else width + (":16" if value % 16 == 0 else "")
    return type(value).__name__


def _features(args, kwargs) -> set:
    """What a launch exercises (see the module docstring, coverage tier)."""
    singles = [(i, _arg_class(a)) for i, a in enumerate(args)]
    for name, value in kwargs.items():
        singles.append((name, value if isinstance(value, bool) else value if value in (0, 1) else "n"))
    pointers = ("pointers", *(c for c in map(_arg_class, args) if str(c).startswith("*")))
    flags = [(k, v) for k, v in kwargs.items() if isinstance(v, bool)]
    return {pointers, *singles, *itertools.combinations(flags, 2)}


def _by_kind(kernel, args, kwargs) -> tuple[tuple, dict]:
    """A launch as (its runtime arguments in signature order, its constexprs and launch options by name),
    however the launcher passed them (the reparam launchers pass tensors by name)."""
    bound = dict(zip((p.name for p in kernel.params), args), **kwargs)
    return tuple(bound.pop(p.name) for p in kernel.params if not p.is_constexpr), bound


class Selector:
    """Chooses the launches to compile for one target (module docstring), deterministically."""

    def __init__(self, arch: int, every: bool = False):
        self.arch = arch
        self.coverage = arch in MAIN_ARCHS
        self.every = every
        self.chosen: set = set()
        self.distinct: set = set()
        self.covered: dict[str, set] = defaultdict(set)
        self.first_in_call: set = set()

    def new_call(self) -> None:
        self.first_in_call = set()

    def choose(self, call: Call, name: str, args, kwargs) -> bool:
        key = (name, tuple(_arg_class(a) for a in args), tuple(sorted(kwargs.items())))
        first = self.arch in call.workload and name not in self.first_in_call
        self.first_in_call.add(name)
        self.distinct.add(key)
        if key in self.chosen:
            return False
        features = _features(args, kwargs)
        if not (self.every or first or (self.coverage and not features <= self.covered[name])):
            return False
        self.chosen.add(key)
        self.covered[name] |= features
        return True


class _TargetDriver:
    """Stands in for triton's CUDA driver: reports ``target`` to the compiler and launches nothing.
    The device index is the arch, so that triton's per-device kernel caches keep targets apart."""

    def __init__(self, target):
        self.target = target

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _cuobjdump() -> str | None:
    """The cuobjdump shipped with triton (or TRITON_CUOBJDUMP_PATH, or on PATH), or None."""
    import triton

    env = os.environ.get("TRITON_CUOBJDUMP_PATH")
    if env and os.access(env, os.X_OK):
        return env
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else shutil.which("cuobjdump")


def _resources(cuobjdump: str | None, cubin: bytes, workdir: str) -> dict:
    """Registers, stack and local-memory bytes of the cubin's kernel: spilled registers live on the
    stack, in local memory, so both are 0 in a kernel that does not spill."""
    if cuobjdump is None:
        return {}
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    usage = {}
    for key, name in (("REG", "registers"), ("STACK", "stack_bytes"), ("LOCAL", "local_bytes")):
        match = re.search(rf"\b{key}:(\d+)", out)
        if match:
            usage[name] = int(match.group(1))
    return usage


def _sass_counts(cuobjdump: str | None, compiled, grid, args, workdir: str) -> dict:
    """SASS instructions of the kernel (static, NOPs left out), global loads before its first global store,
    and the elements a thread handles (the first tensor argument's numel over the threads the grid
    launches)."""
    if cuobjdump is None:
        return {}
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M)
    counts = {"sass_instructions": sum(op != "NOP" for op in ops)}
    # Global loads ahead of the first global store in program order: the vectors a thread has in flight
    # at once in a streaming kernel (a store may alias a later load, so loads do not move past stores).
    first_store = next((i for i, op in enumerate(ops) if op.startswith("STG")), len(ops))
    counts["loads_before_store"] = sum(op.startswith("LDG") for op in ops[:first_store])
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if tensors:
        threads = math.prod(grid) * compiled.metadata.num_warps * 32
        counts["elements_per_thread"] = round(tensors[0].numel() / threads, 2)
    return counts


def _print_sass(report: dict) -> None:
    """The --sass table: kernel, call, registers, SASS instructions a thread, elements a thread, a ratio, and
    global loads before the first global store."""
    rows = [v for v in report.get("variants", []) if "sass_instructions" in v]
    print(f"{'kernel':34} {'sm':>3} {'regs':>4} {'SASS':>6} {'elem/thr':>8} {'SASS/elem':>9} {'LDG<STG':>7}  call")
    for v in sorted(rows, key=lambda v: (v["call"], v["kernel"])):
        per = v.get("elements_per_thread") or 0
        ratio = f"{v['sass_instructions'] / per:9.1f}" if per else f"{'-':>9}"
        print(
            f"{v['kernel'][:34]:34} {v['arch']:>3} {v.get('registers', -1):>4} {v['sass_instructions']:>6} "
            f"{per:>8g} {ratio} {v.get('loads_before_store', '-'):>7}  {v['call']}"
        )


def _wgmma_serialization(ptx: str, arch: int, workdir: str) -> str | None:
    """For a kernel whose PTX issues wgmma: ptxas's reason for serializing its wgmmas (each waited for before
    the next is issued; ptxas -v's C7515 "Potential Performance Loss"), "" when it does not, None when this
    triton's ptxas cannot be found or run. The ptxas triton compiles the target with reads the PTX again."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - an older triton: the check is not made
        return None
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
    path = os.path.join(workdir, "kernel.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    arch_flag = f"--gpu-name={target.group(1) if target else f'sm_{arch}'}"
    run = subprocess.run(
        [ptxas, arch_flag, "-v", path, "-o", os.path.join(workdir, "kernel_v.cubin")], capture_output=True, text=True
    )
    if run.returncode != 0:
        return None
    serialized = r"wgmma\.mma_async instructions are serialized due to ([^\n]*?)(?: in the function|$)"
    match = re.search(serialized, run.stderr, re.M)
    return match.group(1) if match else ""


def _accesses(ptx: str, op: str) -> list[str]:
    """Distinct global loads or stores of the PTX by vector form and width: 'v4.b32', 'b16', ..."""
    forms = set()
    for match in re.finditer(rf"\b{op}\.global((?:\.[a-z0-9_]+)*)", ptx):
        parts = [p for p in match.group(1).split(".") if re.fullmatch(r"v\d|[bufs]\d+", p)]
        forms.add(".".join(parts))
    return sorted(forms)


class _Launcher:
    """Replaces a kernel in the module: ``launcher[grid](*args, **kwargs)`` calls ``on_launch``."""

    def __init__(self, name, kernel, on_launch):
        self.name, self.kernel, self.on_launch = name, kernel, on_launch

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.on_launch(self.name, self.kernel, grid, args, kwargs)


def _check_toolchain(arch: int) -> None:
    """Compile a trivial kernel for the target and read what the report needs, so that a triton this
    harness cannot drive skips the test instead of failing it as if the group_norm kernels were wrong."""
    try:
        compiled = _canary_kernel.warmup(torch.empty(64), 64, BLOCK=64, grid=(1,))
        _ = compiled.asm["ptx"], compiled.asm["cubin"], compiled.hash, compiled.metadata.num_warps
        _ = compiled.metadata.shared
    except Exception as error:
        raise Unsupported(
            f"triton {triton.__version__} cannot compile a trivial kernel for sm_{arch} this way: "
            f"{type(error).__name__}: {error}"
        ) from error


def compile_all(
    archs: list[int],
    shard: int,
    shards: int,
    workdir: str,
    dry_run: bool,
    every: bool,
    labels: tuple[str, ...] = (),
    sass: bool = False,
) -> dict:
    if triton is None:
        raise Unsupported("triton is not installed")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
    except ImportError as error:
        raise Unsupported(f"this triton lacks an API the harness uses ({error})") from error
    if not hasattr(driver, "set_active") or not hasattr(JITFunction, "warmup"):
        raise Unsupported(f"triton {triton.__version__} has no driver.set_active / JITFunction.warmup")

    import genkernels.triton._common as common
    import genkernels.triton.adaln as ad
    import genkernels.triton.attention as at
    import genkernels.triton.bias_act as ba
    import genkernels.triton.coupling as cp
    import genkernels.triton.gated_mlp as gm
    import genkernels.triton.group_norm as gn
    import genkernels.triton.modconv as mc
    import genkernels.triton.reparam as rp
    import genkernels.triton.rope as ro
    import genkernels.triton.schedule as sc

    if gn.triton is None:
        raise Unsupported("genkernels cannot import triton")
    for module, name in ((common, "FALLBACK_SM_COUNT"), (common, "FALLBACK_L2_BYTES"), (at, "FALLBACK_ARCH")):
        if not hasattr(module, name):
            raise RuntimeError(f"{module.__name__}.{name} is gone: update this harness")
    # (module, name, kernel) of every kernel, and the calls that launch them.
    kernels = [
        (m, name, getattr(m, name))
        for m in (gn, at, sc, rp, cp, mc, ba, ad, ro, gm)
        for name in dir(m)
        if name.endswith("_kernel")
    ]
    for _, name, kernel in kernels:
        if not isinstance(kernel, JITFunction):
            raise RuntimeError(f"{name} is a {type(kernel).__name__}, not a JITFunction")
    if len({name for _, name, _ in kernels}) != len(kernels):  # the report and the selector go by name
        raise RuntimeError(f"two kernel modules define a kernel of the same name: {sorted(n for _, n, _ in kernels)}")
    sweeps = (
        (lambda: calls(gn), lambda call: run_call(gn, call)),
        (attention_calls, lambda call: run_attention_call(at, call)),
        (step_calls, lambda call: run_step_call(sc, call)),
        (reparam_calls, lambda call: run_reparam_call(rp, call)),
        (coupling_calls, lambda call: run_coupling_call(cp, call)),
        (modconv_calls, lambda call: run_modconv_call(mc, call)),
        (bias_act_calls, lambda call: run_bias_act_call(ba, call)),
        (transformer_calls, lambda call: run_transformer_call(ad, ro, gm, call)),
    )

    cuobjdump = _cuobjdump()
    variants: dict[tuple, dict] = {}
    failures: dict[tuple, dict] = {}
    counts = {"launches": 0, "distinct": 0, "chosen": 0}
    index = itertools.count()
    state = {}

    def on_launch(name, kernel, grid, args, kwargs):
        arch, call, selector = state["arch"], state["call"], state["selector"]
        counts["launches"] += 1
        args, kwargs = _by_kind(kernel, args, kwargs)
        if not selector.choose(call, name, args, kwargs):
            return
        counts["chosen"] += 1
        if next(index) % shards != shard or dry_run:
            return
        try:
            start = time.perf_counter()
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
            seconds = time.perf_counter() - start
        except Exception as error:  # a compile error: reported with the launch that caused it
            message = f"{type(error).__name__}: {error}"
            failure = failures.setdefault(
                (arch, name, message[:4000]),
                {"kernel": name, "arch": arch, "error": message, "traceback": traceback.format_exc(), "calls": []},
            )
            failure["calls"].append(str(call))
            return
        key = (arch, name, compiled.hash)
        if key in variants:
            return
        ptx = compiled.asm["ptx"]
        variants[key] = {
            "kernel": name,
            "arch": arch,
            "tier": "workload" if arch in call.workload else "coverage",
            "call": str(call),
            "label": call.label,
            "bench_bf16": call.label == "bench" and call.dtype == torch.bfloat16,
            "args": [_arg_class(a) for a in args],
            "constexprs": kwargs,
            "num_warps": compiled.metadata.num_warps,
            "shared_bytes": compiled.metadata.shared,
            "max_shared_bytes": MAX_SHARED_BYTES[arch],
            "compile_s": round(seconds, 3),
            **(_sass_counts(cuobjdump, compiled, grid, args, workdir) if sass else {}),
            "loads": _accesses(ptx, "ld"),
            "stores": _accesses(ptx, "st"),
            **_resources(cuobjdump, compiled.asm["cubin"], workdir),
        }
        if "wgmma.mma_async" in ptx:
            variants[key]["wgmma_serialized"] = _wgmma_serialization(ptx, arch, workdir)

    saved_arch = at.FALLBACK_ARCH
    try:
        for module, name, kernel in kernels:
            setattr(module, name, _Launcher(name, kernel, on_launch))
        for arch in archs:
            common.FALLBACK_SM_COUNT, common.FALLBACK_L2_BYTES = PROFILES[arch]
            at.FALLBACK_ARCH = arch
            driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
            if not dry_run:
                _check_toolchain(arch)
            state.update(arch=arch, selector=Selector(arch, every))
            for make_calls, run in sweeps:
                for call in make_calls():
                    if labels and call.label not in labels:
                        continue
                    state["call"] = call
                    state["selector"].new_call()
                    run(call)
            counts["distinct"] += len(state["selector"].distinct)
    finally:
        at.FALLBACK_ARCH = saved_arch
        for module, name, kernel in kernels:
            setattr(module, name, kernel)
    return {
        "triton": triton.__version__,
        "resources_read": cuobjdump is not None,
        **counts,
        "variants": list(variants.values()),
        "failures": list(failures.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True, help="where to write the JSON report")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(PROFILES), help="default: all")
    parser.add_argument("--shard", default="0/1", help="I/N: compile every Nth chosen launch from the Ith")
    parser.add_argument("--dry-run", action="store_true", help="choose launches, compile nothing")
    parser.add_argument("--every", action="store_true", help="compile every distinct specialization (minutes)")
    parser.add_argument("--label", action="append", default=[], help="only the calls of this label (repeatable)")
    parser.add_argument("--sass", action="store_true", help="count SASS instructions and print a table")
    args = parser.parse_args(argv)
    shard, shards = map(int, args.shard.split("/"))
    workdir = tempfile.mkdtemp(prefix="genkernels-compile-")
    # Nothing is cached across runs: a fresh triton cache, deleted at exit.
    os.environ["TRITON_CACHE_DIR"] = os.path.join(workdir, "cache")
    start = time.perf_counter()
    try:
        report = compile_all(
            args.arch or sorted(PROFILES, reverse=True),
            shard,
            shards,
            workdir,
            args.dry_run,
            args.every,
            tuple(args.label),
            args.sass,
        )
    except Unsupported as reason:
        report = {"skip": str(reason)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - start, 2)
    with open(args.report, "w") as f:
        json.dump(report, f, indent=1, default=str)
    if args.sass:
        _print_sass(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
