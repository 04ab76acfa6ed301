"""Fused bias + activation (StyleGAN's bias_act) with a differentiable backward: reference,
validation, dispatch and autograd.

For x with C = x.shape[dim] and an optional bias (C,) added along ``dim``:

    z = x + bias
    y = act(z) * gain,  clamped to [-clamp, clamp] when clamp is set

Activations (default gain): linear (1), relu (sqrt 2), lrelu (sqrt 2; alpha 0.2: z if z > 0 else
alpha z), tanh (1), sigmoid (1), silu (1: z sigmoid(z)), gelu (1: exact, 0.5 z (1 + erf(z / sqrt 2))).

Backward: dz = dy * gain * act'(z) * m, with m = 1 where -clamp <= act(z) * gain <= clamp (torch.clamp's
gradient) and everywhere without a clamp; dx = dz, dbias = dz summed over every dim but ``dim``. At
non-finite values it is torch's autograd of the same composition, which applies the clamp's gradient first:
dz = act_backward(m ? dy * gain : 0, z), act_backward(g, z) = g * act'(z) except for relu, a select
(0 where z <= 0, else g, as torch's threshold_backward): so relu passes the gradient at a NaN z, gives 0 and
not NaN where z <= 0 whatever dy, and an act'(z) that is NaN (a NaN z; silu and gelu at +-inf) makes dz NaN
even where the clamp stops the gradient.
The backward is itself differentiable (the R1 penalty of GAN training differentiates a gradient):
d dz / d dy = gain * act'(z) * m (the same fused kernel, applied to the incoming gradient; torch applies
m last there, which differs only where act'(z) is NaN: for the smooth activations with a clamp the map then
runs unclamped and m is applied after it), and d dz / d z = dy * gain * act''(z) * m, zero for the
piecewise-linear activations.

All arithmetic is float32 (float64 for float64 inputs on the reference).

Fused backend interface (genkernels.triton.bias_act and genkernels.cuda.bias_act implement it): x
dense (contiguous or channels last; anything else copied once), numel > 0, bias None or a contiguous
(C,) tensor of one of the backend's BIAS_DTYPES (the op casts any other bias to float32 first; both
fast backends read float32, float16 and bfloat16 biases as they are, which spares a cast kernel a
call).

    BIAS_DTYPES                                                         the bias dtypes read as they are
    not_supported(x, bias, act, dim) -> str | None
    forward(x, bias, act, alpha, gain, clamp, dim) -> y                  one pass: x read, y written
    grad(dy, x, bias, act, alpha, gain, clamp, dim, out_dtype=None) -> dz
                                                                        one pass: dy, x read, dz written
                                                                        (in out_dtype, default x's)
    grad_bias(dy, x, bias, act, alpha, gain, clamp, dim, need_dz) -> (dz | None, dbias)
                                                                        one pass: dz in x's dtype and the
                                                                        bias gradient (bias's dtype)
                                                                        reduced in float32 from the
                                                                        unrounded dz

Optional, gradient codes (the cuda backend): for the piecewise-linear activations, whose act' takes two
values, the forward can write 2 bits an element from which the backward follows without x: element e (in
memory order) at bits 2 (e % 4) of byte e // 4 of a uint8 tensor of 2 * ceil(numel / 8) bytes; bit 0
the slope is 1 (z > 0; for relu not z <= 0, so also at a NaN z), bit 1 the clamp passes the gradient
(always set without a clamp). The backward then reads a quarter of a byte an element in place of x (2 or 4
bytes), and autograd keeps the codes instead of x.

    CODE_ACTS                                                           the activations with codes
    forward_codes(x, bias, act, alpha, gain, clamp, dim) -> (y, codes) | None
                                                                        y and the codes in one pass (None:
                                                                        not for this call)
    grad(..., codes=codes), grad_bias(..., codes=codes)                 the codes in place of x (x None)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _autograd, _checks, _registry
from .._layout import contiguous_or_none, dense_layout, is_channels_last, match_layout
from ..cuda import bias_act as _cuda
from ..triton import bias_act as _triton

OP = "bias_act"
ACTS = ("linear", "relu", "lrelu", "tanh", "sigmoid", "silu", "gelu")
DEFAULT_GAIN = {"relu": math.sqrt(2.0), "lrelu": math.sqrt(2.0)}
DEFAULT_ALPHA = 0.2
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- validation


def _check(x, bias, act, alpha, gain, clamp, dim) -> tuple[float, float, float | None, int]:
    """Raise a clear error naming the argument; returns (alpha, gain, clamp, dim) with defaults filled in."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if type(dim) is not int:
        if not _checks.is_integer(dim):
            raise ValueError(f"dim must be an int, got {dim!r}")
        dim = int(dim)
    if bias is None:
        # dim only says where a bias goes: without one any int is accepted (a 0-D or 1-D x at the default dim 1).
        return (*act_params(act, alpha, gain, clamp), dim % x.dim() if -x.dim() <= dim < x.dim() else 0)
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() == 0:
        raise ValueError(f"a bias needs x with at least one dim to add it along; x is 0-D (bias {tuple(bias.shape)})")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
    dim = dim % x.dim()
    if tuple(bias.shape) != (x.shape[dim],):
        raise ValueError(
            f"bias must have shape ({x.shape[dim]},) (x.shape[dim] for dim={dim}), got {tuple(bias.shape)}"
        )
    if bias.dtype not in DTYPES:
        raise TypeError(f"bias must be float32, float16, bfloat16 or float64, got {bias.dtype}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}: use one device")
    return (*act_params(act, alpha, gain, clamp), dim)


