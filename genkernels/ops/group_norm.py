"""GroupNorm, optionally fused with SiLU: reference, validation, autograd, dispatch and torch.library op.

For x of shape (N, C, *) split into G groups of C/G channels,

    xhat = (x - mean[n, g]) / sqrt(var[n, g] + eps)     (biased variance over the group)
    z    = xhat * weight[c] + bias[c]
    y    = z              (activation=None)
    y    = z * sigmoid(z) (activation="silu")

Statistics accumulate in float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _autograd, _registry
from .._checks import is_integer, nonnegative_float
from .._layout import dense_layout, match_layout
from ..cuda import group_norm as _cuda
from ..triton import group_norm as _triton

OP = "group_norm"
ACTIVATIONS = (None, "silu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------- validation


def _check(x, groups, weight, bias, eps, activation) -> tuple[int, float]:
    """Raise a clear error naming the argument for anything the op does not accept; returns (groups, eps) as
    Python numbers."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, *), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not is_integer(groups) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    groups = int(groups)
    c = x.shape[1]
    if c % groups:
        raise ValueError(f"groups={groups} must divide the number of channels C={c} (x.shape[1])")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},) (one value per channel of x), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must be on one device")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    eps = nonnegative_float("eps", eps)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return groups, eps


def _fast_not_supported(x, weight, bias) -> str | None:
    """Reasons shared by the triton and cuda backends (their own checks follow)."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"x has dtype {x.dtype}; supported: float32, float16, bfloat16"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in (x.dtype, torch.float32):
            return f"{name} has dtype {t.dtype}; supported: x's dtype ({x.dtype}) or float32"
    return None


# --------------------------------------------------------------------------- reference


def _affine_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """x as (N, G, C/G * S) in the accumulation dtype."""
    return x.to(_acc_dtype(x)).reshape(x.shape[0], groups, (x.shape[1] // groups) * math.prod(x.shape[2:]))


def _reference_stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xg = _grouped(x, groups)
    mean = xg.mean(-1)
    rstd = torch.rsqrt((xg - mean[..., None]).square().mean(-1) + eps)
    return mean, rstd


def _reference_z(x, weight, bias, groups, mean, rstd):
    """z = xhat * weight + bias in the accumulation dtype, and xhat."""
    acc = _acc_dtype(x)
    xg = _grouped(x, groups)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    z = xhat
    if weight is not None:
        z = z * weight.to(acc).view(_affine_shape(x))
    if bias is not None:
        z = z + bias.to(acc).view(_affine_shape(x))
    return z, xhat


def group_norm_reference(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """The specification: eager PyTorch, statistics and affine in float32 (float64 for float64 x).

    Written out (not F.group_norm) so that it is the formula itself, differentiable by autograd
    to any order, and empty groups give zero parameter gradients. Returns y in x's dtype and
    memory layout.
    """
    y, _, _ = _reference_forward(x, weight, bias, groups, eps, activation == "silu")
    return y


def _reference_forward(x, weight, bias, groups, eps, silu):
    mean, rstd = _reference_stats(x, groups, eps)
    z, _ = _reference_z(x, weight, bias, groups, mean, rstd)
    y = F.silu(z) if silu else z
    return match_layout(y.to(x.dtype), x), mean, rstd


def _reference_backward(dy, x, weight, bias, mean, rstd, groups, silu, needs_dx, needs_dweight, needs_dbias):
    """The backward formulas the fused kernels implement, in the accumulation dtype.

    dz = dy * act'(z), dxhat = dz * weight,
    dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)),
    dweight = sum_{n,s} dz * xhat, dbias = sum_{n,s} dz.
    """
    acc = _acc_dtype(x)
    z, xhat = _reference_z(x, weight, bias, groups, mean, rstd)
    dz = dy.to(acc)
    if silu:
        sig = torch.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))
    reduce_dims = [0] + list(range(2, x.dim()))
    dweight = (dz * xhat).sum(reduce_dims).to(weight.dtype) if needs_dweight and weight is not None else None
    dbias = dz.sum(reduce_dims).to(bias.dtype) if needs_dbias and bias is not None else None
    dx = None
    if needs_dx:
        dxhat = dz if weight is None else dz * weight.to(acc).view(_affine_shape(x))
        dxhat = _grouped(dxhat, groups)
        xh = _grouped(xhat, groups)
        dx = rstd[..., None] * (dxhat - dxhat.mean(-1, keepdim=True) - xh * (dxhat * xh).mean(-1, keepdim=True))
        dx = match_layout(dx.reshape(x.shape).to(x.dtype), x)
    return dx, dweight, dbias


class _ReferenceKernels:
    """The reference formulas behind the same interface as the fast backends (used inside the op)."""

    group_norm_forward = staticmethod(_reference_forward)
    group_norm_backward = staticmethod(_reference_backward)


# --------------------------------------------------------------------------- registry


def _public_args(x, groups, weight=None, bias=None, eps=1e-5, activation=None):
    return x, weight, bias, groups, eps, activation == "silu"


def _wrap(backend_not_supported, shared: bool):
    def not_supported(*args, **kwargs) -> str | None:
        x, weight, bias, groups, eps, silu = _public_args(*args, **kwargs)
        if shared:
            reason = _fast_not_supported(x, weight, bias)
            if reason is not None:
                return reason
        return backend_not_supported(x, weight, bias, groups, eps, silu)

    return not_supported


_registry.register(OP, "cuda", _wrap(_cuda.not_supported, True), _cuda)
_registry.register(OP, "triton", _wrap(_triton.not_supported, True), _triton)
_registry.register(OP, "reference", lambda *a, **k: None, _ReferenceKernels)


def _probe(device: torch.device) -> tuple:
    """Arguments of a typical call, for `genkernels.info()`."""
    x = torch.randn(2, 64, 8, 8, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    return (x, 32, None, None, 1e-5, "silu")


_registry.register_probe(OP, _probe)


# --------------------------------------------------------------------------- autograd (eager path)


class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu, impl):
        y, mean, rstd = impl.group_norm_forward(x, weight, bias, groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu, ctx.impl = groups, silu, impl
        return y

    @staticmethod
    @_autograd.first_order_only(OP)  # create_graph=True: an explicit error, never a silent zero
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dweight, dbias = ctx.impl.group_norm_backward(
            match_layout(dy, x), x, weight, bias, mean, rstd, ctx.groups, ctx.silu, needs[0], needs[1], needs[2]
        )
        return dx, dweight, dbias, None, None, None, None


# --------------------------------------------------------------------------- torch.library op (traced path)


def _impl_for(backend: str, x, weight, bias, groups, eps, silu):
    """Resolve the backend at run time (the scope and environment apply to compiled code too)."""
    args = (OP, x, groups, weight, bias, eps, "silu" if silu else None)
    if x.numel() == 0:  # empty: no launch, after an explicit backend's check, as on the eager path
        _registry.check_explicit(*args, backend=backend or None)
        return _ReferenceKernels
    return _registry.select(*args, backend=backend or None).impl


# Explicit schemas: torch 2.4 cannot infer them from postponed (string) annotations.
@torch.library.custom_op(
    "genkernels::group_norm",
    mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, bool silu, str backend)"
    " -> (Tensor, Tensor, Tensor)",
)
def _group_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float,
    silu: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = dense_layout(x)
    y, mean, rstd = _impl_for(backend, x, weight, bias, groups, eps, silu).group_norm_forward(
        x, weight, bias, groups, eps, silu
    )
    return y, mean, rstd


@_group_norm_op.register_fake
def _(x, weight, bias, groups, eps, silu, backend):
    stats = x.new_empty((x.shape[0], groups), dtype=_acc_dtype(x))
    return torch.empty_like(dense_layout(x)), stats, torch.empty_like(stats)


@torch.library.custom_op(
    "genkernels::group_norm_backward",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int groups, float eps,"
    " bool silu, bool need_dx, bool need_dweight, bool need_dbias, str backend) -> (Tensor, Tensor, Tensor)",
)
def _group_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    eps: float,
    silu: bool,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias), each computed only where its need_* flag says (as the eager backward: an input that
    requires no grad costs no pass, no write)."""
    x = dense_layout(x)
    impl = _impl_for(backend, x, weight, bias, groups, eps, silu)
    dx, dweight, dbias = impl.group_norm_backward(
        match_layout(dy, x),
        x,
        weight,
        bias,
        mean,
        rstd,
        groups,
        silu,
        need_dx,
        need_dweight and weight is not None,
        need_dbias and bias is not None,
    )
    # Custom ops cannot return None: a gradient not needed (or of an absent affine parameter) is an empty tensor,
    # each its own (outputs of a custom op may not alias one another).
    return _or_empty(dx, x), _or_empty(dweight, x), _or_empty(dbias, x)


