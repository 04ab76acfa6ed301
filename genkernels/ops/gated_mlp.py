"""The activations of transformer MLPs, each one pass with a fused backward: reference, validation,
dispatch, autograd and torch.library ops.

gelu_tanh (torch's ``F.gelu(x, approximate="tanh")``, GPT-2 / DiT MLPs):

    y = 0.5 x (1 + tanh(u)),   u = sqrt(2 / pi) (x + 0.044715 x^3)
    dx = dy (0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2 / pi) (1 + 3 * 0.044715 x^2))

swiglu (the gated MLP of Llama / FLUX: x is the concatenation [a; b] of two projections along ``dim``):

    y = silu(a) * b = a sigmoid(a) b
    da = dy b sigmoid(a) (1 + a (1 - sigmoid(a))),   db = dy silu(a)      (dx = [da; db], one pass)

Arithmetic is float32 (float64 for float64 inputs on the reference). The backward is itself
differentiable (to any order): the gradient map is linear in dy, so its derivative in dy is the same fused
kernel (gelu_tanh) or a torch expression (swiglu); its derivative in x is a torch expression of the second
derivatives, gelu_tanh'' = S u' + 0.5 x S (u'' - 2 tanh(u) u'^2) (S = 1 - tanh^2 u) and
silu''(a) = s (1 - s) (2 + a (1 - 2 s)) (s = sigmoid(a)).

Fused backend interface (genkernels.triton.gated_mlp and genkernels.cuda.gated_mlp implement it; dispatch
tries triton, then cuda, then the reference: neither fast backend has been measured on a GPU yet, so the
order is not a speed ranking):

    gelu_tanh_not_supported(x) -> str | None
    gelu_tanh_forward(x) -> y              x dense (contiguous or channels_last), numel > 0; y like x
    gelu_tanh_grad(dy, x) -> dx            dy like x (strides and dtype); dx like x
    swiglu_not_supported(x, dim) -> str | None
    swiglu_forward(x, dim) -> y            x contiguous, numel > 0, dim in [0, x.dim()), x.shape[dim] even;
                                           y contiguous, x's shape with dim halved
    swiglu_grad(dy, x, dim) -> dx          dy contiguous, y's shape, x's dtype; dx contiguous like x
Each is one pass: the inputs read once, the output written once.

linear_gelu_tanh (the first half of a GELU MLP, gelu_tanh(F.linear(x, weight, bias))): on CUDA, in auto mode and
when nothing needs a gradient, the bias and the GELU run in the matrix product's epilogue (cuBLASLt, through
``torch._addmm_activation(..., use_gelu=True)``, whose GELU is the tanh approximation on CUDA), so the hidden
activations are written once instead of written, read and written again; otherwise F.linear, then gelu_tanh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _autograd, _registry
from .._checks import is_integer
from .._layout import dense_layout, match_layout
from ..cuda import gated_mlp as _cuda
from ..triton import gated_mlp as _triton

GELU_OP = "gelu_tanh"
SWIGLU_OP = "swiglu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


# --------------------------------------------------------------------------- validation


def _check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be {_DTYPE_NAMES}, got {x.dtype}")


def _check_swiglu(x, dim) -> int:
    """Raise a clear error naming the argument; returns dim in [0, x.dim())."""
    _check_x(x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the one split into [a; b]), got a 0-d tensor")
    if not is_integer(dim) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim!r}")
    dim = int(dim) % x.dim()
    if x.shape[dim] % 2:
        raise ValueError(
            f"x.shape[dim] must be even (x = [a; b] split in halves along dim={dim}), got shape {tuple(x.shape)}"
        )
    return dim


# --------------------------------------------------------------------------- reference


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gelu_tanh_reference(x: Tensor) -> Tensor:
    """The specification: torch's tanh-approximated GELU in float32 (float64 for float64 x), x's dtype out;
    differentiable to any order."""
    _check_x(x)
    return F.gelu(x.to(_acc(x)), approximate="tanh").to(x.dtype)


def swiglu_reference(x: Tensor, dim: int = -1) -> Tensor:
    """The specification: silu(a) * b with x = [a; b] along dim, in float32 (float64 for float64 x), x's
    dtype out; differentiable to any order."""
    dim = _check_swiglu(x, dim)
    a, b = x.to(_acc(x)).chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


def _gelu_grad_reference(dy: Tensor, x: Tensor) -> Tensor:
    acc = _acc(x)
    return torch.ops.aten.gelu_backward(dy.to(acc), x.to(acc), approximate="tanh").to(x.dtype)


def _swiglu_grad_reference(dy: Tensor, x: Tensor, dim: int) -> Tensor:
    acc = _acc(x)
    a, b = x.to(acc).chunk(2, dim=dim)
    g = dy.to(acc)
    s = torch.sigmoid(a)
    return torch.cat((g * b * s * (1.0 + a * (1.0 - s)), g * a * s), dim=dim).to(x.dtype)


_BETA = 0.7978845608028654  # sqrt(2 / pi)
_KAPPA = 0.044715


def _gelu_second(ddx: Tensor, dy: Tensor, x: Tensor) -> Tensor:
    """d/dx of sum(ddx * dy * gelu_tanh'(x)) = ddx dy gelu_tanh''(x), a torch expression in x's dtype."""
    acc = _acc(x)
    xf = x.to(acc)
    u = _BETA * (xf + _KAPPA * xf * xf * xf)
    du = _BETA * (1.0 + 3.0 * _KAPPA * xf * xf)
    t = torch.tanh(u)
    sech2 = 1.0 - t * t
    second = sech2 * du + 0.5 * xf * sech2 * (6.0 * _BETA * _KAPPA * xf - 2.0 * t * du * du)
    return (ddx.to(acc) * dy.to(acc) * second).to(x.dtype)


def _swiglu_second(ddx: Tensor, dy: Tensor, x: Tensor, dim: int, need_dy: bool, need_x: bool):
    """(d/d dy, d/dx) of sum(ddx * dx(dy, x)) for swiglu's gradient map, torch expressions (dy's and x's
    dtypes; None where not needed)."""
    acc = _acc(x)
    a, b = x.to(acc).chunk(2, dim=dim)
    dda, ddb = ddx.to(acc).chunk(2, dim=dim)
    g = dy.to(acc)
    s = torch.sigmoid(a)
    d1 = s * (1.0 + a * (1.0 - s))
    ddy = (dda * b * d1 + ddb * a * s).to(dy.dtype) if need_dy else None
    dx = None
    if need_x:
        d2 = s * (1.0 - s) * (2.0 + a * (1.0 - 2.0 * s))
        dx = torch.cat((g * (dda * b * d2 + ddb * d1), g * dda * d1), dim=dim).to(x.dtype)
    return ddy, dx


class _ReferenceKernels:
    """The reference formulas behind the fast backends' interface (the traced ops use it)."""

    gelu_tanh_forward = staticmethod(lambda x: match_layout(gelu_tanh_reference(x), x))
    gelu_tanh_grad = staticmethod(lambda dy, x: match_layout(_gelu_grad_reference(dy, x), x))
    swiglu_forward = staticmethod(lambda x, dim: swiglu_reference(x, dim).contiguous())
    swiglu_grad = staticmethod(lambda dy, x, dim: _swiglu_grad_reference(dy, x, dim).contiguous())