def act_params(act, alpha, gain, clamp) -> tuple[float, float, float | None]:
    """Check an activation and its parameters (as bias_act and the ops built on it take them); returns
    (alpha, gain, clamp) with the defaults filled in (alpha 0.2; gain sqrt 2 for relu and lrelu, else 1)."""
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    if alpha is None:
        alpha = DEFAULT_ALPHA
    elif not _checks.is_finite_real(alpha):
        raise ValueError(f"alpha must be a finite float or None, got {alpha!r}")
    if gain is None:
        gain = DEFAULT_GAIN.get(act, 1.0)
    elif not _checks.is_finite_real(gain):
        raise ValueError(f"gain must be a finite float or None, got {gain!r}")
    if clamp is not None and not (_checks.is_finite_real(clamp) and clamp > 0):
        raise ValueError(f"clamp must be None or a finite float > 0, got {clamp!r}")
    return float(alpha), float(gain), (None if clamp is None else float(clamp))


# --------------------------------------------------------------------------- reference


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _act(z: Tensor, act: str, alpha: float) -> Tensor:
    if act == "linear":
        return z
    if act == "relu":
        return F.relu(z)
    if act == "lrelu":
        return F.leaky_relu(z, alpha)
    if act == "tanh":
        return torch.tanh(z)
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act == "silu":
        return F.silu(z)
    return F.gelu(z)


def _pre(x: Tensor, bias: Tensor | None, dim: int) -> Tensor:
    """z = x + bias along dim, in the accumulation dtype."""
    z = x.to(_acc(x))
    if bias is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        z = z + bias.to(z.dtype).view(shape)
    return z


def bias_act_reference(
    x: Tensor,
    bias: Tensor | None = None,
    *,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
    dim: int = 1,
) -> Tensor:
    """The specification in eager PyTorch (float32, float64 for float64 x): differentiable to any order."""
    alpha, gain, clamp, dim = _check(x, bias, act, alpha, gain, clamp, dim)
    y = _act(_pre(x, bias, dim), act, alpha) * gain
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    return y.to(x.dtype)


def _act_grad1(z: Tensor, act: str, alpha: float) -> Tensor:
    """act'(z) of every activation but relu (a select: :func:`_act_backward`), with torch's conventions at the
    kink and at NaN (leaky_relu'(0) = leaky_relu'(NaN) = alpha)."""
    if act == "linear":
        return torch.ones_like(z)
    if act == "lrelu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, alpha))
    if act == "tanh":
        t = torch.tanh(z)
        return 1.0 - t * t
    if act == "sigmoid":
        sg = torch.sigmoid(z)
        return sg * (1.0 - sg)
    if act == "silu":
        sg = torch.sigmoid(z)
        return sg * (1.0 + z * (1.0 - sg))
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _act_backward(g: Tensor, z: Tensor, act: str, alpha: float) -> Tensor:
    """g * act'(z), as torch's autograd applies act' to an incoming gradient g: for relu a select (0 where
    z <= 0, else g, as threshold_backward), so a NaN z passes g and a NaN or infinite g gives 0 where z <= 0."""
    if act == "relu":
        return torch.where(z <= 0, torch.zeros_like(g), g)
    return g * _act_grad1(z, act, alpha)


