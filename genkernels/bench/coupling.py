"""Normalizing-flow steps: the affine coupling and ActNorm ops, and one Glow step; benchmark cases, goals and
the CPU self-check.

The workload of shared/ANCHORS.md: Glow's affine coupling (sigmoid scale) on x (64, 32, 64, 64) with the
conditioner output h (64, 32, 64, 64) (16 channels of scale pre-activation h_s, 16 of shift t), float32 and
bf16, forward (y and the per-sample log-determinant), inverse (the sampling direction) and forward +
backward (dx and dh from a seeded dy and dlogdet, as a maximum-likelihood loss gives them); ActNorm at the
same shape (float32 parameters (C,)), forward and forward + backward (dx, dlog_scale, dbias).

The baseline is the formula as users write it, eager and under ``torch.compile``::

    x_a, x_b = x.chunk(2, dim=1); h_s, t = h.chunk(2, dim=1); s = sigmoid(h_s + 2)
    y = cat([x_a, x_b * s + t], dim=1); logdet = log(s).sum over (C, H, W)
    inverse: x_b = (y_b - t) / s, logdet = -log(s).sum
    ActNorm: y = (x + bias[c]) * exp(log_scale[c]), logdet = H * W * sum(log_scale)

genkernels runs each as one call of ``genkernels.ops.affine_coupling(x, h, scale="sigmoid", backend=...)``
(``reverse=True`` for the inverse) or ``genkernels.ops.actnorm(x, log_scale, bias, backend=...)``: one pass
forward, one fused pass backward.

Rate: GB/s counting the bytes that must move, in units of x (h has as many elements here). Coupling
forward and inverse: x and h read, y written (3 tensors). Forward + backward: those 3, plus the fused
backward's dy read (dx_a = dy_a is copied), x_b (half of x) and h read again, dx and dh written
(3 + 4.5 = 7.5 tensors). ActNorm: x read and y written (2); forward + backward adds dy and x read and dx
written (5). The (N,) log-determinants and their gradients and the (C,) parameters are not counted. The
floor is those bytes at the copy bandwidth measured in the same run (``floor ms``); % of copy BW is
floor / ms. The eager baseline moves more (each intermediate goes to memory and back).

One Glow step, forward + backward: ActNorm -> InvConv1x1 -> AffineCoupling with Glow's conditioner
(conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3, hidden 512), at the first level of Glow on 64x64 images
(3 x 64 x 64 squeezed to 12 x 32 x 32), batch 64, bf16: the gradients of x and every parameter from dy and
dlogdet. Eager is the same step written with torch alone (the ActNorm and coupling formulas above, the
1x1 convolution and the conditioner as PyTorch layers, the same parameters), then ``torch.compile`` of
it, then ``genkernels.nn.flow``'s modules with each backend (``genkernels.backend(name)``). Its rate is
TFLOP/s of the convolutions (counted analytically, :func:`glow_step_flops`), the part that dominates
its time, and the % of the bf16 matmul rate; the flow ops are a small share of the step, so the goal
there is only not to be slower than eager.

Correctness before timing, under the test criterion: truth = the formula in float64 on the inputs
upcast (the Glow step: float32 without TF32, on float32 copies of the same parameters), ref = the
formula in the input dtype; the log-determinants and the parameter gradients, sums of 65,536 to 262,144
terms, get the floor scaled by max(1, max|truth|) as the test suite scales it for reductions. A
genkernels variant outside the bound is FAILED and not timed; torch.compile is timed anyway (users run
it as it is) with its miss noted.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._elementwise import (
    CompiledBaselineCase,
    MemoryBoundCase,
    build,
    case_rows,
    check_one,
    compiled,
    import_failed,
    in_dtypes,
    records_by,
    self_check_dtypes,
    speedup_goal,
)
from .core import (
    COMPILE,
    DTYPE_NAMES,
    EAGER,
    Case,
    CaseRecord,
    Expected,
    Goal,
    OpSummary,
    SelfCheck,
    SelfCheckTally,
    Variant,
    expected,
    expected_sum,
)

OP = "coupling"
#: Share of a time budget (group_norm has 1, attention 2): eleven small cases, torch.compile's the slow part.
BUDGET_SHARE = 0.5
#: shared/ANCHORS.md's shape: (N, C, H, W) of x (and of h: 2 * (C - C // 2) = C channels).
SHAPE = (64, 32, 64, 64)
WORKLOAD = "Glow affine coupling (sigmoid scale), batch 64 of 32x64x64"
DTYPES = (torch.float32, torch.bfloat16)
COUPLING_MODES = ("fwd", "inv", "fwd+bwd")
ACTNORM_MODES = ("fwd", "fwd+bwd")
#: One Glow step: the first level of Glow on 64x64 images (3x64x64 squeezed to 12x32x32), batch 64, Glow's
#: conditioner width.
GLOW_SHAPE = (64, 12, 32, 32)
GLOW_HIDDEN = 512
GLOW_DTYPE = torch.bfloat16
#: The goals of the coupling op: speedup vs eager per mode, and vs torch.compile (forward and inverse).
EAGER_GOAL = {"fwd": 2.5, "inv": 2.5, "fwd+bwd": 2.0}
COMPILE_GOAL = {"fwd": 1.0, "inv": 1.0}
#: The Glow step: the whole step on genkernels modules no slower than eager.
GLOW_GOAL = 1.0
SEED = 0

TABLES = {
    ("coupling", "fwd"): "affine coupling, forward",
    ("coupling", "inv"): "affine coupling, inverse",
    ("coupling", "fwd+bwd"): "affine coupling, forward + backward",
    ("actnorm", "fwd"): "ActNorm, forward",
    ("actnorm", "fwd+bwd"): "ActNorm, forward + backward",
    ("glow_step", "fwd+bwd"): "Glow step (ActNorm, InvConv1x1, AffineCoupling), forward + backward",
}
#: Tensors that must move, in units of x's size (h is as large as x at SHAPE).
TENSORS_MOVED = {
    ("coupling", "fwd"): 3.0,
    ("coupling", "inv"): 3.0,
    ("coupling", "fwd+bwd"): 7.5,
    ("actnorm", "fwd"): 2.0,
    ("actnorm", "fwd+bwd"): 5.0,
}
RATE_NOTES = {
    ("coupling", "fwd"): "GB/s (x, h read + y written: 3 tensors; logdet not counted)",
    ("coupling", "inv"): "GB/s (y, h read + x written: 3 tensors; logdet not counted)",
    ("coupling", "fwd+bwd"): "GB/s (forward's 3 + dy, x_b, h read and dx, dh written: 7.5 tensors)",
    ("actnorm", "fwd"): "GB/s (x read + y written: 2 tensors)",
    ("actnorm", "fwd+bwd"): "GB/s (forward's 2 + dy, x read and dx written: 5 tensors)",
    ("glow_step", "fwd+bwd"): "TFLOP/s (the convolutions' FLOPs, forward + backward)",
}
OUTPUTS = {
    ("coupling", "fwd"): ("y", "logdet"),
    ("coupling", "inv"): ("x", "logdet"),
    ("coupling", "fwd+bwd"): ("dx", "dh"),
    ("actnorm", "fwd"): ("y", "logdet"),
    ("actnorm", "fwd+bwd"): ("dx", "dlog_scale", "dbias"),
    ("glow_step", "fwd+bwd"): ("y", "logdet", "dx"),
}
#: Outputs that are sums over many terms: the floor scaled by their magnitude (module doc).
SUMS = ("logdet", "dlog_scale", "dbias")


# --------------------------------------------------------------------------- the baselines' formulas


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_a = the first C // 2 channels, x_b the rest: ``x.chunk(2, dim=1)`` for an even C (the op's split)."""
    c = x.shape[1]
    return x.chunk(2, dim=1) if c % 2 == 0 else x.split((c // 2, c - c // 2), dim=1)


def coupling_formula(x: torch.Tensor, h: torch.Tensor, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Glow's affine coupling as users write it, in the inputs' dtype (the eager baseline).

    x (N, C, *) (the input y when ``reverse``), h (N, 2 (C - C // 2), *): h_s, then t.
    s = sigmoid(h_s + 2); forward y = cat(x_a, x_b * s + t), logdet[n] = sum log s; reverse
    x = cat(y_a, (y_b - t) / s), logdet = -sum log s. Returns (y, logdet (N,) in the inputs' dtype).
    """
    x_a, x_b = _halves(x)
    h_s, t = h.chunk(2, dim=1)
    s = torch.sigmoid(h_s + 2.0)
    out_b = (x_b - t) / s if reverse else x_b * s + t
    logdet = torch.log(s).flatten(1).sum(1)
    return torch.cat([x_a, out_b], dim=1), -logdet if reverse else logdet


def coupling_inverse_formula(y: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`coupling_formula` with ``reverse=True`` (a function of its own, so torch.compile sees no flag)."""
    return coupling_formula(y, h, reverse=True)


def actnorm_formula(
    x: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor, reverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """ActNorm as users write it: y = (x + bias[c]) * exp(log_scale[c]) (reverse: x = y * exp(-ls) - bias),
    logdet = S * sum(log_scale) for every sample (S = H * W), broadcast to (N,).

    float32 parameters on a bf16 x promote the arithmetic to float32; y is cast back to x's dtype (as the
    op returns it, and as the next layer of a bf16 model takes it).
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    ls, b = log_scale.view(shape), bias.view(shape)
    y = x * torch.exp(-ls) - b if reverse else (x + b) * torch.exp(ls)
    total = math.prod(x.shape[2:]) * log_scale.sum()
    return y.to(x.dtype), (-total if reverse else total).expand(x.shape[0])


def _genkernels_coupling(backend: str, reverse: bool, x: torch.Tensor, h: torch.Tensor):
    from genkernels.ops import affine_coupling

    return affine_coupling(x, h, scale="sigmoid", reverse=reverse, backend=backend)


def _genkernels_actnorm(backend: str, reverse: bool, x: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor):
    from genkernels.ops import actnorm

    return actnorm(x, log_scale, bias, reverse=reverse, backend=backend)


# --------------------------------------------------------------------------- inputs, references


def _inputs(
    kind: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    seed: int = SEED,
    layout: str = "contiguous",
) -> dict[str, torch.Tensor]:
    """Seeded inputs: x ~ N(0, 1); coupling: h ~ N(0, 1) (s = sigmoid(h_s + 2) mostly in (0.5, 0.99), as a
    trained Glow gives); ActNorm: float32 log_scale ~ N(0, 0.3^2) and bias ~ N(0, 0.5^2); dy ~ N(0, 1) and
    dlogdet ~ U(0.5, 1.5) (N,) float32 for the backward."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, scale: float = 1.0, image: bool = True) -> torch.Tensor:
        t = torch.randn(size, generator=g, device=device, dtype=torch.float32) * scale
        if image and layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    n, c = shape[0], shape[1]
    out = {"x": randn(*shape).to(dtype)}
    if kind == "coupling":
        out["h"] = randn(n, 2 * (c - c // 2), *shape[2:]).to(dtype)
    else:
        out["log_scale"] = randn(c, scale=0.3, image=False)
        out["bias"] = randn(c, scale=0.5, image=False)
    out["dy"] = randn(*shape).to(dtype)
    out["dlogdet"] = torch.rand(n, generator=g, device=device, dtype=torch.float32) + 0.5
    return out


def _args(kind: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (inputs["x"], inputs["h"]) if kind == "coupling" else (inputs["x"], inputs["log_scale"], inputs["bias"])


def _run(
    impl: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    args: Sequence[torch.Tensor],
    dy: torch.Tensor | None,
    dlogdet: dict[torch.dtype, torch.Tensor] | None,
) -> tuple[torch.Tensor, ...]:
    """(y, logdet) without dy; else the gradients of ``args`` from (dy, dlogdet) as the gradients of (y, logdet).

    autograd.grad: the backward without a loss's sum kernels, and nothing accumulates into .grad between
    repetitions. dlogdet comes in each dtype logdet may have (float32 from genkernels, the input dtype from
    a bf16 coupling formula), so no cast is timed.
    """
    y, logdet = impl(*args)
    if dy is None or dlogdet is None:
        return y, logdet
    return torch.autograd.grad((y, logdet), tuple(args), (dy, dlogdet[logdet.dtype]))


def _expected_of(names: Sequence[str], refs: Sequence[torch.Tensor], truths: Sequence[torch.Tensor]) -> list[Expected]:
    # logdet sums 65,536 terms per sample to about -1.3e4 here: the sums get the reductions' criterion.
    return [(expected_sum if n in SUMS else expected)(n, r, t) for n, r, t in zip(names, refs, truths)]


def _formula(kind: str, mode: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    if kind == "coupling":
        return coupling_inverse_formula if mode == "inv" else coupling_formula
    return actnorm_formula


def _reference_expected(kind: str, mode: str, inputs: dict[str, torch.Tensor]) -> list[Expected]:
    """The criterion's references: the baseline formula in the input dtype (ref) and in float64 (truth)."""
    x = inputs["x"]
    formula = _formula(kind, mode)

    def run(dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        def cast(t: torch.Tensor) -> torch.Tensor:
            # ActNorm's parameters stay float32 in ref: users' parameters are float32 whatever x's dtype.
            return t.detach().to(dtype or t.dtype).requires_grad_(mode == "fwd+bwd")

        args = tuple(cast(t) for t in _args(kind, inputs))
        if mode != "fwd+bwd":
            with torch.no_grad():
                return _run(formula, args, None, None)
        dy = inputs["dy"].to(dtype or x.dtype)
        return _run(formula, args, dy, in_dtypes(inputs["dlogdet"], (torch.float32, x.dtype, torch.float64)))

    return _expected_of(OUTPUTS[(kind, mode)], run(None), run(torch.float64))


# --------------------------------------------------------------------------- coupling and ActNorm cases


def _label(kind: str, shape: Sequence[int], dtype: torch.dtype, mode: str) -> str:
    return f"{kind} {'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]} {mode}"


class FlowOpCase(MemoryBoundCase):
    """One (op, dtype, mode) of the affine coupling ("coupling") or ActNorm ("actnorm") on a contiguous x."""

    op = OP

    def __init__(self, kind: str, dtype: torch.dtype, mode: str, shape: tuple[int, ...] = SHAPE):
        if (kind, mode) not in TENSORS_MOVED:
            raise ValueError(f"no {kind} case of mode {mode!r}; cases: {sorted(TENSORS_MOVED)}")
        super().__init__(shape, dtype, TENSORS_MOVED[(kind, mode)])
        self.kind, self.mode = kind, mode
        self.label = _label(kind, shape, dtype, mode)
        self.params: dict[str, Any] = {
            "kind": kind,
            "workload": WORKLOAD if kind == "coupling" else "Glow ActNorm, batch 64 of 32x64x64",
            "shape": list(shape),
            "dtype": DTYPE_NAMES[dtype],
            "mode": mode,
            "tensors_moved": TENSORS_MOVED[(kind, mode)],
            "baseline": "the formulas as users write them (chunk, sigmoid(h_s + 2), x_b * s + t, cat, log(s).sum)"
            if kind == "coupling"
            else "(x + bias) * exp(log_scale), float32 parameters (C,)",
        }
        if kind == "coupling":
            self.params["scale"] = "sigmoid"
        self.table = TABLES[(kind, mode)]
        self.rate_note = RATE_NOTES[(kind, mode)]

    def prepare(self, device: torch.device) -> None:
        """Seeded inputs and the references (float64 truth)."""
        inputs = _inputs(self.kind, self.shape, self.dtype, device)
        args = _args(self.kind, inputs)
        dy = dlogdet = None
        if self.mode == "fwd+bwd":
            for t in args:
                t.requires_grad_(True)
            dy = inputs["dy"]
            dlogdet = in_dtypes(inputs["dlogdet"], (torch.float32, self.dtype))
        self._state = {
            "args": args,
            "dy": dy,
            "dlogdet": dlogdet,
            "expected": _reference_expected(self.kind, self.mode, inputs),
        }

    def _fn(self, impl: Callable[..., Any]) -> Callable[[], tuple[torch.Tensor, ...]]:
        args, dy, dlogdet = self._state["args"], self._state["dy"], self._state["dlogdet"]
        if dy is None:

            def forward() -> tuple[torch.Tensor, ...]:
                with torch.no_grad():
                    return _run(impl, args, None, None)

            return forward
        return lambda: _run(impl, args, dy, dlogdet)

    def variant(self, name: str) -> Variant:
        """Build one variant and run it once; a genkernels backend is skipped only with its UnsupportedError
        reason, and must pass on every output."""
        formula = _formula(self.kind, self.mode)
        if name == EAGER:
            impl = formula
        elif name == COMPILE:
            impl = compiled(formula)
        else:
            make = _genkernels_coupling if self.kind == "coupling" else _genkernels_actnorm
            reverse = self.mode == "inv"

            def impl(*args: torch.Tensor, _make=make, _name=name, _reverse=reverse):
                return _make(_name, _reverse, *args)

        return build(name, self._fn(impl))

    def expected(self) -> list[Expected]:
        """The references of every output (y and logdet, or the gradients)."""
        return self._state["expected"]


# --------------------------------------------------------------------------- one Glow step


def glow_step_flops(shape: Sequence[int], hidden: int) -> float:
    """FLOPs of one Glow step forward + backward at x (N, C, H, W): the 1x1 convolution (C -> C) and the
    conditioner (conv3x3 Ca -> hidden, conv1x1 hidden -> hidden, conv3x3 hidden -> 2 Cb), 2 per
    multiply-add; the backward costs twice the forward (the input and the weight gradients). The
    elementwise layers (ActNorm, ReLU, the coupling) are not counted."""
    n, c = shape[0], shape[1]
    positions = n * math.prod(shape[2:])
    ca, cb = c // 2, c - c // 2
    macs = c * c + 9 * ca * hidden + hidden * hidden + 9 * hidden * 2 * cb
    return 3 * 2 * float(positions * macs)


class GlowStep(torch.nn.Module):
    """ActNorm -> InvConv1x1 -> AffineCoupling (Glow's conditioner) of ``genkernels.nn.flow``; forward(x) ->
    (y, logdet (N,) float32), the step's log-determinant the sum of its layers'."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        from genkernels.nn.flow import ActNorm, AffineCoupling, InvConv1x1

        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels)
        self.coupling = AffineCoupling(channels, hidden, scale="sigmoid")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step on genkernels' modules (the ops on the backend in scope)."""
        x, ld_act = self.actnorm(x)
        x, ld_inv = self.invconv(x)
        y, ld_coup = self.coupling(x)
        return y, ld_act + ld_inv + ld_coup


def eager_glow_step(step: GlowStep, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same step written with torch alone, on ``step``'s parameters: :func:`actnorm_formula`, the 1x1
    convolution (``conv2d`` with the module's LU-built weight), the conditioner's PyTorch layers, and
    :func:`coupling_formula`. logdet (N,) in float32 (float64 for float64 x); the coupling's sum in x's
    dtype, as users get it."""
    x, ld_act = actnorm_formula(x, step.actnorm.log_scale, step.actnorm.bias)
    w = step.invconv.weight_matrix().to(x.dtype)
    x = torch.nn.functional.conv2d(x, w[:, :, None, None])
    ld_inv = math.prod(x.shape[2:]) * step.invconv.log_s.sum()
    x_a, _ = _halves(x)
    y, ld_coup = coupling_formula(x, step.coupling.net(x_a))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return y, ld_act.to(acc) + ld_inv.to(acc) + ld_coup.to(acc)


def seeded_glow_step(
    shape: Sequence[int], hidden: int, dtype: torch.dtype, device: torch.device, seed: int = SEED
) -> tuple[GlowStep, torch.Tensor]:
    """A Glow step as after some training, and its input x (N(0, 1), in ``dtype``): seeded weights, ActNorm
    initialized on x (Glow's data-dependent init, in float32), the conditioner's zero-initialized last
    convolution given small random weights (zeros would make h = 0 and the coupling trivial), then cast to
    ``dtype`` (parameters included: a bf16 model)."""
    torch.manual_seed(seed)
    step = GlowStep(shape[1], hidden).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g, device=device, dtype=torch.float32)
    with torch.no_grad():
        step.actnorm.initialize(x)
        last = step.coupling.net[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g, device=device) * 0.01)
        last.bias.copy_(torch.randn(last.bias.shape, generator=g, device=device) * 0.1)
    return step.to(dtype).train(), x.to(dtype)


class GlowStepCase(CompiledBaselineCase):
    """One Glow step forward + backward (the gradients of x and of every parameter) at :data:`GLOW_SHAPE`."""

    op = OP
    unit = "TFLOP/s"
    kind = "glow_step"
    mode = "fwd+bwd"

    def __init__(self, shape: tuple[int, ...] = GLOW_SHAPE, hidden: int = GLOW_HIDDEN, dtype: torch.dtype = GLOW_DTYPE):
        self.shape, self.hidden, self.dtype = shape, hidden, dtype
        self.label = f"glow_step {'x'.join(map(str, shape))} h{hidden} {DTYPE_NAMES[dtype]} fwd+bwd"
        self.params: dict[str, Any] = {
            "kind": self.kind,
            "workload": "one Glow step, first level of Glow on 64x64 images (3x64x64 squeezed), batch 64",
            "shape": list(shape),
            "hidden": hidden,
            "dtype": DTYPE_NAMES[dtype],
            "mode": self.mode,
            "baseline": "the step written with torch alone on the same parameters",
        }
        self.table = TABLES[(self.kind, self.mode)]
        self.rate_note = RATE_NOTES[(self.kind, self.mode)]
        self.work = glow_step_flops(shape, hidden)
        self._state: dict[str, Any] = {}

    def prepare(self, device: torch.device) -> None:
        """The seeded step and input, dy and dlogdet, and the references: the torch-only step in the case's
        dtype (ref) and in float32 without TF32 on float32 copies of the parameters (truth)."""
        from ._model import full_fp32

        step, x = seeded_glow_step(self.shape, self.hidden, self.dtype, device)
        g = torch.Generator(device=device).manual_seed(SEED + 1)
        dy = torch.randn(tuple(self.shape), generator=g, device=device).to(self.dtype)
        dlogdet = torch.rand(self.shape[0], generator=g, device=device) + 0.5

        def run(model: GlowStep, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
            inp = x.detach().to(dtype).requires_grad_(True)
            y, logdet = eager_glow_step(model, inp)
            (dx,) = torch.autograd.grad((y, logdet), (inp,), (dy.to(dtype), dlogdet.to(logdet.dtype)))
            return y.detach(), logdet.detach(), dx

        ref = run(step, self.dtype)
        # float64 truth for a float32 step; else float32 without TF32 (float64 convolutions are slow on GPUs).
        truth_dtype = torch.float64 if self.dtype in (torch.float32, torch.float64) else torch.float32
        with full_fp32():
            truth = run(copy.deepcopy(step).to(truth_dtype), truth_dtype)
        x.requires_grad_(True)
        self._state = {
            "step": step,
            "x": x,
            "dy": dy,
            "dlogdet": dlogdet,
            "expected": _expected_of(OUTPUTS[(self.kind, self.mode)], ref, truth),
        }

    def _fn(self, impl: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        step, x, dy, dlogdet = (self._state[k] for k in ("step", "x", "dy", "dlogdet"))
        wrt = (x, *step.parameters())

        def fn() -> tuple[torch.Tensor, ...]:
            y, logdet = impl(x)
            grads = torch.autograd.grad((y, logdet), wrt, (dy, dlogdet))
            return y, logdet, grads[0]

        return fn

    def variant(self, name: str) -> Variant:
        """Build one variant and run it once: eager and torch.compile of :func:`eager_glow_step`, or the
        modules with the ops on backend ``name``."""
        step = self._state["step"]
        if name == EAGER:
            return build(name, self._fn(lambda x: eager_glow_step(step, x)))
        if name == COMPILE:
            compiled_step = compiled(eager_glow_step)
            return build(name, self._fn(lambda x: compiled_step(step, x)))
        import genkernels

        def modules(x: torch.Tensor, _name: str = name) -> tuple[torch.Tensor, torch.Tensor]:
            # The backend is chosen at the forward call; the backward runs the same backend's kernels.
            with genkernels.backend(_name):
                return step(x)

        return build(name, self._fn(modules))

    def expected(self) -> list[Expected]:
        """The references of y, logdet and dx."""
        return self._state["expected"]


def cases(quick: bool = False) -> list[Case]:
    """Coupling forward, inverse, forward + backward (float32 then bf16 each: the goals), then ActNorm
    forward and forward + backward, then the Glow step; ``quick``: the coupling forwards."""
    out: list[Case] = [FlowOpCase("coupling", dtype, mode) for mode in COUPLING_MODES for dtype in DTYPES]
    if quick:
        return out[: len(DTYPES)]
    out += [FlowOpCase("actnorm", dtype, mode) for mode in ACTNORM_MODES for dtype in DTYPES]
    out.append(GlowStepCase())
    return out


# --------------------------------------------------------------------------- summary and goals


def _order() -> list[tuple[str, torch.dtype, str]]:
    return (
        [("coupling", d, m) for m in COUPLING_MODES for d in DTYPES]
        + [("actnorm", d, m) for m in ACTNORM_MODES for d in DTYPES]
        + [("glow_step", GLOW_DTYPE, "fwd+bwd")]
    )


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per case and variant: ms, the floor, speedups vs eager and vs torch.compile, % of the ceiling (copy
    bandwidth; the Glow step: matmul rate); and the goals, each on the genkernels backend that does best."""
    by_case = records_by(records, OP, ("kind", "dtype", "mode"))
    headers = ["case", "floor ms", "variant", "ms", "vs eager", "vs torch.compile", "% of ceiling"]
    rows = case_rows(by_case, [(kind, DTYPE_NAMES[dtype], mode) for kind, dtype, mode in _order()])
    notes = [
        f"{WORKLOAD} {SHAPE}, h of the same size; ActNorm at the same shape; baseline: the formulas as users "
        "write them, eager and torch.compile; genkernels: ops.affine_coupling / ops.actnorm, one pass each way.",
        "floor ms: the bytes that must move (coupling 3 tensors forward or inverse, 7.5 forward + backward; "
        "ActNorm 2 and 5) at the copy bandwidth measured in this run; % of ceiling = floor / ms.",
        f"Glow step: {'x'.join(map(str, GLOW_SHAPE))}, hidden {GLOW_HIDDEN}, {DTYPE_NAMES[GLOW_DTYPE]}; floor = "
        "its convolutions' FLOPs at the bf16 matmul rate; the flow ops are a small part of its time.",
        "Goals on the coupling op per dtype (forward and inverse: >= 2.5x eager and >= 1.0x torch.compile; "
        "forward + backward: >= 2x eager) and the Glow step (>= 1.0x eager), each on the genkernels backend "
        "that does best; ActNorm is reported without a goal.",
    ]
    return OpSummary(OP, headers, rows, _goals(by_case), notes)


def _goals(by_case: dict[tuple, CaseRecord]) -> list[Goal]:
    goals = []
    shape = "x".join(map(str, SHAPE))
    for mode in COUPLING_MODES:
        for dtype in DTYPES:
            rec = by_case.get(("coupling", DTYPE_NAMES[dtype], mode))
            what = f"coupling {DTYPE_NAMES[dtype]} {mode} {shape}, speedup"
            goals.append(speedup_goal(rec, f"{what} vs eager", EAGER, EAGER_GOAL[mode]))
            if mode in COMPILE_GOAL:
                goals.append(speedup_goal(rec, f"{what} vs torch.compile", COMPILE, COMPILE_GOAL[mode]))
    rec = by_case.get(("glow_step", DTYPE_NAMES[GLOW_DTYPE], "fwd+bwd"))
    name = f"Glow step {DTYPE_NAMES[GLOW_DTYPE]} fwd+bwd {'x'.join(map(str, GLOW_SHAPE))}, speedup vs eager"
    goals.append(speedup_goal(rec, name, EAGER, GLOW_GOAL))
    return goals


# --------------------------------------------------------------------------- CPU self-check

#: Small shapes for the CPU check (the Triton interpreter is slow): a block-aligned one, odd sizes (C odd:
#: Ca = 2, Cb = 3), channels_last, and a single position.
SELF_CHECK_CASES: tuple[tuple[tuple[int, ...], str], ...] = (
    ((2, 4, 8, 8), "contiguous"),
    ((3, 5, 7, 3), "contiguous"),
    ((2, 6, 5, 5), "channels_last"),
    ((2, 4, 1, 1), "contiguous"),
)
#: (op, mode) checked: every direction of both ops (the inverse too: it is what sampling runs).
SELF_CHECK_MODES = (
    ("coupling", "fwd"),
    ("coupling", "inv"),
    ("coupling", "fwd+bwd"),
    ("actnorm", "fwd"),
    ("actnorm", "inv"),
    ("actnorm", "fwd+bwd"),
)


def _self_check_expected(kind: str, mode: str, inputs: dict[str, torch.Tensor]) -> list[Expected]:
    if mode != "inv" or kind == "coupling":
        return _reference_expected(kind, mode, inputs)

    # ActNorm's inverse (no bench case): the formula with reverse=True, in the input dtype and in float64.
    def run(dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        args = [t.to(dtype or t.dtype) for t in _args(kind, inputs)]
        return actnorm_formula(*args, reverse=True)

    return _expected_of(OUTPUTS[(kind, "fwd")], run(None), run(torch.float64))


def self_check(backend: str) -> SelfCheck:
    """Check one genkernels backend on CPU against float64 truth (the test criterion): the sigmoid coupling
    forward (y, logdet), inverse (x, logdet) and forward + backward (dx, dh), and ActNorm forward, inverse
    and forward + backward (dx, dlog_scale, dbias), on small shapes (odd sizes, channels_last, H*W = 1).

    bf16 is left out for triton: the interpreter mishandles it (shared/DESIGN.md). Returns "ok",
    "failed" (wrong numbers, or an error other than UnsupportedError) or "skipped" (the backend's
    reason for not running on this machine).
    """
    try:
        from genkernels import UnsupportedError
        from genkernels.ops import actnorm, affine_coupling  # noqa: F401 - the op module itself must import
    except Exception as e:  # noqa: BLE001 - the op module itself does not import
        return import_failed(OP, backend, "genkernels.ops.affine_coupling", e)
    device = torch.device("cpu")
    dtypes = self_check_dtypes(backend)
    tally = SelfCheckTally(OP, backend)
    for dtype in dtypes:
        for shape, layout in SELF_CHECK_CASES:
            for kind, mode in SELF_CHECK_MODES:
                label = f"{kind} {'x'.join(map(str, shape))} {layout} {DTYPE_NAMES[dtype]} {mode}"
                seed = tally.ran + len(tally.skips)
                inputs = _inputs(kind, shape, dtype, device, seed=seed, layout=layout)
                args = _args(kind, inputs)
                dy = dlogdet = None
                if mode == "fwd+bwd":
                    for t in args:
                        t.requires_grad_(True)
                    dy, dlogdet = inputs["dy"], in_dtypes(inputs["dlogdet"], (torch.float32, dtype))
                make = _genkernels_coupling if kind == "coupling" else _genkernels_actnorm

                def impl(*a: torch.Tensor, _make=make, _reverse=mode == "inv"):
                    return _make(backend, _reverse, *a)

                def call(_impl=impl, _args=args, _dy=dy, _dlogdet=dlogdet) -> tuple[torch.Tensor, ...]:
                    with torch.set_grad_enabled(_dy is not None):
                        return _run(_impl, _args, _dy, _dlogdet)

                expect = functools.partial(_self_check_expected, kind, mode, inputs)
                failure = check_one(tally, label, call, expect, skip=(UnsupportedError,))
                if failure is not None:
                    return failure
    return tally.result(dtypes, "coupling and ActNorm: fwd, inv and fwd+bwd")
