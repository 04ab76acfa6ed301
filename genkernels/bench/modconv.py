"""StyleGAN2's modulated convolution block: benchmark cases, goals and the CPU self-check.

The workload: one synthesis layer of StyleGAN2 config-f at 256x256, batch 32, bf16 activations in
channels_last, a 3x3 convolution from C to C channels at three of its layer shapes: (512 ch,
64x64), (256 ch, 128x128), (128 ch, 256x256). The parameters are float32, as mixed-precision
StyleGAN2 keeps them: the weight (C, C, 3, 3), the styles (32, C) (the affine layer's output), the
bias (C,) and the noise strength (a 0-d tensor); the noise is (32, 1, H, W) in bf16 (the seeded values:
:func:`make_inputs`; the bias keeps every pre-activation away from the kink, see BIAS_MARGIN). The block
computes, for each sample n, with s = styles[n]::

    dcoef[n, o] = rsqrt(sum_{i,k} (weight[o, i, k] * s[i])^2 + 1e-8)           (demodulation)
    y = conv2d(x * s, weight) * dcoef + noise * strength + bias
    out = leaky_relu(y, 0.2) * sqrt(2)

Forward (out), and forward + backward (dx, dweight, dstyles, dbias, dstrength from a seeded dout:
all a training step differentiates; the noise is a constant input).

Variants, side by side on the same inputs:

- ``eager``: StyleGAN2's training formulation as users write it: the modulated weight materialized
  as (N, O, I, k, k) in float32 for dcoef, then x * styles, conv2d, y * dcoef + noise * strength,
  + bias, leaky_relu(0.2), * sqrt(2) (each a separate kernel);
- ``eager grouped``: the per-sample formulation: modulated and demodulated weights (N * O, I, k, k),
  one grouped conv2d (groups = N) on x reshaped to (1, N * I, H, W), then noise, bias and the
  activation (a baseline timed even outside the criterion: it rounds the demodulated weights);
- ``torch.compile`` of the faster of the two eager formulations (chosen per case by a short timing of
  both just before the compile, recorded in the case's ``params["measured"]``; off the GPU the
  training formulation);
- each genkernels backend (``triton``, ``cuda``): ``genkernels.ops.demodulation_coefficients`` (one
  fused kernel, no (N, O, I, k, k) tensor), x * styles and conv2d as in eager, then
  ``genkernels.ops.modconv_epilogue`` (dcoef, noise, bias, leaky ReLU and gain in one pass; one
  fused pass backward);
- ``<backend> grouped``: the grouped formulation on the same ops: the fused dcoef, the weights
  modulated and demodulated from it, the grouped conv2d, then ``modconv_epilogue`` without dcoef.

Correct before timed: truth = the training formulation in float32 (TF32 off) on the inputs upcast,
ref = the same in the case's dtypes; a variant passes when max|out - truth| <= 2 * max|ref - truth|
+ 1e-2 for every output (the parameter gradients, sums over the batch and space, with the floor
scaled by max(1, max|truth|), as the test suite does for reductions).

Rate: TFLOP/s of the convolution, 2 * N * O * I * k * k * H * W FLOPs forward (3x that forward +
backward: the data and the weight gradients); "% of matmul" is that rate over the bf16 matmul rate
measured in the run (the per-case tables' floor is these FLOPs at that rate). The summary's floor
adds the epilogue's bytes at the copy bandwidth: forward y read + out written + the noise read,
forward + backward also dout and y read and dx written (the backward's epilogue) and the noise read
again; the copy bandwidth is the run's own (the record's ``copy_gbs``, the ceiling of every GB/s figure
in the report).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import core
from ._elementwise import CompiledBaselineCase, build, check_one, compiled, import_failed, self_check_dtypes
from ._model import full_fp32
from .core import (
    COMPILE,
    DTYPE_NAMES,
    EAGER,
    CaseRecord,
    Expected,
    Goal,
    OpSummary,
    SelfCheck,
    SelfCheckTally,
    Timing,
    Variant,
    expected,
    expected_sum,
    first_call_s,
    genkernels_backends,
)

OP = "modconv"
#: Share of a time budget (group_norm has 1, bias_act 0.5): six cases of convolutions with a torch.compile each.
BUDGET_SHARE = 1.0
BATCH = 32
#: config-f 256x256 layers (channels, resolution): in = out channels, the 3x3 convolution of each block.
LAYERS = ((512, 64), (256, 128), (128, 256))
KERNEL = 3
DTYPE = torch.bfloat16
MODES = ("fwd", "fwd+bwd")
WORKLOAD = "StyleGAN2 modulated conv block (config-f 256x256 layers), batch 32"
ALPHA, GAIN, EPS = 0.2, math.sqrt(2.0), 1e-8
#: Seeded inputs: styles = 1 + STYLE_STD * N(0, 1) (an affine layer with bias 1), noise strength 0.1, and a bias
#: of +-BIAS_MARGIN (alternating by channel) + 0.1 N(0, 1). y * dcoef is about N(0, 1), so a pre-activation comes
#: near the leaky ReLU's kink about once in 10^9 elements: one within rounding of the kink takes the other slope
#: than in the truth (in every formulation), and the gradients' check would then measure these coin flips rather
#: than rounding. Both slopes are still exercised (one per channel); timing does not depend on the values.
STYLE_STD, STRENGTH, BIAS_MARGIN = 0.5, 0.1, 6.0
#: The goal: forward >= 1.3x the faster eager formulation on every case, on the best genkernels variant.
EAGER_GOAL = 1.3

GROUPED = "eager grouped"
GROUPED_SUFFIX = " grouped"
OUTPUTS = {"fwd": ("out",), "fwd+bwd": ("dx", "dweight", "dstyles", "dbias", "dstrength")}
#: Outputs that are sums over the batch and space (the criterion's floor scaled by their magnitude).
SUMS = ("dweight", "dstyles", "dbias", "dstrength")
TABLES = {"fwd": "modulated conv, forward", "fwd+bwd": "modulated conv, forward + backward"}
#: The short timing that picks the eager formulation torch.compile compiles.
PICK_TIMING = Timing(warmup_ms=5, rep_ms=20)

Inputs = tuple[torch.Tensor, ...]  # x, weight, styles, noise, strength, bias


def grouped_name(backend: str) -> str:
    """The variant name of ``backend``'s grouped formulation ("triton grouped")."""
    return backend + GROUPED_SUFFIX