# --------------------------------------------------------------------------- registry


def _gelu_not_supported(backend):
    """A not_supported taking gelu_tanh's public arguments (as `genkernels.explain` passes them)."""

    def not_supported(x, **_rest) -> str | None:
        return backend.gelu_tanh_not_supported(x)

    return not_supported


def _swiglu_not_supported(backend):
    """A not_supported taking swiglu's public arguments, dim normalized to [0, x.dim())."""

    def not_supported(x, dim=-1, **_rest) -> str | None:
        return backend.swiglu_not_supported(x, dim % max(x.dim(), 1))

    return not_supported


_registry.register(GELU_OP, "triton", _gelu_not_supported(_triton), _triton)
_registry.register(GELU_OP, "cuda", _gelu_not_supported(_cuda), _cuda)
_registry.register(GELU_OP, "reference", lambda *a, **k: None, _ReferenceKernels)
_registry.register(SWIGLU_OP, "triton", _swiglu_not_supported(_triton), _triton)
_registry.register(SWIGLU_OP, "cuda", _swiglu_not_supported(_cuda), _cuda)
_registry.register(SWIGLU_OP, "reference", lambda *a, **k: None, _ReferenceKernels)


def _probe(device: torch.device, hidden: int) -> tuple:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return (torch.randn(2, 16, hidden, device=device, dtype=dtype),)