def _grad_map(dy: Tensor, z: Tensor, act: str, alpha: float, gain: float, clamp: float | None) -> Tensor:
    """dz = act_backward(m ? dy * gain : 0, z) in z's dtype, in torch's autograd order (the clamp's gradient
    first): an act'(z) that is NaN keeps dz NaN where the clamp stops the gradient, as in torch."""
    g = dy.to(z.dtype) * gain
    mask = _clamp_mask(z, act, alpha, gain, clamp)
    if mask is not None:
        g = torch.where(mask, g, torch.zeros_like(g))
    return _act_backward(g, z, act, alpha)


def _clamp_mask(z: Tensor, act: str, alpha: float, gain: float, clamp: float | None) -> Tensor | None:
    """Where torch.clamp passes the gradient (-clamp <= act(z) * gain <= clamp), or None without a clamp."""
    if clamp is None:
        return None
    pre = _act(z, act, alpha) * gain
    return (pre >= -clamp) & (pre <= clamp)


def _reference_forward(x, bias, act, alpha, gain, clamp, dim):
    y = _act(_pre(x, bias, dim), act, alpha) * gain
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    return match_layout(y.to(x.dtype), x)


def _reference_dz(dy, x, bias, act, alpha, gain, clamp, dim, codes):
    """dz in the accumulation dtype: from z = x + bias, or from the gradient codes when given (x unused)."""
    if codes is not None:
        return _codes_grad(dy, codes, act, alpha, gain, clamp, _acc(dy))
    return _grad_map(dy, _pre(x, bias, dim), act, alpha, gain, clamp)


def _reference_grad(dy, x, bias, act, alpha, gain, clamp, dim, out_dtype=None, codes=None):
    """dy has x's dtype and layout (as every caller passes it)."""
    dz = _reference_dz(dy, x, bias, act, alpha, gain, clamp, dim, codes)
    return match_layout(dz.to(out_dtype or dy.dtype), dy)


def _reference_grad_bias(dy, x, bias, act, alpha, gain, clamp, dim, need_dz, codes=None):
    dz = _reference_dz(dy, x, bias, act, alpha, gain, clamp, dim, codes)
    return (match_layout(dz.to(dy.dtype), dy) if need_dz else None), _sum_except(dz, dim).to(bias.dtype)


# Gradient codes (see the module doc): the format in torch, for the reference kernels.
CODE_ACTS = ("linear", "relu", "lrelu")
_CODE_SHIFTS = (0, 2, 4, 6)


def _memory_order(t: Tensor, like: Tensor) -> Tensor:
    """t (like's shape) flattened in like's memory order (contiguous or channels last)."""
    if is_channels_last(like):
        return t.permute(0, *range(2, t.dim()), 1).reshape(-1)
    return t.reshape(-1)


def _from_memory_order(flat: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`_memory_order`: flat (numel,) back to like's shape, in like's layout."""
    if is_channels_last(like):
        shape = (like.shape[0], *like.shape[2:], like.shape[1])
        return flat.view(shape).permute(0, like.dim() - 1, *range(1, like.dim() - 1))
    return flat.view(like.shape)


def _reference_forward_codes(x, bias, act, alpha, gain, clamp, dim):
    if act not in CODE_ACTS:
        return None
    z = _pre(x, bias, dim)
    mask = _clamp_mask(z, act, alpha, gain, clamp)
    passes = torch.ones_like(z, dtype=torch.uint8) if mask is None else mask.to(torch.uint8)
    slope_one = ~(z <= 0) if act == "relu" else z > 0  # relu's gradient passes at a NaN z, lrelu's is alpha
    code = slope_one.to(torch.uint8) + 2 * passes
    flat = _memory_order(code, x)
    flat = F.pad(flat, (0, -flat.numel() % 8)).view(-1, 4)
    shifts = torch.tensor(_CODE_SHIFTS, dtype=torch.uint8, device=x.device)
    return _reference_forward(x, bias, act, alpha, gain, clamp, dim), (flat << shifts).sum(1, dtype=torch.uint8)


def _codes_grad(dy: Tensor, codes: Tensor, act: str, alpha: float, gain: float, clamp, acc: torch.dtype) -> Tensor:
    """dz from the codes: dy * gain, 0 where the clamp stops the gradient, then where the slope bit is clear
    0 (relu) or times alpha (lrelu): the same operations as from z."""
    shifts = torch.tensor(_CODE_SHIFTS, dtype=torch.uint8, device=codes.device)
    code = _from_memory_order(((codes[:, None] >> shifts) & 3).view(-1)[: dy.numel()], dy)
    g = dy.to(acc) * gain
    if clamp is not None:
        g = torch.where((code & 2).bool(), g, torch.zeros_like(g))
    if act == "linear":
        return g
    return torch.where((code & 1).bool(), g, torch.zeros_like(g) if act == "relu" else g * alpha)


class _ReferenceKernels:
    """The reference formulas behind the fast backends' interface (the traced op uses it), gradient codes
    included (what the tests run the op's autograd on)."""

    BIAS_DTYPES = DTYPES
    CODE_ACTS = CODE_ACTS
    forward = staticmethod(_reference_forward)
    forward_codes = staticmethod(_reference_forward_codes)
    grad = staticmethod(_reference_grad)
    grad_bias = staticmethod(_reference_grad_bias)


def _act_grad2(z: Tensor, act: str) -> Tensor | None:
    """act''(z), or None for the piecewise-linear activations (zero almost everywhere)."""
    if act in ("linear", "relu", "lrelu"):
        return None
    if act == "tanh":
        t = torch.tanh(z)
        return -2.0 * t * (1.0 - t * t)
    if act == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1.0 - s) * (1.0 - 2.0 * s)
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)  # gelu'' = phi(z) (2 - z^2)
    return pdf * (2.0 - z * z)