def genkernels_variants() -> list[str]:
    """Each genkernels backend on the training formulation, then each on the grouped one."""
    backends = genkernels_backends()
    return [*backends, *(grouped_name(b) for b in backends)]


# --------------------------------------------------------------------------- the formulations


def _bias_lrelu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(y + bias.to(y.dtype).view(1, -1, 1, 1), ALPHA) * GAIN


def eager_modconv(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor,
    strength: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """StyleGAN2's training formulation (non-fused), as users write it.

    Args:
        x: (N, I, H, W) activations (bf16 in the benchmark; any float dtype).
        weight: (O, I, k, k), float32 (cast to x's dtype for the convolution).
        styles: (N, I), float32.
        noise: (N, 1, H, W) or (1, 1, H, W), x's dtype; strength: a 0-d float32 tensor.
        bias: (O,), float32.

    Returns:
        (N, O, H, W) in x's dtype: leaky_relu(conv2d(x * styles, weight) * dcoef + noise * strength + bias,
        0.2) * sqrt(2), dcoef computed from the modulated weight materialized as (N, O, I, k, k) in float32.
    """
    n, k = x.shape[0], weight.shape[-1]
    modulated = weight.unsqueeze(0) * styles.view(n, 1, -1, 1, 1)
    dcoef = (modulated.square().sum(dim=(2, 3, 4)) + EPS).rsqrt()
    y = F.conv2d(x * styles.to(x.dtype).view(n, -1, 1, 1), weight.to(x.dtype), padding=k // 2)
    y = y * dcoef.to(y.dtype).view(n, -1, 1, 1) + noise.to(y.dtype) * strength.to(y.dtype)
    return _bias_lrelu(y, bias)


def _grouped_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """conv2d of each sample of x (N, I, H, W) with its own weight w (N, O, I, k, k): one grouped convolution."""
    n, i, h, wd = x.shape
    o, k = w.shape[1], w.shape[-1]
    y = F.conv2d(x.reshape(1, n * i, h, wd), w.reshape(n * o, i, k, k).to(x.dtype), padding=k // 2, groups=n)
    return y.reshape(n, o, h, wd)


def eager_grouped_modconv(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor,
    strength: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """StyleGAN2's per-sample (grouped) formulation: the same function as :func:`eager_modconv`.

    The modulated and demodulated weights (N, O, I, k, k) are made in float32 and cast to x's dtype,
    then one conv2d with groups = N on x reshaped to (1, N * I, H, W) (a copy for channels_last x); then
    noise, bias and the activation. Same arguments and result as :func:`eager_modconv` (the result NCHW).
    """
    n = x.shape[0]
    w = weight.unsqueeze(0) * styles.view(n, 1, -1, 1, 1)
    w = w * (w.square().sum(dim=(2, 3, 4), keepdim=True) + EPS).rsqrt()
    y = _grouped_conv(x, w) + noise.to(x.dtype) * strength.to(x.dtype)
    return _bias_lrelu(y, bias)


def genkernels_modconv(
    backend: str | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor,
    strength: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """The training formulation on genkernels' ops: fused dcoef, x * styles and conv2d, fused epilogue.

    Same arguments and result as :func:`eager_modconv`; ``backend`` goes to both ops.
    """
    from genkernels.ops import demodulation_coefficients, modconv_epilogue

    n, k = x.shape[0], weight.shape[-1]
    dcoef = demodulation_coefficients(weight, styles, eps=EPS, backend=backend)
    y = F.conv2d(x * styles.to(x.dtype).view(n, -1, 1, 1), weight.to(x.dtype), padding=k // 2)
    return modconv_epilogue(
        y, dcoef, noise=noise, noise_strength=strength, bias=bias, act="lrelu", alpha=ALPHA, gain=GAIN, backend=backend
    )


def genkernels_grouped_modconv(
    backend: str | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor,
    strength: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """The grouped formulation on genkernels' ops: fused dcoef, weights modulated and demodulated from it
    (float32, cast to x's dtype), the grouped conv2d, then the fused epilogue without dcoef.

    Same arguments and result as :func:`eager_grouped_modconv`; ``backend`` goes to both ops.
    """
    from genkernels.ops import demodulation_coefficients, modconv_epilogue

    n = x.shape[0]
    dcoef = demodulation_coefficients(weight, styles, eps=EPS, backend=backend)
    w = weight.unsqueeze(0) * styles.view(n, 1, -1, 1, 1) * dcoef.view(n, -1, 1, 1, 1)
    return modconv_epilogue(
        _grouped_conv(x, w),
        None,
        noise=noise,
        noise_strength=strength,
        bias=bias,
        act="lrelu",
        alpha=ALPHA,
        gain=GAIN,
        backend=backend,
    )


def make_inputs(
    shape: Sequence[int],
    out_channels: int,
    kernel: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    layout: str = "channels_last",
    noise_batch: int | None = None,
) -> tuple[Inputs, torch.Tensor]:
    """Seeded inputs ``(x, weight, styles, noise, strength, bias)`` and a dout, on ``device``.

    x (N, I, H, W) ~ N(0, 1) and dout (N, O, H, W) ~ N(0, 1) in ``dtype`` and ``layout``; weight (O, I, k, k)
    ~ N(0, 1), styles (N, I) = 1 + 0.5 N(0, 1), bias (O,) = +-6 (alternating by channel, see BIAS_MARGIN)
    + N(0, 0.1^2), strength 0.1 (0-d), all float32; noise (noise_batch or N, 1, H, W) ~ N(0, 1) in ``dtype``.
    """
    n, i, h, w = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(s, generator=g, device=device, dtype=torch.float32)

    x, dout = randn(n, i, h, w), randn(n, out_channels, h, w)
    if layout == "channels_last":
        x, dout = (t.contiguous(memory_format=torch.channels_last) for t in (x, dout))
    weight = randn(out_channels, i, kernel, kernel)
    styles = 1 + STYLE_STD * randn(n, i)
    noise = randn(noise_batch or n, 1, h, w).to(dtype)
    sign = 1 - 2 * (torch.arange(out_channels, device=device) % 2)
    bias = BIAS_MARGIN * sign + 0.1 * randn(out_channels)
    strength = torch.tensor(STRENGTH, device=device)
    return (x.to(dtype), weight, styles, noise, strength, bias), dout.to(dtype)


def forward_backward(
    impl: Callable[..., torch.Tensor], args: Inputs, dout: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """(out,) without dout; else the gradients (dx, dweight, dstyles, dbias, dstrength) of ``(out * dout).sum()``
    (autograd.grad with dout as out's gradient: nothing accumulates in .grad between repetitions)."""
    out = impl(*args)
    if dout is None:
        return (out,)
    x, weight, styles, _noise, strength, bias = args
    return torch.autograd.grad(out, (x, weight, styles, bias, strength), dout)


def _differentiable(args: Inputs) -> Inputs:
    """``args`` with x, weight, styles, strength and bias requiring grad (the noise stays a constant)."""
    for i, t in enumerate(args):
        if i != 3:
            t.requires_grad_(True)
    return args


def references(args: Inputs, dout: torch.Tensor | None, truth_dtype: torch.dtype) -> list[Expected]:
    """The criterion's references: the training formulation on ``args`` as they are (ref), and on every
    floating input upcast to ``truth_dtype`` (truth; float32 math without TF32)."""

    def run(dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)

        grad = torch.enable_grad() if dout is not None else torch.no_grad()
        with grad, full_fp32():
            return forward_backward(eager_modconv, tuple(cast(a) for a in args), None if dout is None else cast(dout))

    names = OUTPUTS["fwd" if dout is None else "fwd+bwd"]
    return [
        (expected_sum if name in SUMS else expected)(name, ref, truth)
        for name, ref, truth in zip(names, run(None), run(truth_dtype))
    ]


# --------------------------------------------------------------------------- the case


def pick_faster(fns: dict[str, Callable[[], Any]], timer: Callable[[Callable[[], Any]], float]) -> tuple[str, dict]:
    """The name of the fastest of ``fns`` by ``timer`` (ms of a call), and every time; one that raises (e.g. out
    of memory) counts as infinitely slow, and ties go to the first."""
    ms = {}
    for name, fn in fns.items():
        try:
            ms[name] = timer(fn)
        except Exception:  # noqa: BLE001 - the other formulation is compiled
            ms[name] = math.inf
    return min(ms, key=ms.get), ms


class ModConvCase(CompiledBaselineCase):
    """One layer shape and mode of the modulated conv block (see the module doc).

    Args:
        channels: I, the input channels (and O unless ``out_channels`` is given); size: H = W.
        mode: "fwd" (out) or "fwd+bwd" (dx, dweight, dstyles, dbias, dstrength).
        batch: N; dtype: the activations' dtype (x, noise, dout; the parameters are float32).
        kernel: k (odd); out_channels: O (default: ``channels``); layout: "channels_last" or "contiguous".

    ``params["measured"]`` (a dict the case's record shares) receives, while the case runs, the eager
    formulation torch.compile compiled ("compiled", with "pick_ms": the short timing that chose it).
    """

    op = OP
    unit = "TFLOP/s"

    def __init__(
        self,
        channels: int,
        size: int,
        mode: str,
        batch: int = BATCH,
        dtype: torch.dtype = DTYPE,
        kernel: int = KERNEL,
        out_channels: int | None = None,
        layout: str = "channels_last",
    ):
        self.mode, self.dtype, self.layout, self.kernel = mode, dtype, layout, kernel
        self.shape = (batch, channels, size, size)
        self.out_channels = out_channels or channels
        conv_flops = 2.0 * batch * self.out_channels * channels * kernel * kernel * size * size
        self.work = conv_flops * (3 if mode == "fwd+bwd" else 1)
        act = batch * self.out_channels * size * size * dtype.itemsize
        noise = batch * size * size * dtype.itemsize
        # Forward: y read, out written, noise read; backward: dout and y read, dx written, noise read.
        self.epilogue_bytes = float(2 * act + noise if mode == "fwd" else 5 * act + 2 * noise)
        self.genkernels_variants = genkernels_variants()
        self.measured: dict[str, Any] = {}
        self.label = f"{channels}ch {size}x{size} {DTYPE_NAMES[dtype]} {mode}"
        self.table = TABLES[mode]
        self.rate_note = (
            f"TFLOP/s (conv FLOPs, 2*N*O*I*k*k*H*W{', x3 forward + backward' if mode == 'fwd+bwd' else ''}: "
            f"{self.work / 1e12:.3g} TFLOP)"
        )
        self.params: dict[str, Any] = {
            "workload": WORKLOAD,
            "shape": list(self.shape),
            "out_channels": self.out_channels,
            "kernel": kernel,
            "dtype": DTYPE_NAMES[dtype],
            "params_dtype": "fp32",
            "layout": layout,
            "mode": mode,
            "conv_flops": conv_flops,
            "epilogue_bytes": self.epilogue_bytes,
            "measured": self.measured,
        }
        self._state = {}

    def variant_names(self) -> list[str]:
        """eager (training formulation), eager grouped, torch.compile, each backend, each backend grouped."""
        return [EAGER, GROUPED, COMPILE, *self.genkernels_variants]

    def prepare(self, device: torch.device) -> None:
        """Seeded inputs and the references (float32 truth)."""
        args, dout = make_inputs(self.shape, self.out_channels, self.kernel, self.dtype, device, layout=self.layout)
        if self.mode == "fwd":
            dout = None
        else:
            _differentiable(args)
        self._state = {"args": args, "dout": dout, "expected": references(args, dout, torch.float32)}

    def _fn(self, impl: Callable[..., torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
        return functools.partial(forward_backward, impl, self._state["args"], self._state["dout"])

    def _faster_eager(self) -> Callable[..., torch.Tensor]:
        """The eager formulation to compile: on the GPU the faster of the two by a short timing
        (:func:`pick_faster`), off it the training formulation; recorded in ``params["measured"]``."""
        impls = {EAGER: eager_modconv, GROUPED: eager_grouped_modconv}
        if self._state["args"][0].device.type != "cuda":
            self.measured["compiled"] = EAGER
            return eager_modconv
        fns = {name: self._fn(impl) for name, impl in impls.items()}
        choice, ms = pick_faster(fns, functools.partial(core.time_ms, timing=PICK_TIMING))
        self.measured.update(compiled=choice, pick_ms=ms)
        return impls[choice]

    def variant(self, name: str) -> Variant:
        """Build one variant and run it once; torch.compile compiles here (after picking the faster eager)."""
        if name == EAGER:
            return build(EAGER, self._fn(eager_modconv))
        if name == GROUPED:
            fn = self._fn(eager_grouped_modconv)
            return Variant(GROUPED, "baseline", fn, first_call_s=first_call_s(fn), strict=False)
        if name == COMPILE:
            return build(COMPILE, self._fn(compiled(self._faster_eager())))
        if name.endswith(GROUPED_SUFFIX):
            backend = name[: -len(GROUPED_SUFFIX)]
            return build(name, self._fn(functools.partial(genkernels_grouped_modconv, backend)))
        return build(name, self._fn(functools.partial(genkernels_modconv, name)))

    def expected(self) -> list[Expected]:
        """out (forward), or dx, dweight, dstyles, dbias and dstrength (forward + backward)."""
        return self._state["expected"]


def cases(quick: bool = False) -> list[ModConvCase]:
    """The three layer shapes forward (the goal's), then forward + backward; ``quick``: the forwards."""
    modes = MODES[:1] if quick else MODES
    return [ModConvCase(channels, size, mode) for mode in modes for channels, size in LAYERS]


# --------------------------------------------------------------------------- summary and goals


def faster_eager(rec: CaseRecord) -> Any:
    """The faster of the two eager formulations that ran on ``rec`` (its Result), or None."""
    ran = [r for name in (EAGER, GROUPED) if (r := rec.result(name)) is not None and r.ms is not None]
    return min(ran, key=lambda r: r.ms) if ran else None


def best_genkernels(rec: CaseRecord) -> Any:
    """The fastest genkernels variant that ran and passed on ``rec`` (its Result), or None."""
    ran = [r for r in rec.results if r.role == "genkernels" and r.ms is not None]
    return min(ran, key=lambda r: r.ms) if ran else None


def floor_ms(rec: CaseRecord) -> float | None:
    """The summary's floor: the conv FLOPs at the run's matmul rate (the record's floor) plus the epilogue's
    bytes at the run's copy rate (the record's ``copy_gbs``, the report's one copy ceiling); None when either
    is unknown."""
    gbs = rec.copy_gbs
    if rec.floor_ms is None or not gbs:
        return None
    return rec.floor_ms + rec.params["epilogue_bytes"] / (gbs * 1e9) * 1e3


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return {"x": f"{value:.2f}x", "%": f"{value:.0f}%"}.get(unit, f"{value:.4f}")


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per case and variant: ms, the floor (conv + epilogue), the speedup vs the faster eager formulation and
    vs torch.compile, % of the floor; the goal: forward >= 1.3x the faster eager on every case."""
    recs = [r for r in records if r.op == OP]
    order = {(mode, layer): i for i, (mode, layer) in enumerate((m, la) for m in MODES for la in LAYERS)}

    def key(rec: CaseRecord) -> int:
        return order.get((rec.params["mode"], (rec.params["shape"][1], rec.params["shape"][2])), len(order))

    recs.sort(key=key)
    headers = ["case", "floor ms", "variant", "ms", "vs faster eager", "vs torch.compile", "% of floor"]
    rows = []
    for rec in recs:
        base, floor = faster_eager(rec), floor_ms(rec)
        for r in rec.results:
            if r.ms is None:
                rows.append([rec.label, _fmt(floor, "ms"), r.variant, r.status, "n/a", "n/a", "n/a"])
                continue
            vs_eager = None if base is None else base.ms / r.ms
            rows.append(
                [
                    rec.label,
                    _fmt(floor, "ms"),
                    r.variant + (" (faster eager)" if base is r else ""),
                    _fmt(r.ms, "ms"),
                    "-" if base is r else _fmt(vs_eager, "x"),
                    "-" if r.variant in (EAGER, GROUPED, COMPILE) else _fmt(r.vs_compile, "x"),
                    _fmt(None if floor is None else 100 * floor / r.ms, "%"),
                ]
            )
    fwd = [r for r in recs if r.params["mode"] == "fwd"]
    notes = [
        f"{WORKLOAD}: 3x3 conv, C -> C channels at (512 ch, 64x64), (256 ch, 128x128), (128 ch, 256x256); bf16 "
        "activations in channels_last, float32 weight, styles, bias and noise strength; forward + backward "
        "differentiates x, weight, styles, bias and strength.",
        "eager: StyleGAN2's training formulation (dcoef from the (N, O, I, k, k) modulated weight in float32, "
        "x * styles, conv2d, y * dcoef + noise * strength, + bias, leaky ReLU(0.2) * sqrt 2); eager grouped: "
        "per-sample demodulated weights and one grouped conv2d; torch.compile: of the faster eager per case; "
        "<backend>: ops.demodulation_coefficients + conv2d + ops.modconv_epilogue; <backend> grouped: the grouped "
        "formulation on the same ops.",
        "floor ms: the conv FLOPs (2*N*O*I*k*k*H*W, x3 forward + backward) at the bf16 matmul rate measured in "
        "this run, plus the epilogue's bytes (forward: y read, out written, noise read; forward + backward also "
        "dout and y read, dx written, noise read) at the copy bandwidth measured in this run (the report's "
        "ceiling). The per-case tables' floor is the FLOP part alone. % of floor = floor / ms.",
        f"Goal: forward >= {EAGER_GOAL:g}x the faster eager formulation on every case, on the best genkernels "
        "variant of each case; forward + backward is reported.",
    ]
    goal = _goal(f"bf16 forward vs the faster eager formulation, every case ({len(fwd)})", fwd)
    return OpSummary(OP, headers, rows, [goal], notes)


def _goal(name: str, records: Sequence[CaseRecord]) -> Goal:
    """Met when the best genkernels variant is >= EAGER_GOAL times faster than the faster eager on every case
    (of the three layer shapes: one missing leaves the goal unmeasured, unless a case already misses it)."""
    target = f">= {EAGER_GOAL:g}x"
    measured, unmeasured = [], []
    for rec in records:
        best, base = best_genkernels(rec), faster_eager(rec)
        if best is None or base is None:
            unmeasured.append(f"{rec.label} ({'no genkernels variant ran' if best is None else 'no eager ran'})")
        else:
            measured.append((base.ms / best.ms, f"{rec.label}, {best.variant} vs {base.variant}"))
    unmeasured += [f"{c}ch {s}x{s} (did not run)" for c, s in LAYERS if not _has(records, c, s)]
    if not measured:
        why = "; ".join(unmeasured) if unmeasured else "no case"
        return Goal(name, target, f"unmeasured ({why})", None)
    worst = min(measured)
    shown = f"worst {worst[0]:.2f}x ({worst[1]}); {len(measured)} of {len(LAYERS)} cases"
    if unmeasured:
        shown += "; unmeasured: " + "; ".join(unmeasured)
    if worst[0] < EAGER_GOAL:
        return Goal(name, target, shown, False)
    return Goal(name, target, shown, None if unmeasured else True)


def _has(records: Sequence[CaseRecord], channels: int, size: int) -> bool:
    return any(r.params["shape"][1] == channels and r.params["shape"][2] == size for r in records)


# --------------------------------------------------------------------------- CPU self-check

#: Small shapes for the CPU check (the Triton interpreter is slow): (N, I, H, W), O, k, layout, noise batch.
SELF_CHECK_CASES: tuple[tuple[tuple[int, ...], int, int, str, int | None], ...] = (
    ((2, 4, 8, 8), 6, 3, "contiguous", None),
    ((3, 5, 7, 3), 4, 1, "contiguous", 1),
    ((2, 6, 5, 5), 5, 3, "channels_last", None),
)


def self_check(backend: str) -> SelfCheck:
    """Check one genkernels backend on CPU against float64 truth (the test criterion): the block on the ops,
    training and grouped formulations, forward (out) and forward + backward (dx, dweight, dstyles, dbias,
    dstrength), on small shapes (k 3 and 1, odd sizes, channels_last, noise per sample and shared).

    bf16 is left out for triton: the interpreter mishandles it (shared/DESIGN.md). Returns "ok", "failed"
    (wrong numbers, or an error other than UnsupportedError) or "skipped" (the backend's reason: cuda off
    the GPU).
    """
    try:
        from genkernels import UnsupportedError
        from genkernels.ops import demodulation_coefficients, modconv_epilogue  # noqa: F401 - imports or fails
    except Exception as e:  # noqa: BLE001 - the op module itself does not import
        return import_failed(OP, backend, "genkernels.ops.modconv", e)
    device = torch.device("cpu")
    dtypes = self_check_dtypes(backend)
    tally = SelfCheckTally(OP, backend)
    paths = {"": genkernels_modconv, "grouped ": genkernels_grouped_modconv}
    for dtype in dtypes:
        for shape, out_channels, kernel, layout, noise_batch in SELF_CHECK_CASES:
            for mode in MODES:
                seed = tally.ran + len(tally.skips)
                args, dout = make_inputs(shape, out_channels, kernel, dtype, device, seed, layout, noise_batch)
                if mode == "fwd":
                    dout = None
                else:
                    _differentiable(args)
                for path, impl in paths.items():
                    label = f"{path}{'x'.join(map(str, shape))}->{out_channels} k{kernel} {layout} "
                    label += f"{DTYPE_NAMES[dtype]} {mode}"
                    failure = check_one(
                        tally,
                        label,
                        functools.partial(forward_backward, functools.partial(impl, backend), args, dout),
                        functools.partial(references, args, dout, torch.float64),
                        skip=(UnsupportedError,),
                    )
                    if failure is not None:
                        return failure
    return tally.result(dtypes, "training and grouped formulations, fwd and fwd+bwd")
