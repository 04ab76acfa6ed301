"""Normalizing-flow steps with exact log-determinants: the affine coupling and ActNorm ops (reference,
validation, dispatch, autograd and torch.library ops).

Affine coupling. x (N, C, *) splits along channels into x_a = x[:, :Ca] and x_b = x[:, Ca:]
(Ca = C // 2, Cb = C - Ca). The conditioner output h (N, 2 Cb, *) holds the scale pre-activation
h_s = h[:, :Cb] and the shift t = h[:, Cb:] (additive coupling: h (N, Cb, *) is t alone). Then

    y_a = x_a,   y_b = x_b * s + t,   logdet[n] = sum over the b-channels and positions of log s
    reverse:     x_b = (y_b - t) * exp(-log s),   logdet = -sum log s

with log s a function of h_s (g = d log s / d h_s, used by the backward):

    exp              log s = h_s                               g = 1                       (RealNVP)
    sigmoid          log s = logsigmoid(h_s + 2)               g = 1 - sigmoid(h_s + 2)    (Glow)
    softclamp_tanh   log s = clamp * tanh(h_s / clamp)         g = 1 - tanh(h_s / clamp)^2
    softclamp_atan   log s = 0.636 clamp atan(h_s / clamp)     g = 0.636 / (1 + (h_s / clamp)^2)
    additive         log s = 0                                                              (NICE)

and s = exp(log s). Gradients (forward direction): dx_a = dy_a, dx_b = dy_b * s, dt = dy_b,
dh_s = (dy_b * x_b * s + dlogdet[n]) * g.

ActNorm. Per channel, y = (x + bias) * exp(log_scale), logdet[n] = S * sum(log_scale) with S the
product of the spatial sizes; reverse: x = y * exp(-log_scale) - bias, logdet = -S * sum(log_scale).
Gradients: dx = dy * exp(ls), dbias = exp(ls) * sum_{n,s} dy, dlog_scale = exp(ls) * sum_{n,s} dy *
(x + bias) + S * sum_n dlogdet[n] (the kernels sum dy * (x + bias) itself: sum dy x + bias sum dy would
cancel where |bias| is large against x + bias, as after ActNorm's initialization on data far from zero).

Everything is float32 (float64 for float64 inputs on the reference); log-determinants and the
per-channel sums accumulate in float32. Differentiated calls in the reverse direction (the sampling
direction) run on the reference, which autograd differentiates; the fused backward kernels serve
the forward direction, which training uses.

Fused backend interface (genkernels.triton.coupling and genkernels.cuda.coupling implement it; the
reference below does too). x is dense (contiguous or channels_last; anything else was copied once
to contiguous), every other big tensor in x's layout, numel > 0:

    coupling_not_supported(x, h, scale, reverse) -> str | None
    coupling_forward(x, h, scale, clamp, reverse, want_logdet) -> (y, logdet float32 (N,) or None)
    coupling_backward(dy, dlogdet, x, h, scale, clamp, need_dx, need_dh) -> (dx or None, dh or None)
        forward direction; dy None (zero) or in x's layout; dlogdet None (zero) or float32 (N,)
    actnorm_not_supported(x, log_scale, bias, reverse) -> str | None
    actnorm_forward(x, log_scale, bias, reverse) -> y                 log_scale, bias: float32 (C,)
    actnorm_backward(dy, x, log_scale, bias, need_dx) -> (dx or None, sum_dy (C,), sum_dy_xb (C,))
        forward direction; sum_dy_xb = sum dy * (x + bias); the sums are float32 over the batch and the
        positions (float64 for float64 inputs on the reference).

Each fast kernel reads its inputs once and writes each output once; the reductions come from fixed
per-chunk partials merged in a fixed order (deterministic, no atomics, no host synchronization).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _autograd, _registry
from .._checks import is_finite_real
from .._layout import dense_layout, match_layout
from ..cuda import coupling as _cuda
from ..triton import coupling as _triton

COUPLING_OP = "affine_coupling"
ACTNORM_OP = "actnorm"
SCALES = ("exp", "sigmoid", "softclamp_tanh", "softclamp_atan", "additive")
ATAN_FACTOR = 0.636
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- validation


def _check_image(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must be (N, C, *), got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def h_channels(channels: int, scale: str) -> int:
    """Channels of the conditioner output h for x with ``channels`` channels: 2 (C - C // 2), or
    C - C // 2 for the additive coupling (the shift alone)."""
    cb = channels - channels // 2
    return cb if scale == "additive" else 2 * cb


def _check_coupling(x, h, scale, clamp, reverse) -> float:
    _check_image("x", x)
    if x.shape[1] < 2:
        raise ValueError(f"x must have at least 2 channels to split, got shape {tuple(x.shape)}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not (is_finite_real(clamp) and clamp > 0):
        raise ValueError(f"clamp must be a finite float > 0, got {clamp!r}")
    _check_flag("reverse", reverse)
    _check_image("h", h)
    want = (x.shape[0], h_channels(x.shape[1], scale), *x.shape[2:])
    if tuple(h.shape) != want:
        what = "the shift t" if scale == "additive" else "the scale pre-activation h_s, then the shift t"
        raise ValueError(
            f"h must have shape {want} for x of shape {tuple(x.shape)} and scale={scale!r} ({what} along dim 1), "
            f"got {tuple(h.shape)}"
        )
    if h.dtype != x.dtype:
        raise TypeError(f"h has dtype {h.dtype} but x has {x.dtype}: they must share one dtype")
    if h.device != x.device:
        raise ValueError(f"h is on {h.device} but x is on {x.device}: use one device")
    return float(clamp)


def _check_actnorm(x, log_scale, bias, reverse) -> None:
    _check_image("x", x)
    for name, p in (("log_scale", log_scale), ("bias", bias)):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
        if tuple(p.shape) != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},) (one per channel of x), got {tuple(p.shape)}")
        if p.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}: use one device")
    _check_flag("reverse", reverse)