def _or_empty(grad: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,)) if grad is None else grad


@_group_norm_backward_op.register_fake
def _(dy, x, weight, bias, mean, rstd, groups, eps, silu, need_dx, need_dweight, need_dbias, backend):
    dx = torch.empty_like(dense_layout(x)) if need_dx else x.new_empty((0,))
    dweight = torch.empty_like(weight) if need_dweight and weight is not None else x.new_empty((0,))
    dbias = torch.empty_like(bias) if need_dbias and bias is not None else x.new_empty((0,))
    return dx, dweight, dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, eps, silu, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.args = (groups, eps, silu, backend)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    groups, eps, silu, backend = ctx.args
    needs = ctx.needs_input_grad
    dx, dweight, dbias = _group_norm_backward_op(
        dy, x, weight, bias, mean, rstd, groups, eps, silu, needs[0], needs[1], needs[2], backend
    )
    return (
        dx if needs[0] else None,
        dweight if needs[1] and weight is not None else None,
        dbias if needs[2] and bias is not None else None,
        None,
        None,
        None,
        None,
    )


_group_norm_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public op


def group_norm(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Group normalization of x (N, C, *) over `groups` groups of C/groups channels, optionally fused with SiLU.

    y = act((x - mean) / sqrt(var + eps) * weight + bias), mean and biased var over each
    (sample, group); act is the identity or SiLU (z * sigmoid(z)) with ``activation="silu"``.

    Args:
        x: (N, C, *) float32, float16 or bfloat16 (float64: reference only). Contiguous and
            channels_last (channels_last_3d, and channels-innermost 3-D) inputs run in place;
            any other strides are copied once to contiguous. y keeps x's dtype and layout.
        groups: number of groups; must divide C.
        weight, bias: optional (C,) per-channel affine parameters, in x's dtype or float32.
        eps: added to the variance.
        activation: None or "silu".
        backend: "auto" / None (the fastest that can run), "reference", "triton" or "cuda".
            An explicit backend that cannot run the call raises UnsupportedError.

    Statistics accumulate in float32. Differentiable in x, weight and bias; the triton
    and cuda backends run fused backward kernels, first order only (a second derivative
    through them raises; the reference backend differentiates to any order).
    """
    groups, eps = _check(x, groups, weight, bias, eps, activation)
    silu = activation == "silu"
    if torch.compiler.is_compiling():
        return _group_norm_op(x, weight, bias, groups, eps, silu, backend or "")[0]
    if x.numel() == 0:  # empty: no launch, after an explicit backend's check; autograd gives zero gradients
        _registry.check_explicit(OP, x, groups, weight, bias, eps, activation, backend=backend)
        return group_norm_reference(x, groups, weight, bias, eps, activation)
    x = dense_layout(x)
    chosen = _registry.select(OP, x, groups, weight, bias, eps, activation, backend=backend)
    if chosen.name == "reference":
        return group_norm_reference(x, groups, weight, bias, eps, activation)
    return _autograd.apply(_GroupNormFunction, x, weight, bias, groups, eps, silu, chosen.impl)


_registry.register_check(OP, group_norm, _check)