# --------------------------------------------------------------------------- registry


def _fast_not_supported(backend_not_supported):
    """A not_supported taking bias_act's public arguments (as `genkernels.explain` passes them)."""

    def not_supported(x, bias=None, act="linear", dim=1, **_rest) -> str | None:
        if x.dtype not in FAST_DTYPES:
            return f"x has dtype {x.dtype}; supported: float32, float16, bfloat16"
        return backend_not_supported(x, bias, act, dim % max(x.dim(), 1))

    return not_supported


# Measured fastest first where training spends its time (H100, docs/results/h100-d2ccd93-gan.md, at the
# ANCHORS shape): bf16 forward + backward cuda 0.43 ms, triton 0.86 ms; the forwards alone are within 8%
# (bf16 triton 0.099 ms, cuda 0.107 ms).
_registry.register(OP, "cuda", _fast_not_supported(_cuda.not_supported), _cuda)
_registry.register(OP, "triton", _fast_not_supported(_triton.not_supported), _triton)
_registry.register(OP, "reference", lambda *a, **k: None, _ReferenceKernels)


def _probe(device: torch.device) -> tuple:
    """Arguments of a typical call (a StyleGAN layer's bias + leaky ReLU), for `genkernels.info()`."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return (torch.randn(4, 64, 16, 16, device=device, dtype=dtype), torch.zeros(64, device=device), {"act": "lrelu"})


_registry.register_probe(OP, _probe)


# --------------------------------------------------------------------------- autograd (fast path)


def _kernel_bias(impl, bias: Tensor | None) -> Tensor | None:
    """The bias as ``impl``'s kernels read it: as it is when they take its dtype (and it is contiguous),
    else a contiguous float32 copy. Called where autograd records the cast, so that gradients of any
    order reach the caller's bias through it."""
    if bias is None:
        return None
    if bias.dtype in impl.BIAS_DTYPES:
        return bias.contiguous()
    return bias.float().contiguous()


def _spread_bias_grad(ddz: Tensor | None, ddb: Tensor | None, x: Tensor, dim: int) -> Tensor | None:
    """The gradient reaching dz when dbias = dz summed over every dim but ``dim``: ddz plus ddb broadcast back
    along ``dim`` (in float32, float64 for float64 x), None when neither is given (an empty ddb is none)."""
    if ddb is None or not ddb.numel():
        return ddz
    shape = [1] * x.dim()
    shape[dim] = -1
    spread = ddb.to(_acc(x)).view(shape).expand(x.shape)
    return spread if ddz is None else ddz.to(spread.dtype) + spread


def _sum_except(t: Tensor, dim: int) -> Tensor:
    """t summed over every dim but ``dim`` (t itself for a 1-D t)."""
    dims = [d for d in range(t.dim()) if d != dim]
    return t.sum(dims) if dims else t


def _second_order(ddz, dy, x, bias, act, alpha, gain, clamp, dim, need_x, need_bias):
    """d/dx and d/dbias of sum(ddz * dz) with dz = act_backward(m ? dy * gain : 0, z): ddz * (m ? dy * gain : 0)
    * act''(z) (zero for the piecewise-linear activations; NaN where act''(z) is, as torch's), as torch
    expressions (differentiable again)."""
    if not (need_x or need_bias):
        return None, None
    z = _pre(x, bias, dim)
    second = _act_grad2(z, act)
    if second is None:  # piecewise-linear: act'' = 0 almost everywhere
        return (torch.zeros_like(x) if need_x else None), (torch.zeros_like(bias) if need_bias else None)
    g = dy.to(z.dtype) * gain
    mask = _clamp_mask(z, act, alpha, gain, clamp)
    if mask is not None:
        g = torch.where(mask, g, torch.zeros_like(g))
    term = ddz.to(z.dtype) * g * second
    return (term.to(x.dtype) if need_x else None), (_sum_except(term, dim).to(bias.dtype) if need_bias else None)