# --------------------------------------------------------------------------- reference


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def log_scale_of(hs: Tensor, scale: str, clamp: float) -> Tensor:
    """log s as a function of the scale pre-activation h_s (any float tensor; see the module docstring)."""
    if scale == "exp":
        return hs
    if scale == "sigmoid":
        return torch.nn.functional.logsigmoid(hs + 2.0)
    if scale == "softclamp_tanh":
        return clamp * torch.tanh(hs / clamp)
    if scale == "softclamp_atan":
        return ATAN_FACTOR * clamp * torch.atan(hs / clamp)
    raise ValueError(f"scale {scale!r} has no h_s")


def _log_scale_grad(hs: Tensor, scale: str, clamp: float) -> Tensor:
    """g = d log s / d h_s (see the module docstring)."""
    if scale == "exp":
        return torch.ones_like(hs)
    if scale == "sigmoid":
        return torch.sigmoid(-(hs + 2.0))
    if scale == "softclamp_tanh":
        return 1.0 - torch.tanh(hs / clamp) ** 2
    return ATAN_FACTOR / (1.0 + (hs / clamp) ** 2)


def _split(x: Tensor, h: Tensor, scale: str, clamp: float):
    """(x_a, x_b, log s or None, t) in the accumulation dtype."""
    acc = _acc(x)
    ca = x.shape[1] // 2
    cb = x.shape[1] - ca
    xa, xb = x[:, :ca], x[:, ca:].to(acc)
    if scale == "additive":
        return xa, xb, None, h.to(acc)
    return xa, xb, log_scale_of(h[:, :cb].to(acc), scale, clamp), h[:, cb:].to(acc)


def _reference_coupling_forward(x, h, scale, clamp, reverse, want_logdet):
    xa, xb, logs, t = _split(x, h, scale, clamp)
    if logs is None:
        yb = xb - t if reverse else xb + t
    else:
        yb = (xb - t) * torch.exp(-logs) if reverse else xb * torch.exp(logs) + t
    y = match_layout(torch.cat([xa, yb.to(x.dtype)], dim=1), x)
    logdet = None
    if want_logdet:
        if logs is None:
            logdet = torch.zeros(x.shape[0], dtype=_acc(x), device=x.device)
        else:
            logdet = logs.flatten(1).sum(1)
            logdet = -logdet if reverse else logdet
    return y, logdet