_registry.register_probe(GELU_OP, lambda device: _probe(device, 512))
_registry.register_probe(SWIGLU_OP, lambda device: _probe(device, 1024))


# --------------------------------------------------------------------------- autograd (fast path)


class _GeluTanhFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, impl):
        ctx.save_for_backward(x)
        ctx.impl = impl
        return impl.gelu_tanh_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _GeluTanhGradFunction.apply(dy, x, ctx.impl), None


class _GeluTanhGradFunction(torch.autograd.Function):
    """dx = dy * gelu_tanh'(x) in one fused pass, differentiable in dy (the same map) and x."""

    @staticmethod
    def forward(ctx, dy, x, impl):
        ctx.save_for_backward(dy, x)
        ctx.impl = impl
        return impl.gelu_tanh_grad(match_layout(dy, x).to(x.dtype), x)

    @staticmethod
    def backward(ctx, ddx):
        dy, x = ctx.saved_tensors
        ddy = _GeluTanhGradFunction.apply(ddx, x, ctx.impl).to(dy.dtype) if ctx.needs_input_grad[0] else None
        dx = _gelu_second(ddx, dy, x) if ctx.needs_input_grad[1] else None
        return ddy, dx, None


class _SwigluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, impl):
        ctx.save_for_backward(x)
        ctx.args = (dim, impl)
        return impl.swiglu_forward(x, dim)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dim, impl = ctx.args
        return _SwigluGradFunction.apply(dy, x, dim, impl), None, None