def _masks_late(act: str, clamp: float | None) -> bool:
    """Whether d dz / d dy applies the clamp's mask after the map rather than in it: torch masks the product
    gain * act'(z) * ddz there, which differs from masking ddz where act'(z) is NaN, possible for the smooth
    activations only. Their map then runs unclamped and :func:`_mask_after` follows."""
    return clamp is not None and act not in CODE_ACTS


def _mask_after(ddy: Tensor, x: Tensor, bias: Tensor | None, act, alpha, gain, clamp, dim) -> Tensor:
    """ddy, 0 where the clamp stops the gradient."""
    mask = _clamp_mask(_pre(x, bias, dim), act, alpha, gain, clamp)
    return torch.where(mask, ddy, torch.zeros_like(ddy))


def _kernel_grads(impl, dy, x, codes, kb, act, alpha, gain, clamp, dim, want_bias, need_dz):
    """(dz, dbias): the backend's grad_bias when ``want_bias`` (dz None without ``need_dz``), else its grad and
    None; from the gradient codes in place of x when ``codes`` is given."""
    extra = {} if codes is None else {"codes": codes}
    if want_bias:
        return impl.grad_bias(dy, x, kb, act, alpha, gain, clamp, dim, need_dz, **extra)
    return impl.grad(dy, x, kb, act, alpha, gain, clamp, dim, None, **extra), None