def _reference_coupling_backward(dy, dlogdet, x, h, scale, clamp, need_dx, need_dh):
    acc = _acc(x)
    ca = x.shape[1] // 2
    cb = x.shape[1] - ca
    dy = torch.zeros(x.shape, dtype=acc, device=x.device) if dy is None else dy.to(acc)
    dya, dyb = dy[:, :ca], dy[:, ca:]
    if scale == "additive":
        s = torch.ones_like(dyb)
        dh = dyb
    else:
        hs = h[:, :cb].to(acc)
        s = torch.exp(log_scale_of(hs, scale, clamp))
        g = _log_scale_grad(hs, scale, clamp)
        shape = (-1,) + (1,) * (x.dim() - 1)
        extra = 0.0 if dlogdet is None else dlogdet.to(acc).view(shape)
        dh = torch.cat([(dyb * x[:, ca:].to(acc) * s + extra) * g, dyb], dim=1)
    dx = match_layout(torch.cat([dya, dyb * s], dim=1).to(x.dtype), x) if need_dx else None
    return dx, (match_layout(dh.to(h.dtype), h) if need_dh else None)


def _reference_actnorm_forward(x, log_scale, bias, reverse):
    acc = _acc(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    ls, b = log_scale.to(acc).view(shape), bias.to(acc).view(shape)
    y = x.to(acc) * torch.exp(-ls) - b if reverse else (x.to(acc) + b) * torch.exp(ls)
    return match_layout(y.to(x.dtype), x)


def _reference_actnorm_backward(dy, x, log_scale, bias, need_dx):
    acc = _acc(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    g = dy.to(acc)
    dims = (0, *range(2, x.dim()))
    dx = match_layout((g * torch.exp(log_scale.to(acc).view(shape))).to(x.dtype), x) if need_dx else None
    return dx, g.sum(dims), (g * (x.to(acc) + bias.to(acc).view(shape))).sum(dims)


def _none(*args, **kwargs) -> None:
    return None


class _ReferenceKernels:
    """The reference formulas behind the same interface as the fast backends."""

    coupling_not_supported = staticmethod(_none)
    coupling_forward = staticmethod(_reference_coupling_forward)
    coupling_backward = staticmethod(_reference_coupling_backward)
    actnorm_not_supported = staticmethod(_none)
    actnorm_forward = staticmethod(_reference_actnorm_forward)
    actnorm_backward = staticmethod(_reference_actnorm_backward)


# --------------------------------------------------------------------------- registry


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _fast_reason(reverse: bool, needs_grad: bool | None, *tensors) -> str | None:
    """Reasons shared by the fast backends: dtype, and no fused backward of the reverse direction."""
    for t in tensors:
        if t.dtype not in FAST_DTYPES:
            return f"dtype {t.dtype}; supported: float32, float16, bfloat16"
    if reverse and (needs_grad if needs_grad is not None else _needs_grad(*tensors)):
        return (
            "no fused backward for reverse=True (the sampling direction): differentiated inverse calls run on "
            "the reference"
        )
    return None


def _wrap_coupling(backend_not_supported):
    """A not_supported taking affine_coupling's public arguments (as `genkernels.explain` passes them)."""

    def not_supported(x, h, scale="sigmoid", clamp=2.0, reverse=False, *, needs_grad=None, **_rest) -> str | None:
        reason = _fast_reason(reverse, needs_grad, x, h)
        return reason if reason is not None else backend_not_supported(x, h, scale, reverse)

    return not_supported


def _wrap_actnorm(backend_not_supported):
    """A not_supported taking actnorm's public arguments (as `genkernels.explain` passes them)."""

    def not_supported(x, log_scale, bias, reverse=False, *, needs_grad=None, **_rest) -> str | None:
        grad = needs_grad if needs_grad is not None else _needs_grad(x, log_scale, bias)
        reason = _fast_reason(reverse, grad, x)
        return reason if reason is not None else backend_not_supported(x, log_scale, bias, reverse)

    return not_supported


for _name, _module in (("cuda", _cuda), ("triton", _triton)):
    _registry.register(COUPLING_OP, _name, _wrap_coupling(_module.coupling_not_supported), _module)
    _registry.register(ACTNORM_OP, _name, _wrap_actnorm(_module.actnorm_not_supported), _module)
_registry.register(COUPLING_OP, "reference", _none, _ReferenceKernels)
_registry.register(ACTNORM_OP, "reference", _none, _ReferenceKernels)


def _coupling_probe(device: torch.device) -> tuple:
    """Arguments of a typical call (a Glow coupling at 32x32 after a squeeze), for `genkernels.info()`."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(4, 12, 16, 16, device=device, dtype=dtype)
    return (x, torch.randn(4, 12, 16, 16, device=device, dtype=dtype), {"scale": "sigmoid"})


def _actnorm_probe(device: torch.device) -> tuple:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(4, 12, 16, 16, device=device, dtype=dtype)
    return (x, torch.zeros(12, device=device), torch.zeros(12, device=device))


_registry.register_probe(COUPLING_OP, _coupling_probe)
_registry.register_probe(ACTNORM_OP, _actnorm_probe)


def _select(op: str, backend: str | None, *args, needs_grad: bool):
    """The implementation that runs this call (the reference, without a launch, for empty inputs)."""
    if args[0].numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(op, *args, needs_grad=needs_grad, backend=backend or None)
        return _ReferenceKernels
    return _registry.select(op, *args, needs_grad=needs_grad, backend=backend or None).impl


# --------------------------------------------------------------------------- autograd (eager path)


class _CouplingFunction(torch.autograd.Function):
    """Forward direction through a fast backend, with its fused backward."""

    @staticmethod
    def forward(ctx, x, h, scale, clamp, impl):
        y, logdet = impl.coupling_forward(x, h, scale, clamp, False, True)
        ctx.save_for_backward(x, h)
        ctx.args = (scale, clamp, impl)
        ctx.set_materialize_grads(False)
        return y, logdet

    @staticmethod
    @_autograd.first_order_only(COUPLING_OP)  # create_graph=True: an explicit error, never a silent zero
    def backward(ctx, dy, dlogdet):
        x, h = ctx.saved_tensors
        scale, clamp, impl = ctx.args
        needs = ctx.needs_input_grad
        dy = None if dy is None else match_layout(dy, x)
        dlogdet = None if dlogdet is None else dlogdet.float().contiguous()
        dx, dh = impl.coupling_backward(dy, dlogdet, x, h, scale, clamp, needs[0], needs[1])
        return dx, dh, None, None, None


class _ActNormFunction(torch.autograd.Function):
    """Forward direction through a fast backend: y only (the log-det is a torch expression of log_scale)."""

    @staticmethod
    def forward(ctx, x, log_scale, bias, impl):
        ls, b = log_scale.float().contiguous(), bias.float().contiguous()
        ctx.save_for_backward(x, ls, b)
        ctx.impl = impl
        ctx.dtypes = (log_scale.dtype, bias.dtype)
        return impl.actnorm_forward(x, ls, b, False)

    @staticmethod
    @_autograd.first_order_only(ACTNORM_OP)  # create_graph=True: an explicit error, never a silent zero
    def backward(ctx, dy):
        x, ls, b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, sum_dy, sum_dy_xb = ctx.impl.actnorm_backward(match_layout(dy, x), x, ls, b, needs[0])
        e = torch.exp(ls)
        dls = (e * sum_dy_xb).to(ctx.dtypes[0]) if needs[1] else None
        db = (e * sum_dy).to(ctx.dtypes[1]) if needs[2] else None
        return dx, dls, db, None


# --------------------------------------------------------------------------- torch.library ops (traced path)


# Explicit schemas: torch 2.4 cannot infer them from postponed (string) annotations.
@torch.library.custom_op(
    "genkernels::affine_coupling",
    mutates_args=(),
    schema="(Tensor x, Tensor h, str scale, float clamp, bool reverse, str backend) -> (Tensor, Tensor)",
)
def _coupling_op(x: Tensor, h: Tensor, scale: str, clamp: float, reverse: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Either direction; only the forward direction is differentiable here (a differentiated reverse call
    runs the reference formulas in the graph instead)."""
    x = dense_layout(x)
    h = match_layout(h, x)
    impl = _select(COUPLING_OP, backend, x, h, scale, clamp, reverse, needs_grad=False)
    return impl.coupling_forward(x, h, scale, clamp, reverse, True)


@_coupling_op.register_fake
def _(x, h, scale, clamp, reverse, backend):
    return torch.empty_like(dense_layout(x)), x.new_empty((x.shape[0],), dtype=_acc(x))


@torch.library.custom_op(
    "genkernels::affine_coupling_backward",
    mutates_args=(),
    schema="(Tensor? dy, Tensor? dlogdet, Tensor x, Tensor h, str scale, float clamp, bool need_dx, bool need_dh,"
    " str backend) -> (Tensor, Tensor)",
)
def _coupling_backward_op(
    dy: Tensor | None,
    dlogdet: Tensor | None,
    x: Tensor,
    h: Tensor,
    scale: str,
    clamp: float,
    need_dx: bool,
    need_dh: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dx, dh); an empty tensor for a gradient not needed (ops cannot return None)."""
    x = dense_layout(x)
    h = match_layout(h, x)
    impl = _select(COUPLING_OP, backend, x, h, scale, clamp, False, needs_grad=False)
    dy = None if dy is None else match_layout(dy, x)
    dlogdet = None if dlogdet is None else dlogdet.to(_acc(x)).contiguous()
    dx, dh = impl.coupling_backward(dy, dlogdet, x, h, scale, clamp, need_dx, need_dh)
    # Each absent gradient its own empty tensor: outputs of a custom op may not alias one another.
    return (dx if dx is not None else x.new_empty((0,))), (dh if dh is not None else x.new_empty((0,)))


@_coupling_backward_op.register_fake
def _(dy, dlogdet, x, h, scale, clamp, need_dx, need_dh, backend):
    dx = torch.empty_like(dense_layout(x)) if need_dx else x.new_empty((0,))
    dh = torch.empty_like(match_layout(h, dense_layout(x))) if need_dh else x.new_empty((0,))
    return dx, dh


def _coupling_setup(ctx, inputs, output):
    x, h, scale, clamp, reverse, backend = inputs
    ctx.save_for_backward(x, h)
    ctx.args = (scale, clamp, reverse, backend)


def _coupling_backward(ctx, dy, dlogdet):
    x, h = ctx.saved_tensors
    scale, clamp, reverse, backend = ctx.args
    if reverse:  # affine_coupling never traces a differentiated reverse call through this op
        raise RuntimeError("genkernels::affine_coupling: no backward for reverse=True; call affine_coupling()")
    need_dx, need_dh = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dh = _coupling_backward_op(dy, dlogdet, x, h, scale, clamp, need_dx, need_dh, backend)
    return (dx if need_dx else None), (dh if need_dh else None), None, None, None, None


_coupling_op.register_autograd(_coupling_backward, setup_context=_coupling_setup)


@torch.library.custom_op(
    "genkernels::actnorm",
    mutates_args=(),
    schema="(Tensor x, Tensor log_scale, Tensor bias, bool reverse, str backend) -> Tensor",
)
def _actnorm_op(x: Tensor, log_scale: Tensor, bias: Tensor, reverse: bool, backend: str) -> Tensor:
    x = dense_layout(x)
    impl = _select(ACTNORM_OP, backend, x, log_scale, bias, reverse, needs_grad=False)
    acc = _acc(x)  # float32 for the kernels; float64 for float64 x (the reference only, as on the eager path)
    return impl.actnorm_forward(x, log_scale.to(acc).contiguous(), bias.to(acc).contiguous(), reverse)


@_actnorm_op.register_fake
def _(x, log_scale, bias, reverse, backend):
    return torch.empty_like(dense_layout(x))


@torch.library.custom_op(
    "genkernels::actnorm_backward",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor log_scale, Tensor bias, bool need_dx, str backend)"
    " -> (Tensor, Tensor, Tensor)",
)
def _actnorm_backward_op(
    dy: Tensor, x: Tensor, log_scale: Tensor, bias: Tensor, need_dx: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx or empty, sum_dy, sum_dy_xb) of the forward direction."""
    x = dense_layout(x)
    impl = _select(ACTNORM_OP, backend, x, log_scale, bias, False, needs_grad=False)
    acc = _acc(x)
    dx, sum_dy, sum_dy_xb = impl.actnorm_backward(
        match_layout(dy, x), x, log_scale.to(acc).contiguous(), bias.to(acc).contiguous(), need_dx
    )
    return (dx if dx is not None else x.new_empty((0,))), sum_dy, sum_dy_xb


@_actnorm_backward_op.register_fake
def _(dy, x, log_scale, bias, need_dx, backend):
    dx = torch.empty_like(dense_layout(x)) if need_dx else x.new_empty((0,))
    acc = _acc(x)
    return dx, x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


def _actnorm_setup(ctx, inputs, output):
    x, log_scale, bias, reverse, backend = inputs
    ctx.save_for_backward(x, log_scale, bias)
    ctx.backend, ctx.reverse = backend, reverse


def _actnorm_backward(ctx, dy):
    if ctx.reverse:  # actnorm never traces a differentiated reverse call through this op
        raise RuntimeError("genkernels::actnorm: no backward for reverse=True; call actnorm()")
    x, log_scale, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, sum_dy, sum_dy_xb = _actnorm_backward_op(dy, x, log_scale, bias, needs[0], ctx.backend)
    e = torch.exp(log_scale.to(sum_dy.dtype))
    dls = (e * sum_dy_xb).to(log_scale.dtype) if needs[1] else None
    db = (e * sum_dy).to(bias.dtype) if needs[2] else None
    return (dx if needs[0] else None), dls, db, None, None


_actnorm_op.register_autograd(_actnorm_backward, setup_context=_actnorm_setup)


# --------------------------------------------------------------------------- public ops


def _refuse_differentiated_reverse(op: str, backend: str | None) -> None:
    """Under torch.compile a differentiated reverse call runs the reference formulas in the graph: an
    explicitly requested fast backend cannot run it (as on the eager path)."""
    if backend in ("triton", "cuda"):
        raise _registry.UnsupportedError(
            f"{op}: backend {backend!r} cannot run this call: no fused backward for reverse=True"
        )


def affine_coupling(
    x: Tensor,
    h: Tensor,
    *,
    scale: str = "sigmoid",
    clamp: float = 2.0,
    reverse: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """An affine coupling step and its log-determinant, in one pass (see the module docstring).

        y_a = x_a,  y_b = x_b * s(h_s) + t,  logdet[n] = sum log s(h_s)     (reverse: the inverse map)

    Args:
        x: (N, C, *) with C >= 2, float32, float16 or bfloat16 (float64: reference only); x_a is
            the first C // 2 channels. Contiguous and channels_last run in place (other strides
            are copied once); y keeps x's layout.
        h: the conditioner output, (N, 2 (C - C // 2), *): the scale pre-activation h_s, then the
            shift t; for ``scale="additive"`` (N, C - C // 2, *), the shift alone. x's dtype and device.
        scale: "exp" (RealNVP), "sigmoid" (Glow: s = sigmoid(h_s + 2)), "softclamp_tanh"
            (s = exp(clamp tanh(h_s / clamp))), "softclamp_atan" (s = exp(0.636 clamp atan(h_s /
            clamp))) or "additive" (NICE: s = 1).
        clamp: the soft clamp's bound on |log s| (softclamp modes).
        reverse: the inverse map (the input is y; returns x and -sum log s).
        backend: "auto" / None, "reference", "triton" or "cuda".

    Returns (y, logdet): y in x's dtype, shape and layout; logdet float32 (N,) (float64 for float64
    inputs). Differentiable in x and h: the forward direction through a fused backward kernel (first
    order), the reverse direction on the reference (any order).
    """
    clamp = _check_coupling(x, h, scale, clamp, reverse)
    needs_grad = _needs_grad(x, h)
    if torch.compiler.is_compiling():
        if not (reverse and needs_grad):
            return _coupling_op(x, h, scale, clamp, reverse, backend or "")
        _refuse_differentiated_reverse(COUPLING_OP, backend)
        x = dense_layout(x)
        return _reference_coupling_forward(x, match_layout(h, x), scale, clamp, True, True)
    x = dense_layout(x)
    h = match_layout(h, x)
    impl = _select(COUPLING_OP, backend, x, h, scale, clamp, reverse, needs_grad=needs_grad)
    if impl is _ReferenceKernels:  # autograd differentiates the formulas (the reverse direction included)
        return _reference_coupling_forward(x, h, scale, clamp, reverse, True)
    if not needs_grad:
        return impl.coupling_forward(x, h, scale, clamp, reverse, True)
    return _autograd.apply(_CouplingFunction, x, h, scale, clamp, impl)


def actnorm(
    x: Tensor,
    log_scale: Tensor,
    bias: Tensor,
    *,
    reverse: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """ActNorm and its log-determinant: y = (x + bias) * exp(log_scale) per channel, in one pass.

    Args:
        x: (N, C, *) float32, float16 or bfloat16 (float64: reference only), contiguous or
            channels_last (other strides are copied once); y keeps x's layout.
        log_scale, bias: (C,) on x's device, any float dtype (the kernels read them as float32;
            gradients come back in their own dtype).
        reverse: the inverse map, x = y * exp(-log_scale) - bias.
        backend: "auto" / None, "reference", "triton" or "cuda".

    Returns (y, logdet): y in x's dtype, shape and layout; logdet = S * sum(log_scale) for every
    sample (negated in reverse), float32 (N,) (float64 for float64 inputs), S the product of the
    spatial sizes (1 for (N, C) inputs). Differentiable in x, log_scale and bias: the forward
    direction through a fused backward kernel (dx and the per-channel sums in one pass), the reverse
    direction on the reference.
    """
    _check_actnorm(x, log_scale, bias, reverse)
    acc = _acc(x)
    positions = math.prod(x.shape[2:])
    total = log_scale.to(acc).sum() * positions
    logdet = (-total if reverse else total).expand(x.shape[0]).contiguous()  # a real (N,) tensor, writable
    needs_grad = _needs_grad(x, log_scale, bias)
    if torch.compiler.is_compiling():
        if not (reverse and needs_grad):
            return _actnorm_op(x, log_scale, bias, reverse, backend or ""), logdet
        _refuse_differentiated_reverse(ACTNORM_OP, backend)
        return _reference_actnorm_forward(dense_layout(x), log_scale, bias, True), logdet
    x = dense_layout(x)
    impl = _select(ACTNORM_OP, backend, x, log_scale, bias, reverse, needs_grad=needs_grad)
    if impl is _ReferenceKernels:
        return _reference_actnorm_forward(x, log_scale, bias, reverse), logdet
    if not needs_grad:
        return impl.actnorm_forward(x, log_scale.float().contiguous(), bias.float().contiguous(), reverse), logdet
    return _autograd.apply(_ActNormFunction, x, log_scale, bias, impl), logdet


__all__ = ["ATAN_FACTOR", "SCALES", "actnorm", "affine_coupling", "h_channels", "log_scale_of"]


_registry.register_check(COUPLING_OP, affine_coupling, _check_coupling)
_registry.register_check(ACTNORM_OP, actnorm, _check_actnorm)
