"""The modulated convolution of StyleGAN2, around its (unmodulated-weight) convolution: the
demodulation coefficients and the fused epilogue. Reference, validation, dispatch and autograd.

StyleGAN2's modulated convolution with weight w (O, I, kh, kw), styles s (N, I) and input x is

    conv(x * s[n, i], w)[n, o] * dcoef[n, o]      (+ noise * strength + bias, activation)

that is: scale the input channels by the styles, run one ordinary convolution with the shared weight
(no per-sample weights), then scale each output channel by the demodulation coefficient

    dcoef[n, o] = rsqrt( sum_{i,k} (w[o, i, k] * s[n, i])^2 + eps ) = rsqrt( sum_i s[n, i]^2 W2[o, i] + eps ),
    W2[o, i] = sum_k w[o, i, k]^2                                          (demodulation_coefficients)

and finish with the epilogue, one pass over the convolution's output y (modconv_epilogue):

    z[n, o, h, w] = y[n, o, h, w] * dcoef[n, o] + noise[n, 0, h, w] * strength + bias[o]
    out = clamp(act(z) * gain)                      (act, alpha, gain, clamp as genkernels.ops.bias_act)

Gradients (first order). demodulation_coefficients, with G = grad * dcoef^3 (N, O):

    d s[n, i] = -s[n, i] sum_o G[n, o] W2[o, i],   d w[o, i, k] = -w[o, i, k] sum_n G[n, o] s[n, i]^2.

modconv_epilogue, with g = dout * gain * act'(z) * m (m: the clamp's pass mask; bias_act's gradient map,
in torch's order at non-finite values):

    dy = g * dcoef,  d dcoef[n, o] = sum_{h,w} g y,  d bias[o] = sum_{n,h,w} g,
    d strength = sum g noise,  d noise[n, 0, h, w] = sum_o g strength.

Arithmetic is float32 (float64 for float64 inputs on the reference).

Fused backend interface (genkernels.triton.modconv and genkernels.cuda.modconv implement it):

    demod_not_supported(weight, styles) -> str | None
    demod_forward(weight3, styles, eps) -> dcoef
        weight3 (O, I, K) contiguous in its own dtype (float32 / float16 / bfloat16), styles float32
        contiguous (N, I); returns float32 (N, O).
    demod_backward(grad, dcoef, weight3, styles) -> (d_weight3, d_styles)
        grad, dcoef float32 contiguous (N, O); returns float32 (O, I, K) and (N, I).
    epilogue_not_supported(y, dcoef, noise, bias, act) -> str | None
    epilogue_forward(y, dcoef32, noise, strength32, bias32, act, alpha, gain, clamp) -> out
        y dense (contiguous or channels_last), numel > 0; dcoef32 None or float32 (N, C); noise None or
        contiguous (Nn, 1, H, W), Nn in {1, N}; strength32 None (strength 1) or a float32 (1,) tensor
        read on the device; bias32 None or float32 (C,). Returns out like y.
    epilogue_backward(dout, y, dcoef32, noise, strength32, bias32, act, alpha, gain, clamp,
                      need_dcoef, need_bias, need_strength) -> (dy, ddcoef32, dbias32, dstrength32)
        dy like y; the others float32 (N, C), (C,), (1,) or None when not needed, reduced from
        per-block partials in a fixed order (deterministic).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .. import _autograd, _registry
from .._checks import is_finite_real
from .._layout import contiguous_or_none, dense_layout, match_layout
from ..cuda import modconv as _cuda
from ..triton import modconv as _triton
from .bias_act import ACTS as ACTS  # the activations the epilogue takes (tests and callers read them here)
from .bias_act import _act, _grad_map, act_params

DEMOD_OP = "demodulation_coefficients"
EPILOGUE_OP = "modconv_epilogue"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


# --------------------------------------------------------------------------- validation


def _float_tensor(t, name: str, device: torch.device, like: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be {_DTYPE_NAMES}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {like} is on {device}: use one device")


def _check_demod(weight, styles, eps) -> float:
    """Raise a clear error naming the argument; returns eps as a float."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in DTYPES:
        raise TypeError(f"weight must be {_DTYPE_NAMES}, got {weight.dtype}")
    if weight.dim() not in (2, 4):
        raise ValueError(f"weight must have shape (O, I, kh, kw) or (O, I), got {tuple(weight.shape)}")
    _float_tensor(styles, "styles", weight.device, "weight")
    if styles.dim() != 2 or styles.shape[1] != weight.shape[1]:
        raise ValueError(
            f"styles must have shape (N, {weight.shape[1]}) (I = weight.shape[1]), got {tuple(styles.shape)}"
        )
    if not (is_finite_real(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    return float(eps)


def _check_epilogue(y, dcoef, noise, noise_strength, bias, act, alpha, gain, clamp):
    """Raise a clear error naming the argument; returns (noise_strength, alpha, gain, clamp) with defaults filled
    in, a number noise_strength as a Python float."""
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype not in DTYPES:
        raise TypeError(f"y must be {_DTYPE_NAMES}, got {y.dtype}")
    if y.dim() != 4:
        raise ValueError(f"y must have shape (N, C, H, W), got {tuple(y.shape)}")
    n, c, h, w = y.shape
    if dcoef is not None:
        _float_tensor(dcoef, "dcoef", y.device, "y")
        if tuple(dcoef.shape) != (n, c):
            raise ValueError(f"dcoef must have shape ({n}, {c}) (y's N, C) or be None, got {tuple(dcoef.shape)}")
    if noise is not None:
        _float_tensor(noise, "noise", y.device, "y")
        if noise.dim() != 4 or noise.shape[0] not in (1, n) or tuple(noise.shape[1:]) != (1, h, w):
            raise ValueError(
                f"noise must have shape ({n}, 1, {h}, {w}) or (1, 1, {h}, {w}) or be None, got {tuple(noise.shape)}"
            )
    if isinstance(noise_strength, Tensor):
        _float_tensor(noise_strength, "noise_strength", y.device, "y")
        if noise_strength.dim() > 1 or noise_strength.numel() != 1:
            raise ValueError(
                "noise_strength must be a float, a 0-d or (1,) tensor, or None, "
                f"got shape {tuple(noise_strength.shape)}"
            )
    elif noise_strength is not None:
        if not is_finite_real(noise_strength):
            raise ValueError(
                f"noise_strength must be a finite float, a 0-d or (1,) tensor, or None, got {noise_strength!r}"
            )
        noise_strength = float(noise_strength)
    if bias is not None:
        _float_tensor(bias, "bias", y.device, "y")
        if tuple(bias.shape) != (c,):
            raise ValueError(f"bias must have shape ({c},) (y's C) or be None, got {tuple(bias.shape)}")
    return (noise_strength, *act_params(act, alpha, gain, clamp))


# --------------------------------------------------------------------------- reference


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _weight3_view(weight: Tensor) -> Tensor:
    """weight (O, I, kh, kw) or (O, I) as (O, I, K), K = kh kw (1 for a 2-D weight); K spelled out rather than
    -1, which a weight with no elements (O or I zero) leaves ambiguous."""
    return weight.reshape(weight.shape[0], weight.shape[1], math.prod(weight.shape[2:]))


def _full_precision(t: Tensor):
    """A context in which matrix products on t's device run in their inputs' dtype: autocast off where it is on
    (its float16 / bfloat16 products would round, or overflow, the float32 sums of the formulas)."""
    device = t.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def _demod(weight3: Tensor, styles: Tensor, eps: float) -> Tensor:
    """rsqrt(s^2 @ W2^T + eps) in weight3's accumulation dtype (differentiable torch ops)."""
    acc = _acc(weight3)
    with _full_precision(weight3):
        w2 = weight3.to(acc).square().sum(-1)  # (O, I)
        return torch.rsqrt(styles.to(acc).square() @ w2.t() + eps)


def demodulation_coefficients_reference(weight: Tensor, styles: Tensor, eps: float = 1e-8) -> Tensor:
    """The specification of :func:`demodulation_coefficients` in eager PyTorch (float32, float64 for a
    float64 weight); differentiable to any order."""
    eps = _check_demod(weight, styles, eps)
    return _demod(_weight3_view(weight), styles, eps)


def _demod_backward_reference(grad: Tensor, dcoef: Tensor, weight3: Tensor, styles: Tensor):
    """(d weight3, d styles) of the backend interface, from the formulas (differentiable torch ops)."""
    acc = _acc(weight3)
    w = weight3.to(acc)
    s = styles.to(acc)
    g = grad.to(acc) * dcoef.to(acc) ** 3  # (N, O)
    with _full_precision(weight3):
        d_styles = -s * (g @ w.square().sum(-1))
        d_weight3 = -w * (g.t() @ s.square()).unsqueeze(-1)
    return d_weight3, d_styles


def _strength_value(strength, acc: torch.dtype):
    """The noise strength as a float or a 0-d tensor in acc (1 when None)."""
    if strength is None:
        return 1.0
    if isinstance(strength, Tensor):
        return strength.to(acc).reshape(())
    return float(strength)


def _preact(y, dcoef, noise, strength, bias) -> Tensor:
    """z = y * dcoef + noise * strength + bias in y's accumulation dtype (differentiable torch ops)."""
    acc = _acc(y)
    z = y.to(acc)
    if dcoef is not None:
        z = z * dcoef.to(acc)[:, :, None, None]
    if noise is not None:
        z = z + noise.to(acc) * _strength_value(strength, acc)
    if bias is not None:
        z = z + bias.to(acc)[None, :, None, None]
    return z


def _epilogue(y, dcoef, noise, strength, bias, act, alpha, gain, clamp) -> Tensor:
    out = _act(_preact(y, dcoef, noise, strength, bias), act, alpha) * gain
    if clamp is not None:
        out = out.clamp(-clamp, clamp)
    return match_layout(out.to(y.dtype), y)


def modconv_epilogue_reference(
    y: Tensor,
    dcoef: Tensor | None = None,
    *,
    noise: Tensor | None = None,
    noise_strength: float | Tensor | None = None,
    bias: Tensor | None = None,
    act: str = "lrelu",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> Tensor:
    """The specification of :func:`modconv_epilogue` in eager PyTorch (float32, float64 for float64 y);
    differentiable to any order in every tensor argument."""
    noise_strength, alpha, gain, clamp = _check_epilogue(y, dcoef, noise, noise_strength, bias, act, alpha, gain, clamp)
    return _epilogue(y, dcoef, noise, noise_strength, bias, act, alpha, gain, clamp)


def _epilogue_backward_reference(
    dout, y, dcoef, noise, strength, bias, act, alpha, gain, clamp, need_dcoef, need_bias, need_strength, need_noise
):
    """(dy, ddcoef, dbias, dstrength, dnoise) from the formulas, in differentiable torch ops: dy in y's
    dtype and layout, the others in the accumulation dtype ((N, C), (C,), (1,), noise's shape) or None."""
    acc = _acc(y)
    z = _preact(y, dcoef, noise, strength, bias)
    g = _grad_map(match_layout(dout, y).to(acc), z, act, alpha, gain, clamp)
    dy = g * dcoef.to(acc)[:, :, None, None] if dcoef is not None else g
    ddcoef = (g * y.to(acc)).sum((2, 3)) if need_dcoef and dcoef is not None else None
    dbias = g.sum((0, 2, 3)) if need_bias and bias is not None else None
    dstrength = dnoise = None
    if noise is not None and need_strength:
        dstrength = (g * noise.to(acc)).sum().reshape(1)
    if noise is not None and need_noise:
        dnoise = g.sum(1, keepdim=True) * _strength_value(strength, acc)
        if noise.shape[0] == 1:
            dnoise = dnoise.sum(0, keepdim=True)
    return match_layout(dy.to(y.dtype), y), ddcoef, dbias, dstrength, dnoise


class _ReferenceKernels:
    """The reference formulas behind the fast backends' interface (the traced ops use it)."""

    @staticmethod
    def demod_forward(weight3, styles, eps):
        return _demod(weight3, styles, eps)

    demod_backward = staticmethod(_demod_backward_reference)

    @staticmethod
    def epilogue_forward(y, dcoef32, noise, strength32, bias32, act, alpha, gain, clamp):
        return _epilogue(y, dcoef32, noise, strength32, bias32, act, alpha, gain, clamp)

    @staticmethod
    def epilogue_backward(
        dout, y, dcoef32, noise, strength32, bias32, act, alpha, gain, clamp, need_dcoef, need_bias, need_strength
    ):
        grads = _epilogue_backward_reference(
            dout,
            y,
            dcoef32,
            noise,
            strength32,
            bias32,
            act,
            alpha,
            gain,
            clamp,
            need_dcoef,
            need_bias,
            need_strength,
            False,
        )
        return grads[:4]


# --------------------------------------------------------------------------- registry


def _fast_demod_not_supported(backend_not_supported):
    """A not_supported taking demodulation_coefficients' public arguments (as `genkernels.explain` passes them)."""

    def not_supported(weight, styles, **_rest) -> str | None:
        if weight.dtype not in FAST_DTYPES:
            return f"weight has dtype {weight.dtype}; supported: float32, float16, bfloat16"
        return backend_not_supported(weight, styles)

    return not_supported


def _fast_epilogue_not_supported(backend_not_supported):
    """A not_supported taking modconv_epilogue's public arguments (as `genkernels.explain` passes them)."""

    def not_supported(y, dcoef=None, noise=None, bias=None, act="lrelu", **_rest) -> str | None:
        if y.dtype not in FAST_DTYPES:
            return f"y has dtype {y.dtype}; supported: float32, float16, bfloat16"
        if noise is not None and noise.requires_grad and torch.is_grad_enabled():
            return "noise requires grad: its gradient is computed by the reference only"
        return backend_not_supported(y, dcoef, noise, bias, act)

    return not_supported


def _no_reason(*_args, **_kwargs) -> None:
    return None


# Measured fastest first (H100, docs/results/h100-d2ccd93-gan.md): the modulated conv block's forward ran
# 1.17 / 1.39 / 1.98 ms on triton and 1.23 / 1.59 / 2.29 ms on cuda at its three shapes, forward + backward
# within 1% of each other.
_registry.register(DEMOD_OP, "triton", _fast_demod_not_supported(_triton.demod_not_supported), _triton)
_registry.register(DEMOD_OP, "cuda", _fast_demod_not_supported(_cuda.demod_not_supported), _cuda)
_registry.register(DEMOD_OP, "reference", _no_reason, _ReferenceKernels)
_registry.register(EPILOGUE_OP, "triton", _fast_epilogue_not_supported(_triton.epilogue_not_supported), _triton)
_registry.register(EPILOGUE_OP, "cuda", _fast_epilogue_not_supported(_cuda.epilogue_not_supported), _cuda)
_registry.register(EPILOGUE_OP, "reference", _no_reason, _ReferenceKernels)


def _demod_probe(device: torch.device) -> tuple:
    """A typical call (a 512-channel 3x3 StyleGAN2 layer, batch 8), for `genkernels.info()`."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return (torch.randn(512, 512, 3, 3, device=device, dtype=dtype), torch.randn(8, 512, device=device))


def _epilogue_probe(device: torch.device) -> tuple:
    """A typical call (demodulation, per-sample noise, bias, leaky ReLU), for `genkernels.info()`."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    y = torch.randn(4, 64, 16, 16, device=device, dtype=dtype)
    dcoef = torch.rand(4, 64, device=device)
    noise = torch.randn(4, 1, 16, 16, device=device)
    return (y, dcoef, {"noise": noise, "bias": torch.zeros(64, device=device), "act": "lrelu"})


_registry.register_probe(DEMOD_OP, _demod_probe)
_registry.register_probe(EPILOGUE_OP, _epilogue_probe)


# --------------------------------------------------------------------------- autograd (fast path)


def _weight3(weight: Tensor) -> Tensor:
    return _weight3_view(weight).contiguous()


class _DemodFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, styles, eps, impl):
        w3 = _weight3(weight)
        s32 = styles.float().contiguous()
        dcoef = impl.demod_forward(w3, s32, eps)
        ctx.save_for_backward(weight, styles, dcoef)
        ctx.args = (eps, impl)
        return dcoef

    @staticmethod
    def backward(ctx, grad):
        weight, styles, dcoef = ctx.saved_tensors
        eps, impl = ctx.args
        w3 = _weight3(weight)
        if torch.is_grad_enabled():
            # create_graph: the formulas in torch ops on the saved inputs, differentiable again.
            dcoef = _demod(w3, styles, eps)
            dw3, ds = _demod_backward_reference(grad, dcoef, w3, styles)
        else:
            dw3, ds = impl.demod_backward(grad.float().contiguous(), dcoef, w3, styles.float().contiguous())
        dweight = dw3.reshape(weight.shape).to(weight.dtype) if ctx.needs_input_grad[0] else None
        dstyles = ds.to(styles.dtype) if ctx.needs_input_grad[1] else None
        return dweight, dstyles, None, None


def _strength_tensor(strength, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """The noise strength as the (1,) tensor the kernels read, float32 (float64 for float64 y, on the reference)
    (None: strength 1)."""
    if strength is None:
        return None
    if isinstance(strength, Tensor):
        return strength.to(dtype).reshape(1)
    return torch.full((1,), float(strength), dtype=dtype, device=device)


def _noise_for_fast(noise: Tensor | None) -> Tensor | None:
    if noise is None:
        return None
    return noise.to(torch.float32).contiguous() if noise.dtype == torch.float64 else noise.contiguous()


class _EpilogueFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dcoef, noise, strength, bias, act, alpha, gain, clamp, impl):
        d32 = None if dcoef is None else dcoef.float().contiguous()
        b32 = None if bias is None else bias.float().contiguous()
        s32 = _strength_tensor(strength, y.device) if noise is not None else None
        nz = _noise_for_fast(noise)
        ctx.save_for_backward(y, dcoef, noise, strength if isinstance(strength, Tensor) else None, bias)
        ctx.kernel_inputs = (d32, nz, s32, b32)
        ctx.args = (act, alpha, gain, clamp, impl, strength if not isinstance(strength, Tensor) else None)
        return impl.epilogue_forward(y, d32, nz, s32, b32, act, alpha, gain, clamp)

    @staticmethod
    def backward(ctx, dout):
        y, dcoef, noise, strength_t, bias = ctx.saved_tensors
        d32, nz, s32, b32 = ctx.kernel_inputs
        act, alpha, gain, clamp, impl, strength_f = ctx.args
        strength = strength_t if strength_t is not None else strength_f
        needs = ctx.needs_input_grad
        need_dcoef = needs[1] and dcoef is not None
        need_bias = needs[4] and bias is not None
        need_strength = needs[3] and noise is not None
        if torch.is_grad_enabled():
            # create_graph: the formulas in torch ops on the saved inputs, differentiable again.
            dy, ddcoef, dbias, dstrength, _ = _epilogue_backward_reference(
                dout,
                y,
                dcoef,
                noise,
                strength,
                bias,
                act,
                alpha,
                gain,
                clamp,
                need_dcoef,
                need_bias,
                need_strength,
                False,
            )
        else:
            dy, ddcoef, dbias, dstrength = impl.epilogue_backward(
                match_layout(dout, y).to(y.dtype),
                y,
                d32,
                nz,
                s32,
                b32,
                act,
                alpha,
                gain,
                clamp,
                need_dcoef,
                need_bias,
                need_strength,
            )
        return (
            dy if needs[0] else None,
            ddcoef.to(dcoef.dtype) if need_dcoef else None,
            None,
            dstrength.reshape(strength_t.shape).to(strength_t.dtype) if need_strength else None,
            dbias.to(bias.dtype) if need_bias else None,
            *(None,) * 5,
        )


# --------------------------------------------------------------------------- torch.library ops (traced path)


def _demod_impl(backend: str, weight3: Tensor, styles: Tensor):
    if weight3.numel() == 0 or styles.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(DEMOD_OP, weight3, styles, backend=backend or None)
        return _ReferenceKernels
    return _registry.select(DEMOD_OP, weight3, styles, backend=backend or None).impl


@torch.library.custom_op(
    "genkernels::demodulation_coefficients",
    mutates_args=(),
    schema="(Tensor weight3, Tensor styles, float eps, str backend) -> Tensor",
)
def _demod_op(weight3: Tensor, styles: Tensor, eps: float, backend: str) -> Tensor:
    """dcoef (N, O) of weight3 (O, I, K) and styles (N, I) (float32, float64 for a float64 weight3)."""
    impl = _demod_impl(backend, weight3, styles)
    return impl.demod_forward(weight3.contiguous(), styles.to(_acc(weight3)).contiguous(), eps)


@_demod_op.register_fake
def _(weight3, styles, eps, backend):
    return weight3.new_empty((styles.shape[0], weight3.shape[0]), dtype=_acc(weight3))


@torch.library.custom_op(
    "genkernels::demodulation_coefficients_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor dcoef, Tensor weight3, Tensor styles, str backend) -> (Tensor, Tensor)",
)
def _demod_backward_op(grad: Tensor, dcoef: Tensor, weight3: Tensor, styles: Tensor, backend: str):
    """(d weight3, d styles) in the accumulation dtype."""
    impl = _demod_impl(backend, weight3, styles)
    acc = _acc(weight3)
    return impl.demod_backward(
        grad.to(acc).contiguous(), dcoef.contiguous(), weight3.contiguous(), styles.to(acc).contiguous()
    )


@_demod_backward_op.register_fake
def _(grad, dcoef, weight3, styles, backend):
    acc = _acc(weight3)
    return weight3.new_empty(weight3.shape, dtype=acc), styles.new_empty(styles.shape, dtype=acc)


def _demod_setup(ctx, inputs, output):
    weight3, styles, eps, backend = inputs
    ctx.save_for_backward(weight3, styles, output)
    ctx.backend = backend


def _demod_op_backward(ctx, grad):
    weight3, styles, dcoef = ctx.saved_tensors
    dw3, ds = _demod_backward_op(grad, dcoef, weight3, styles, ctx.backend)
    return dw3.to(weight3.dtype), ds.to(styles.dtype), None, None


_demod_op.register_autograd(_demod_op_backward, setup_context=_demod_setup)


def _epilogue_impl(backend: str, y: Tensor, dcoef, noise, bias, act: str):
    options = {"noise": noise, "bias": bias, "act": act, "backend": backend or None}
    if y.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(EPILOGUE_OP, y, dcoef, **options)
        return _ReferenceKernels
    return _registry.select(EPILOGUE_OP, y, dcoef, **options).impl


_EPILOGUE_ARGS = (
    "Tensor? dcoef, Tensor? noise, Tensor? strength, Tensor? bias, str act, float alpha, float gain,"
    " bool has_clamp, float clamp"
)


# dcoef, strength and bias are the float32 tensors the kernels read; clamp travels as (has_clamp, clamp).
@torch.library.custom_op(
    "genkernels::modconv_epilogue",
    mutates_args=(),
    schema=f"(Tensor y, {_EPILOGUE_ARGS}, str backend) -> Tensor",
)
def _epilogue_op(
    y: Tensor,
    dcoef: Tensor | None,
    noise: Tensor | None,
    strength: Tensor | None,
    bias: Tensor | None,
    act: str,
    alpha: float,
    gain: float,
    has_clamp: bool,
    clamp: float,
    backend: str,
) -> Tensor:
    """out = clamp(act(y * dcoef + noise * strength + bias) * gain) in y's dtype and layout."""
    y, dcoef, bias = dense_layout(y), contiguous_or_none(dcoef), contiguous_or_none(bias)
    impl = _epilogue_impl(backend, y, dcoef, noise, bias, act)
    nz = noise if impl is _ReferenceKernels else _noise_for_fast(noise)
    return impl.epilogue_forward(y, dcoef, nz, strength, bias, act, alpha, gain, clamp if has_clamp else None)


@_epilogue_op.register_fake
def _(y, dcoef, noise, strength, bias, act, alpha, gain, has_clamp, clamp, backend):
    return torch.empty_like(dense_layout(y))


@torch.library.custom_op(
    "genkernels::modconv_epilogue_backward",
    mutates_args=(),
    schema=f"(Tensor dout, Tensor y, {_EPILOGUE_ARGS}, bool need_dcoef, bool need_bias, bool need_strength,"
    " bool need_noise, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _epilogue_backward_op(
    dout: Tensor,
    y: Tensor,
    dcoef: Tensor | None,
    noise: Tensor | None,
    strength: Tensor | None,
    bias: Tensor | None,
    act: str,
    alpha: float,
    gain: float,
    has_clamp: bool,
    clamp: float,
    need_dcoef: bool,
    need_bias: bool,
    need_strength: bool,
    need_noise: bool,
    backend: str,
):
    """(dy, ddcoef, dbias, dstrength, dnoise): dy like y, the others float32 (float64 for float64 y);
    a gradient that is not needed (or whose input is None) comes back as an empty (0,) tensor. The noise
    gradient is the reference's (the fast backends do not compute it)."""
    y, dcoef, bias = dense_layout(y), contiguous_or_none(dcoef), contiguous_or_none(bias)
    clamp_ = clamp if has_clamp else None
    need_dcoef, need_bias = need_dcoef and dcoef is not None, need_bias and bias is not None
    need_strength, need_noise = need_strength and noise is not None, need_noise and noise is not None
    if need_noise:
        chosen = _registry.requested(backend or None, EPILOGUE_OP)
        if chosen not in ("auto", "reference"):  # as the eager path refuses it: no fast noise gradient
            raise _registry.UnsupportedError(
                f"modconv_epilogue: backend {chosen!r} cannot run this call: noise requires grad, and only the "
                "reference computes the noise gradient"
            )
        impl = _ReferenceKernels
    else:
        impl = _epilogue_impl(backend, y, dcoef, noise, bias, act)
    if impl is _ReferenceKernels:
        grads = _epilogue_backward_reference(
            dout,
            y,
            dcoef,
            noise,
            strength,
            bias,
            act,
            alpha,
            gain,
            clamp_,
            need_dcoef,
            need_bias,
            need_strength,
            need_noise,
        )
    else:
        grads = impl.epilogue_backward(
            match_layout(dout, y).to(y.dtype),
            y,
            dcoef,
            _noise_for_fast(noise),
            strength,
            bias,
            act,
            alpha,
            gain,
            clamp_,
            need_dcoef,
            need_bias,
            need_strength,
        ) + (None,)
    dy, *rest = grads
    return (dy, *(y.new_empty((0,), dtype=_acc(y)) if g is None else g for g in rest))


@_epilogue_backward_op.register_fake
def _(
    dout,
    y,
    dcoef,
    noise,
    strength,
    bias,
    act,
    alpha,
    gain,
    has_clamp,
    clamp,
    need_dcoef,
    need_bias,
    need_strength,
    need_noise,
    backend,
):
    acc = _acc(y)
    n, c = y.shape[:2]

    def grad(needed, shape):
        return y.new_empty(shape if needed else (0,), dtype=acc)

    return (
        torch.empty_like(dense_layout(y)),
        grad(need_dcoef and dcoef is not None, (n, c)),
        grad(need_bias and bias is not None, (c,)),
        grad(need_strength and noise is not None, (1,)),
        grad(need_noise and noise is not None, noise.shape if noise is not None else (0,)),
    )


def _epilogue_setup(ctx, inputs, output):
    y, dcoef, noise, strength, bias, *args = inputs
    ctx.save_for_backward(y, dcoef, noise, strength, bias)
    ctx.args = tuple(args)


def _epilogue_op_backward(ctx, dout):
    y, dcoef, noise, strength, bias = ctx.saved_tensors
    act, alpha, gain, has_clamp, clamp, backend = ctx.args
    needs = ctx.needs_input_grad
    dy, ddcoef, dbias, dstrength, dnoise = _epilogue_backward_op(
        dout,
        y,
        dcoef,
        noise,
        strength,
        bias,
        act,
        alpha,
        gain,
        has_clamp,
        clamp,
        needs[1],
        needs[4],
        needs[3],
        needs[2],
        backend,
    )

    def cast(needed, g, like):
        return g.to(like.dtype) if needed and like is not None else None

    return (
        dy if needs[0] else None,
        cast(needs[1], ddcoef, dcoef),
        cast(needs[2], dnoise, noise),
        cast(needs[3], dstrength, strength),
        cast(needs[4], dbias, bias),
        *(None,) * 6,
    )


_epilogue_op.register_autograd(_epilogue_op_backward, setup_context=_epilogue_setup)


# --------------------------------------------------------------------------- public ops


def demodulation_coefficients(
    weight: Tensor, styles: Tensor, eps: float = 1e-8, *, backend: str | None = None
) -> Tensor:
    """StyleGAN2's demodulation coefficients, in one fused pass (no (N, O, I, k) intermediate):

        dcoef[n, o] = rsqrt( sum_{i,k} (weight[o, i, k] * styles[n, i])^2 + eps )
                    = rsqrt( sum_i styles[n, i]^2 * W2[o, i] + eps ),   W2[o, i] = sum_k weight[o, i, k]^2.

    Args:
        weight: (O, I, kh, kw) convolution weight, or (O, I) for a 1x1 convolution / linear layer;
            float32, float16 or bfloat16 (float64: reference only).
        styles: (N, I) per-sample input-channel scales, any float dtype, on weight's device.
        eps: finite float > 0 added under the square root.
        backend: "auto" / None, "reference", "triton" or "cuda".

    Returns dcoef, float32 (N, O) (float64 for a float64 weight), computed in that dtype. Differentiable
    in weight and styles (first order by the fused kernels; a create_graph backward runs the formulas
    in torch ops, so it is differentiable again). Under torch.compile the call goes through
    ``genkernels::demodulation_coefficients`` (and ``genkernels::demodulation_coefficients_backward``).
    """
    eps = _check_demod(weight, styles, eps)
    if torch.compiler.is_compiling():
        return _demod_op(_weight3_view(weight), styles, eps, backend or "")
    if weight.numel() == 0 or styles.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(DEMOD_OP, weight, styles, backend=backend)
        return demodulation_coefficients_reference(weight, styles, eps=eps)
    chosen = _registry.select(DEMOD_OP, weight, styles, backend=backend)
    if chosen.name == "reference":
        return demodulation_coefficients_reference(weight, styles, eps=eps)
    return _autograd.apply(_DemodFunction, weight, styles, eps, chosen.impl)


def modconv_epilogue(
    y: Tensor,
    dcoef: Tensor | None = None,
    *,
    noise: Tensor | None = None,
    noise_strength: float | Tensor | None = None,
    bias: Tensor | None = None,
    act: str = "lrelu",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """The epilogue of StyleGAN2's modulated convolution (genkernels.nn.ModulatedConv2d), in one pass.

    ModulatedConv2d scales the input channels by the styles, runs one ordinary convolution with the
    shared (unmodulated) weight, giving y, then calls this on y:

        z[n, o, h, w] = y[n, o, h, w] * dcoef[n, o] + noise[n, 0, h, w] * noise_strength + bias[o]
        out = clamp(act(z) * gain)

    Args:
        y: (N, C, H, W) convolution output, float32, float16 or bfloat16 (float64: reference only).
            Contiguous and channels_last run in place (out keeps the layout); other strides are copied once.
        dcoef: None or (N, C) demodulation coefficients (see :func:`demodulation_coefficients`), any
            float dtype (used in float32).
        noise: None, (N, 1, H, W) or (1, 1, H, W) (broadcast over channels, and over the batch for the
            latter), any float dtype.
        noise_strength: None (1), a float, or a 0-d / (1,) tensor (a learnable scalar).
        bias: None or (C,), any float dtype.
        act, alpha, gain, clamp: as :func:`genkernels.ops.bias_act` ("linear", "relu", "lrelu", "tanh",
            "sigmoid", "silu", "gelu"; alpha 0.2; gain sqrt(2) for relu / lrelu, else 1; clamp None or > 0).
        backend: "auto" / None, "reference", "triton" or "cuda".

    Returns out in y's dtype, shape and layout. Differentiable in y, dcoef, noise, noise_strength and
    bias: the fast backends' backward is one fused pass over dout and y (dy plus deterministic partial
    sums for the dcoef, bias and strength gradients); a noise tensor that requires grad runs on the
    reference. A create_graph backward runs the formulas in torch ops (differentiable again). Under
    torch.compile the call goes through ``genkernels::modconv_epilogue`` (and its _backward op).
    """
    noise_strength, alpha, gain, clamp = _check_epilogue(y, dcoef, noise, noise_strength, bias, act, alpha, gain, clamp)
    if torch.compiler.is_compiling():
        acc = _acc(y)
        return _epilogue_op(
            y,
            None if dcoef is None else dcoef.to(acc),
            noise,
            None if noise is None or noise_strength is None else _strength_tensor(noise_strength, y.device, acc),
            None if bias is None else bias.to(acc),
            act,
            alpha,
            gain,
            clamp is not None,
            clamp or 0.0,
            backend or "",
        )
    options = {"noise": noise, "noise_strength": noise_strength, "bias": bias, "act": act, "backend": backend}
    if y.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(EPILOGUE_OP, y, dcoef, **options)
        return _epilogue(y, dcoef, noise, noise_strength, bias, act, alpha, gain, clamp)
    y = dense_layout(y)
    chosen = _registry.select(EPILOGUE_OP, y, dcoef, **options)
    if chosen.name == "reference":
        return _epilogue(y, dcoef, noise, noise_strength, bias, act, alpha, gain, clamp)
    args = (y, dcoef, noise, noise_strength, bias, act, alpha, gain, clamp, chosen.impl)
    return _autograd.apply(_EpilogueFunction, *args)


__all__ = [
    "demodulation_coefficients",
    "demodulation_coefficients_reference",
    "modconv_epilogue",
    "modconv_epilogue_reference",
]


_registry.register_check(DEMOD_OP, demodulation_coefficients, _check_demod)
_registry.register_check(EPILOGUE_OP, modconv_epilogue, _check_epilogue)