def _layout_of(x: Tensor) -> Tensor:
    """A meta tensor with x's shape, strides and dtype: what the backward needs of x when it keeps the codes."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


class _BiasActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kb, act, alpha, gain, clamp, dim, impl):
        """kb: the bias as the kernels read it (:func:`_kernel_bias`), or None. When a backward may follow and
        the backend has gradient codes for ``act``, the forward writes them and the backward reads them in
        place of x (which autograd then does not keep)."""
        ctx.args = (act, alpha, gain, clamp, dim, impl)
        coded = None
        if _autograd.records(ctx) and act in getattr(impl, "CODE_ACTS", ()):
            coded = impl.forward_codes(x, kb, act, alpha, gain, clamp, dim)
        if coded is None:
            ctx.save_for_backward(x, kb)
            ctx.like = None
            return impl.forward(x, kb, act, alpha, gain, clamp, dim)
        y, codes = coded
        ctx.save_for_backward(codes, kb)
        ctx.like = _layout_of(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        first, kb = ctx.saved_tensors
        act, alpha, gain, clamp, dim, impl = ctx.args
        x, codes = (first, None) if ctx.like is None else (None, first)
        like = first if ctx.like is None else ctx.like
        dy = match_layout(dy, like)
        want_bias, need_dz = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        if torch.is_grad_enabled():  # create_graph: the gradient is differentiated again (R1)
            if codes is None:
                dz, db = _BiasActGradFunction.apply(dy, x, kb, act, alpha, gain, clamp, dim, impl, want_bias, need_dz)
            else:
                args = (act, alpha, gain, clamp, dim, impl, want_bias, need_dz)
                dz, db = _CodesGradFunction.apply(dy, codes, like, kb, *args)
        else:  # a plain backward: the kernels directly, without building a graph node
            dz, db = _kernel_grads(impl, dy, x, codes, kb, act, alpha, gain, clamp, dim, want_bias, need_dz)
        dbias = db.to(kb.dtype) if want_bias else None  # no copy: the kernels write kb's dtype
        return dz, dbias, None, None, None, None, None, None


class _BiasActGradFunction(torch.autograd.Function):
    """(dz, dbias) = (dy * gain * act'(z) * m, dz summed over every dim but ``dim``) in one fused pass,
    differentiable in dy, x and bias (``kb``: the bias as the kernels read it). dbias (kb's dtype) only
    when ``want_bias`` (else an empty tensor); dz (x's dtype) only when ``need_dz`` or without
    ``want_bias`` (else None)."""

    @staticmethod
    def forward(ctx, dy, x, kb, act, alpha, gain, clamp, dim, impl, want_bias, need_dz):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(dy, x, kb)
        ctx.args = (act, alpha, gain, clamp, dim, impl)
        if want_bias:
            return impl.grad_bias(dy, x, kb, act, alpha, gain, clamp, dim, need_dz)
        return impl.grad(dy, x, kb, act, alpha, gain, clamp, dim, None), x.new_empty((0,), dtype=torch.float32)

    @staticmethod
    def backward(ctx, ddz, ddb):
        dy, x, kb = ctx.saved_tensors
        act, alpha, gain, clamp, dim, impl = ctx.args
        needs = ctx.needs_input_grad
        ddz = _spread_bias_grad(ddz, ddb, x, dim)
        if ddz is None:
            return (None,) * 11
        ddz = match_layout(ddz, x)
        # d dz / d dy: the same fused map applied to the incoming gradient (itself differentiable).
        ddy = None
        if needs[0]:
            late = _masks_late(act, clamp)
            ddy, _ = _BiasActGradFunction.apply(
                ddz.to(dy.dtype), x, kb, act, alpha, gain, None if late else clamp, dim, impl, False, True
            )
            ddy = ddy.to(dy.dtype)
            if late:
                ddy = _mask_after(ddy, x, kb, act, alpha, gain, clamp, dim)
        dx, db = _second_order(ddz, dy, x, kb, act, alpha, gain, clamp, dim, needs[1], needs[2])
        return ddy, dx, db, None, None, None, None, None, None, None, None


class _CodesGradFunction(torch.autograd.Function):
    """(dz, dbias) of :class:`_BiasActGradFunction` from the gradient codes (piecewise-linear activations):
    dz = dy * gain * slope * m, linear in dy, and constant in x and the bias almost everywhere (act'' = 0),
    so differentiable in dy alone. ``like``: a meta tensor with x's shape, strides and dtype."""

    @staticmethod
    def forward(ctx, dy, codes, like, kb, act, alpha, gain, clamp, dim, impl, want_bias, need_dz):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(codes, kb)
        ctx.like = like
        ctx.args = (act, alpha, gain, clamp, dim, impl)
        dz, db = _kernel_grads(impl, dy, None, codes, kb, act, alpha, gain, clamp, dim, want_bias, need_dz)
        return dz, (db if want_bias else dy.new_empty((0,), dtype=torch.float32))

    @staticmethod
    def backward(ctx, ddz, ddb):
        codes, kb = ctx.saved_tensors
        act, alpha, gain, clamp, dim, impl = ctx.args
        ddz = _spread_bias_grad(ddz, ddb, ctx.like, dim)
        if ddz is None or not ctx.needs_input_grad[0]:
            return (None,) * 12
        # d dz / d dy: the same map from the codes, applied to the incoming gradient (itself differentiable).
        args = (act, alpha, gain, clamp, dim, impl, False, True)
        ddy, _ = _CodesGradFunction.apply(match_layout(ddz, ctx.like).to(ctx.like.dtype), codes, ctx.like, kb, *args)
        return ddy, *(None,) * 11


# --------------------------------------------------------------------------- torch.library ops (traced path)


def _impl_for(backend: str, x: Tensor, bias: Tensor | None, act: str, dim: int):
    if x.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(OP, x, bias, act, dim, backend=backend or None)
        return _ReferenceKernels
    return _registry.select(OP, x, bias, act, dim, backend=backend or None).impl


# Explicit schemas: torch 2.4 cannot infer them from postponed (string) annotations. bias is the float32
# (C,) the kernels read; clamp travels as (has_clamp, clamp).
@torch.library.custom_op(
    "genkernels::bias_act",
    mutates_args=(),
    schema="(Tensor x, Tensor? bias, str act, float alpha, float gain, bool has_clamp, float clamp, int dim,"
    " str backend) -> Tensor",
)
def _bias_act_op(
    x: Tensor,
    bias: Tensor | None,
    act: str,
    alpha: float,
    gain: float,
    has_clamp: bool,
    clamp: float,
    dim: int,
    backend: str,
) -> Tensor:
    x, bias = dense_layout(x), contiguous_or_none(bias)
    impl = _impl_for(backend, x, bias, act, dim)
    return impl.forward(x, bias, act, alpha, gain, clamp if has_clamp else None, dim)


@_bias_act_op.register_fake
def _(x, bias, act, alpha, gain, has_clamp, clamp, dim, backend):
    return torch.empty_like(dense_layout(x))


@torch.library.custom_op(
    "genkernels::bias_act_grad",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor? bias, str act, float alpha, float gain, bool has_clamp, float clamp,"
    " int dim, bool float32_out, str backend) -> Tensor",
)
def _bias_act_grad_op(
    dy: Tensor,
    x: Tensor,
    bias: Tensor | None,
    act: str,
    alpha: float,
    gain: float,
    has_clamp: bool,
    clamp: float,
    dim: int,
    float32_out: bool,
    backend: str,
) -> Tensor:
    """dz = dy * gain * act'(z) * m, in float32 when float32_out (for the bias gradient's sum), else x's dtype."""
    x, bias = dense_layout(x), contiguous_or_none(bias)
    impl = _impl_for(backend, x, bias, act, dim)
    out_dtype = torch.float32 if float32_out and x.dtype != torch.float64 else None
    return impl.grad(
        match_layout(dy, x).to(x.dtype), x, bias, act, alpha, gain, clamp if has_clamp else None, dim, out_dtype
    )


@_bias_act_grad_op.register_fake
def _(dy, x, bias, act, alpha, gain, has_clamp, clamp, dim, float32_out, backend):
    out = torch.empty_like(dense_layout(x))
    return out.float() if float32_out and x.dtype != torch.float64 else out


def _op_setup(ctx, inputs, output):
    x, bias, act, alpha, gain, has_clamp, clamp, dim, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.args = (act, alpha, gain, has_clamp, clamp, dim, backend)


def _op_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    act, alpha, gain, has_clamp, clamp, dim, backend = ctx.args
    need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if need_bias:  # dz and dbias in one fused pass
        dz, dbias = _bias_act_grad_bias_op(dy, x, bias, act, alpha, gain, has_clamp, clamp, dim, need_x, backend)
        return (dz if need_x else None), dbias.to(bias.dtype), None, None, None, None, None, None, None
    dz = _bias_act_grad_op(dy, x, bias, act, alpha, gain, has_clamp, clamp, dim, False, backend)
    return (dz if need_x else None), None, None, None, None, None, None, None, None


_bias_act_op.register_autograd(_op_backward, setup_context=_op_setup)


def _grad_setup(ctx, inputs, output):
    dy, x, bias, act, alpha, gain, has_clamp, clamp, dim, float32_out, backend = inputs
    ctx.save_for_backward(dy, x, bias)
    ctx.args = (act, alpha, gain, has_clamp, clamp, dim, backend)


def _traced_grad_grads(ddz, dy, x, bias, args, needs):
    """(ddy, dx, dbias) of the traced gradient map dz(dy, x, bias) given the gradient ddz reaching dz: ddy through
    the fused map itself (``genkernels::bias_act_grad``, differentiable again), dx and dbias from act''."""
    act, alpha, gain, has_clamp, clamp, dim, backend = args
    ddy = None
    if needs[0]:
        late = has_clamp and _masks_late(act, clamp)
        ddy = _bias_act_grad_op(
            ddz.to(dy.dtype), x, bias, act, alpha, gain, has_clamp and not late, clamp, dim, False, backend
        )
        if late:
            ddy = _mask_after(ddy, x, bias, act, alpha, gain, clamp, dim)
    b32 = bias if bias is not None else x.new_zeros((x.shape[dim],), dtype=torch.float32)
    dx, db = _second_order(
        ddz, dy, x, b32, act, alpha, gain, clamp if has_clamp else None, dim, needs[1], needs[2] and bias is not None
    )
    return ddy, dx, db


def _grad_backward(ctx, ddz):
    dy, x, bias = ctx.saved_tensors
    return *_traced_grad_grads(ddz, dy, x, bias, ctx.args, ctx.needs_input_grad), *(None,) * 8


_bias_act_grad_op.register_autograd(_grad_backward, setup_context=_grad_setup)


@torch.library.custom_op(
    "genkernels::bias_act_grad_bias",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor bias, str act, float alpha, float gain, bool has_clamp, float clamp,"
    " int dim, bool need_dz, str backend) -> (Tensor, Tensor)",
)
def _bias_act_grad_bias_op(
    dy: Tensor,
    x: Tensor,
    bias: Tensor,
    act: str,
    alpha: float,
    gain: float,
    has_clamp: bool,
    clamp: float,
    dim: int,
    need_dz: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dz in x's dtype, or an empty tensor without ``need_dz``; dbias = dz summed over every dim but ``dim``,
    in bias's dtype) in one fused pass (the backends' grad_bias)."""
    x, bias = dense_layout(x), contiguous_or_none(bias)
    impl = _impl_for(backend, x, bias, act, dim)
    dz, dbias = impl.grad_bias(
        match_layout(dy, x).to(x.dtype), x, bias, act, alpha, gain, clamp if has_clamp else None, dim, need_dz
    )
    return (dz if dz is not None else x.new_empty((0,))), dbias


@_bias_act_grad_bias_op.register_fake
def _(dy, x, bias, act, alpha, gain, has_clamp, clamp, dim, need_dz, backend):
    dz = torch.empty_like(dense_layout(x)) if need_dz else x.new_empty((0,))
    return dz, bias.new_empty(bias.shape)


def _grad_bias_setup(ctx, inputs, output):
    dy, x, bias, act, alpha, gain, has_clamp, clamp, dim, need_dz, backend = inputs
    ctx.save_for_backward(dy, x, bias)
    ctx.args = (act, alpha, gain, has_clamp, clamp, dim, backend, need_dz)


def _grad_bias_backward(ctx, ddz, ddb):
    """The gradients of (dz, dbias) in dy, x and bias: dbias's gradient spreads back onto dz's (dbias is dz
    summed), then as :func:`_grad_backward`."""
    dy, x, bias = ctx.saved_tensors
    *args, need_dz = ctx.args
    ddz = ddz if need_dz and ddz is not None and ddz.numel() else None
    total = _spread_bias_grad(ddz, ddb, x, args[5])
    if total is None:
        return (None,) * 11
    return *_traced_grad_grads(total, dy, x, bias, args, ctx.needs_input_grad), *(None,) * 8


_bias_act_grad_bias_op.register_autograd(_grad_bias_backward, setup_context=_grad_bias_setup)


# --------------------------------------------------------------------------- public op


def bias_act(
    x: Tensor,
    bias: Tensor | None = None,
    *,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
    dim: int = 1,
    backend: str | None = None,
) -> Tensor:
    """Bias + activation + gain (+ clamp) in one pass: y = clamp(act(x + bias) * gain).

    Args:
        x: any shape, float32, float16 or bfloat16 (float64: reference only). Contiguous and
            channels_last run in place (y keeps the layout); other strides are copied once.
        bias: optional (C,) tensor, C = x.shape[dim], any float dtype on x's device.
        act: "linear", "relu", "lrelu", "tanh", "sigmoid", "silu" or "gelu" (exact erf).
        alpha: lrelu's negative slope (default 0.2).
        gain: output scale (default sqrt(2) for relu and lrelu, 1 otherwise).
        clamp: clamp y to [-clamp, clamp] (None: no clamp).
        dim: the dim bias runs along (1: channels of an (N, C, ...) tensor); checked only with a bias, so
            a 0-D or 1-D x without one runs at the default.
        backend: "auto" / None, "reference", "triton" or "cuda".

    Under torch.compile the call goes through the ``genkernels::bias_act`` op and its gradient ops,
    ``genkernels::bias_act_grad_bias`` (dx and dbias in one fused pass) and ``genkernels::bias_act_grad``
    (dx alone), both themselves differentiable.

    Returns y in x's dtype, shape and layout. Differentiable in x and bias to second order (and
    beyond): the backward is one fused pass, and is itself differentiable, for GAN penalties such as
    R1 that differentiate a gradient.
    """
    alpha, gain, clamp, dim = _check(x, bias, act, alpha, gain, clamp, dim)
    if torch.compiler.is_compiling():
        b32 = None if bias is None else bias.float()
        has_clamp = clamp is not None
        return _bias_act_op(x, b32, act, alpha, gain, has_clamp, clamp or 0.0, dim, backend or "")
    if x.dim() == 0:  # a scalar (never with a bias): the same call on its one element
        return bias_act(x.reshape(1), act=act, alpha=alpha, gain=gain, clamp=clamp, dim=0, backend=backend).reshape(())
    if x.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(OP, x, bias, act, dim, backend=backend)
        return bias_act_reference(x, bias, act=act, alpha=alpha, gain=gain, clamp=clamp, dim=dim)
    x = dense_layout(x)
    chosen = _registry.select(OP, x, bias, act, dim, backend=backend)
    if chosen.name == "reference":
        return bias_act_reference(x, bias, act=act, alpha=alpha, gain=gain, clamp=clamp, dim=dim)
    kb = _kernel_bias(chosen.impl, bias)
    return _autograd.apply(_BiasActFunction, x, kb, act, alpha, gain, clamp, dim, chosen.impl)


__all__ = ["ACTS", "DEFAULT_GAIN", "bias_act", "bias_act_reference"]


_registry.register_check(OP, bias_act, _check)