class _SwigluGradFunction(torch.autograd.Function):
    """dx = [dy b silu'(a); dy silu(a)] in one fused pass, differentiable in dy and x."""

    @staticmethod
    def forward(ctx, dy, x, dim, impl):
        ctx.save_for_backward(dy, x)
        ctx.dim = dim
        return impl.swiglu_grad(dy.contiguous().to(x.dtype), x, dim)

    @staticmethod
    def backward(ctx, ddx):
        dy, x = ctx.saved_tensors
        ddy, dx = _swiglu_second(ddx, dy, x, ctx.dim, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return ddy, dx, None, None


# --------------------------------------------------------------------------- torch.library ops (traced path)


def _impl_for(op: str, backend: str, *args):
    if args[0].numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(op, *args, backend=backend or None)
        return _ReferenceKernels
    return _registry.select(op, *args, backend=backend or None).impl


@torch.library.custom_op("genkernels::gelu_tanh", mutates_args=(), schema="(Tensor x, str backend) -> Tensor")
def _gelu_tanh_op(x: Tensor, backend: str) -> Tensor:
    x = dense_layout(x)
    return _impl_for(GELU_OP, backend, x).gelu_tanh_forward(x)


@_gelu_tanh_op.register_fake
def _(x, backend):
    return torch.empty_like(dense_layout(x))


@torch.library.custom_op(
    "genkernels::gelu_tanh_grad", mutates_args=(), schema="(Tensor dy, Tensor x, str backend) -> Tensor"
)
def _gelu_tanh_grad_op(dy: Tensor, x: Tensor, backend: str) -> Tensor:
    x = dense_layout(x)
    return _impl_for(GELU_OP, backend, x).gelu_tanh_grad(match_layout(dy, x).to(x.dtype), x)


@_gelu_tanh_grad_op.register_fake
def _(dy, x, backend):
    return torch.empty_like(dense_layout(x))


def _gelu_setup(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _gelu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _gelu_tanh_grad_op(dy, x, ctx.backend), None


_gelu_tanh_op.register_autograd(_gelu_backward, setup_context=_gelu_setup)


def _gelu_grad_setup(ctx, inputs, output):
    dy, x, backend = inputs
    ctx.save_for_backward(dy, x)
    ctx.backend = backend


def _gelu_grad_backward(ctx, ddx):
    dy, x = ctx.saved_tensors
    ddy = _gelu_tanh_grad_op(ddx, x, ctx.backend).to(dy.dtype) if ctx.needs_input_grad[0] else None
    dx = _gelu_second(ddx, dy, x) if ctx.needs_input_grad[1] else None
    return ddy, dx, None


_gelu_tanh_grad_op.register_autograd(_gelu_grad_backward, setup_context=_gelu_grad_setup)


@torch.library.custom_op("genkernels::swiglu", mutates_args=(), schema="(Tensor x, int dim, str backend) -> Tensor")
def _swiglu_op(x: Tensor, dim: int, backend: str) -> Tensor:
    x = x.contiguous()
    return _impl_for(SWIGLU_OP, backend, x, dim).swiglu_forward(x, dim)


@_swiglu_op.register_fake
def _(x, dim, backend):
    shape = list(x.shape)
    shape[dim] //= 2
    return x.new_empty(shape)


@torch.library.custom_op(
    "genkernels::swiglu_grad", mutates_args=(), schema="(Tensor dy, Tensor x, int dim, str backend) -> Tensor"
)
def _swiglu_grad_op(dy: Tensor, x: Tensor, dim: int, backend: str) -> Tensor:
    x = x.contiguous()
    return _impl_for(SWIGLU_OP, backend, x, dim).swiglu_grad(dy.contiguous().to(x.dtype), x, dim)


@_swiglu_grad_op.register_fake
def _(dy, x, dim, backend):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _swiglu_setup(ctx, inputs, output):
    x, dim, backend = inputs
    ctx.save_for_backward(x)
    ctx.args = (dim, backend)


def _swiglu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    dim, backend = ctx.args
    return _swiglu_grad_op(dy, x, dim, backend), None, None


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def _swiglu_grad_setup(ctx, inputs, output):
    dy, x, dim, backend = inputs
    ctx.save_for_backward(dy, x)
    ctx.dim = dim


def _swiglu_grad_backward(ctx, ddx):
    dy, x = ctx.saved_tensors
    ddy, dx = _swiglu_second(ddx, dy, x, ctx.dim, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return ddy, dx, None, None


_swiglu_grad_op.register_autograd(_swiglu_grad_backward, setup_context=_swiglu_grad_setup)


# --------------------------------------------------------------------------- public ops


def gelu_tanh(x: Tensor, *, backend: str | None = None) -> Tensor:
    """GELU with the tanh approximation, exactly torch's ``F.gelu(x, approximate="tanh")`` formula:
    y = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), in one pass.

    Args:
        x: any shape, float32, float16 or bfloat16 (float64: reference only). Contiguous and channels_last
            run in place (y keeps the layout); other strides are copied once.
        backend: "auto" / None, "reference", "triton" or "cuda".

    Returns y in x's dtype and shape. Differentiable in x to any order: the backward is one fused pass,
    itself differentiable. Under torch.compile the call goes through ``genkernels::gelu_tanh``.
    """
    _check_x(x)
    if torch.compiler.is_compiling():
        return _gelu_tanh_op(x, backend or "")
    if x.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(GELU_OP, x, backend=backend)
        return gelu_tanh_reference(x)
    x = dense_layout(x)
    chosen = _registry.select(GELU_OP, x, backend=backend)
    if chosen.name == "reference":
        return gelu_tanh_reference(x)
    return _autograd.apply(_GeluTanhFunction, x, chosen.impl)


def swiglu(x: Tensor, *, dim: int = -1, backend: str | None = None) -> Tensor:
    """The SwiGLU gate: with x = [a; b] split in halves along dim, y = silu(a) * b = a sigmoid(a) b, in one
    pass reading x once and writing y once.

    Args:
        x: any shape with an even x.shape[dim] (the two projections concatenated), float32, float16 or
            bfloat16 (float64: reference only). Non-contiguous x is copied once.
        dim: the dim holding [a; b] (default the last: (B, L, 2 * hidden) -> (B, L, hidden)).
        backend: "auto" / None, "reference", "triton" or "cuda".

    Returns y, contiguous, in x's dtype, x's shape with dim halved. Differentiable in x: the backward
    writes dx = [da; db] in one fused pass, itself differentiable. Under torch.compile the
    call goes through ``genkernels::swiglu``.
    """
    dim = _check_swiglu(x, dim)
    if torch.compiler.is_compiling():
        return _swiglu_op(x, dim, backend or "")
    if x.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(SWIGLU_OP, x, dim, backend=backend)
        return swiglu_reference(x, dim)
    x = x.contiguous()
    chosen = _registry.select(SWIGLU_OP, x, dim, backend=backend)
    if chosen.name == "reference":
        return swiglu_reference(x, dim)
    return _autograd.apply(_SwigluFunction, x, dim, chosen.impl)


#: Where linear_gelu_tanh can take the matrix product's GELU epilogue: CUDA (cuBLASLt) and meta (shapes only,
#: so that a forward traced or counted on the meta device follows the CUDA path; on CPU,
#: ``torch._addmm_activation`` applies the exact erf GELU, not the tanh approximation). 16-bit dtypes only: in
#: float32 the epilogue's GELU is less accurate than float32 arithmetic (on an H200, a 3-block float32 DiT's
#: output was 1.65e-05 from float64 with it and 1.9e-06 without, its PyTorch-layer twin 2.7e-06), while in
#: float16 and bfloat16 the output's own rounding dwarfs it.
_EPILOGUE_DEVICES = ("cuda", "meta")
_EPILOGUE_DTYPES = (torch.float16, torch.bfloat16)


def _check_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if (t is not None or name != "bias") and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x must have in_features = weight.shape[1] = {weight.shape[1]} in its last dim, got shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (out_features), got {tuple(bias.shape)}")


def _autocast_on(x: Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled()


def _is_compiling() -> bool:
    """torch.compiler.is_compiling(), behind a seam of its own: ``genkernels.bench.traffic`` routes the ops
    through their torch.library ops while it counts (it patches torch.compiler.is_compiling) and patches this
    one back, so that the count follows the eager GPU path's epilogue."""
    return torch.compiler.is_compiling()


def gelu_epilogue(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str | None = None) -> bool:
    """Whether :func:`linear_gelu_tanh` runs these arguments as one matrix product with the bias and GELU in its
    epilogue (True) or as F.linear then :func:`gelu_tanh` (False); see linear_gelu_tanh for the conditions."""
    if _is_compiling():  # traced: the backend scope is read when the graph runs, in gelu_tanh's op
        return False
    if bias is None or x.device.type not in _EPILOGUE_DEVICES or x.numel() == 0:
        return False
    if not (x.dtype == weight.dtype == bias.dtype and x.dtype in _EPILOGUE_DTYPES):
        return False
    if x.device != weight.device or x.device != bias.device:
        return False
    if _registry.requested(backend, GELU_OP) != "auto" or _autocast_on(x):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad))


def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """gelu_tanh(x @ weight.T + bias): the first layer of a GELU MLP (ViT, DiT) with its activation.

    On CUDA, when the call is in auto mode (no ``backend`` from the argument, a ``genkernels.backend`` scope (for
    every op, or for ``gelu_tanh``) or GENKERNELS_BACKEND), nothing needs a gradient (inference, sampling, or
    ``torch.no_grad``), there is a bias, autocast is off, and x, weight and bias share a float16 or bfloat16 dtype,
    the bias and the GELU run in the matrix product's epilogue (cuBLASLt, through ``torch._addmm_activation(bias, x,
    weight.T, use_gelu=True)``, the tanh approximation on CUDA, applied before the product is rounded to x's dtype):
    the (..., out_features) activations are written once, instead of written by the product, then read and written
    again by the activation. At DiT-XL/2's mlp_ratio 4 that is 8 of the 21 passes over a (B, L, dim) tensor a block
    forward moves outside its matrix products. Otherwise (training, CPU, an explicit backend, or under
    torch.compile, which traces the ``genkernels::gelu_tanh`` op): ``gelu_tanh(F.linear(x, weight, bias),
    backend=backend)``, whose fused backward reads the pre-activation autograd keeps. ``gelu_epilogue(x, weight,
    bias, backend)`` says which path a call takes.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        backend: the gelu_tanh backend ("auto" / None, "reference", "triton" or "cuda"); an explicit one runs
            F.linear and that backend's gelu_tanh.

    Returns (..., out_features) in x's dtype. Differentiable (through the second path whenever a gradient is
    needed).
    """
    _check_linear(x, weight, bias)
    if gelu_epilogue(x, weight, bias, backend):
        y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return y.view(*x.shape[:-1], weight.shape[0])
    return gelu_tanh(F.linear(x, weight, bias), backend=backend)


__all__ = ["gelu_epilogue", "gelu_tanh", "gelu_tanh_reference", "linear_gelu_tanh", "swiglu", "swiglu_reference"]


_registry.register_check(GELU_OP, gelu_tanh, _check_x)
_registry.register_check(SWIGLU_OP, swiglu, _check_swiglu)
