"""Adaptive LayerNorm (adaLN) of diffusion transformers: LayerNorm / RMSNorm with per-sample or per-token
modulation, the gated residual, and the two fused. Reference, validation, dispatch, autograd and
torch.library ops.

For x (B, L, D) with R = B * L rows of D elements, statistics in float32 (float64 for float64 inputs on
the reference):

    LayerNorm:  mean = mean_D(x),  rstd = rsqrt(mean_D((x - mean)^2) + eps),  xhat = (x - mean) * rstd
    RMSNorm:    rstd = rsqrt(mean_D(x^2) + eps),  xhat = x * rstd                (rms=True; no bias)
    n = xhat * weight + bias                                                    (each when given, (D,))
    y = n * (1 + scale) + shift                                                 (each when given)

    layer_norm_modulate(x, ...)                       -> y
    gated_residual(x, y, gate)                        -> out = x + gate * y
    gated_residual_layer_norm_modulate(x, y, gate, ...) -> (h, out): h = x + gate * y, out = the norm of h

shift, scale and gate are (B, D) or (B, 1, D) (per sample: broadcast over the L tokens, diffusers'
``shift[:, None]``) or (B, L, D) (per token); a batch dim of 1 in place of B gives every sample the same one, as
torch broadcasts it. The ops take them as views (a (B, 1, D) one as (B, D), a batch dim of 1 expanded with stride
0): no copy, except a (1, L, D) one, which the fast backends copy once as (B, L, D). Their gradients have their
own shapes (summed over the batch for a batch dim of 1). gate may be None: the plain residual x + y (a pre-norm
transformer's residual add and the next norm, in one pass).

y may have another dtype than x (autocast's float32 residual stream and bfloat16 branch output). gated_residual's
out is in torch.promote_types(x.dtype, y.dtype), as x + gate * y is in torch (the gate, like shift and scale,
does not widen it). The fused op's h and out stay in x's dtype: the residual stream keeps its dtype. In the fused
op, h is rounded to x's dtype before it is normalized: out is exactly the norm of the h that is returned (as
the two unfused calls would give where y's dtype is not wider than x's). Gradients are in each input's dtype.

Backward, with dy the incoming gradient of y:

    dshift = dy,  dscale = dy * n,  dn = dy * (1 + scale),  dweight = sum_rows dn * xhat,  dbias = sum_rows dn
    dxhat = dn * weight
    LayerNorm:  dx = rstd * (dxhat - mean_D(dxhat) - xhat * mean_D(dxhat * xhat))
    RMSNorm:    dx = rstd * (dxhat - xhat * mean_D(dxhat * xhat))

with dshift / dscale summed over the L tokens of each sample when they are (B, D). The gated residual:
dx = dout, dy = dout * gate (dout without a gate), dgate = dout * y (summed over L for a (B, D) gate); in
the fused op the gradient reaching h is the incoming dh plus the norm's dx, and that sum is x's gradient.

Reference path: ``*_reference`` below are the formulas in eager PyTorch (differentiable to any order);
``backend="reference"`` runs them, and so does auto where no fast backend can run (CPU without the triton
interpreter, float64). Empty tensors take them on every backend, without a launch, once an explicitly
requested backend has said it can run the call (else its UnsupportedError, as for non-empty inputs). The
fast backends' backward is one fused pass, first order only.

Fused backend interface (genkernels.triton.adaln and genkernels.cuda.adaln implement it; registry ops
"layer_norm_modulate", "gated_residual", "gated_residual_layer_norm_modulate", order cuda, triton,
reference). Every tensor is a 2-D view of R = B * L rows:

- a row tensor (x, y, h, dy, dout, dh): (R, D), dtype x's (float32, float16 or bfloat16), stride(1) == 1
  and any row stride stride(0) (a (B, L, D) tensor whose rows are evenly spaced is passed as a view;
  anything else is copied once by the op). numel > 0. y may have another of those dtypes (the op gives
  gated_residual's x the output's dtype first); dy is in y's dtype.
- a modulation tensor (shift, scale, gate): None or (S, D) with stride(1) == 1 and any row stride, dtype
  x's or float32 (the op converts any other dtype to float32). S == R: per token, row r reads row r; else
  S == R // tokens: per sample, row r reads row r // tokens. (With tokens == 1, S == R: per token.)
- weight, bias: None or contiguous (D,), in float32 or in x's dtype, one dtype for both (the op converts other
  dtypes, and a pair of two dtypes, to float32).
- tokens: L, the rows per sample. eps: float > 0. rms: bool (bias is then None).
- mean, rstd: contiguous float32 (R,) (mean is written as 0 with rms=True).
- outputs are new contiguous tensors; (R, D) outputs in x's dtype unless said otherwise.
- gradients of per-sample modulations: float32 (S, D), reduced from per-block float32 partials in a
  fixed order (deterministic, no atomics), like dweight and dbias (float32 (D,)). Gradients of per-token
  modulations: (R, D) in that modulation tensor's dtype, except dshift, which is dy itself: the backend
  returns None for a per-token dshift and the op uses dy. A gradient not asked for (need_* False) or of
  an absent input is None.

    not_supported(x) -> str | None
        x: the public (B, L, D) input (dtype float32 / float16 / bfloat16 and devices already checked).
    layer_norm_modulate_forward(x, weight, bias, shift, scale, tokens, eps, rms, stats=True) -> (y, mean, rstd)
        reads x once, writes y once; mean and rstd None when not ``stats`` (no backward follows).
    layer_norm_modulate_backward(dy, x, weight, bias, shift, scale, mean, rstd, tokens, rms,
                                 need_dx, need_dweight, need_dbias, need_dshift, need_dscale)
        -> (dx, dweight, dbias, dshift, dscale)
        recomputes xhat from x, mean and rstd; reads dy and x once, writes dx once.
    gated_residual_forward(x, y, gate, tokens) -> out (x's dtype)
    gated_residual_backward(dout, y, gate, tokens, need_dy, need_dgate) -> (dy, dgate)
        (x's gradient is dout itself: the op uses it.)
    gated_residual_layer_norm_modulate_forward(x, y, gate, weight, bias, shift, scale, tokens, eps, rms,
                                               stats=True) -> (h, out, mean, rstd)
        one pass: x, y read once; h (x's dtype) and out written once; the statistics are those of the
        rounded h (None when not ``stats``).
    gated_residual_layer_norm_modulate_backward(dh, dout, h, y, gate, weight, bias, shift, scale, mean,
                                                rstd, tokens, rms, need_dy, need_dgate, need_dweight,
                                                need_dbias, need_dshift, need_dscale)
        -> (dx, dy, dgate, dweight, dbias, dshift, dscale)
        dh: None (h's gradient is zero) or a row tensor. dx = dh + the norm's input gradient, always
        returned; dy = dx * gate; dgate = dx * y. One pass: dout, h, y (and dh) read once, dx and dy
        written once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _autograd, _checks, _registry
from ..cuda import adaln as _cuda
from ..triton import adaln as _triton

NORM_OP = "layer_norm_modulate"
GATE_OP = "gated_residual"
FUSED_OP = "gated_residual_layer_norm_modulate"
#: The three adaLN ops' registry names, e.g. for ``genkernels.backend("triton", ops=OPS)``.
OPS = (NORM_OP, GATE_OP, FUSED_OP)
#: Inside ``genkernels.graph_mode()`` auto takes triton for the adaLN ops on CUDA tensors x of at least this many
#: elements. Replayed from CUDA graphs on an H200 (run 5, bf16), the triton kernels took 45 to 52% of the cuda
#: ones' time forward and 63 to 73% forward + backward, at DiT-XL's (2, 4096, 1152) and FLUX's (1, 4608, 3072),
#: both ops (layer_norm_modulate 0.0168 against 0.0370 ms at DiT-XL); as plain calls the cuda path was faster, its
#: CPU time lower. Below this size (ImageGPT's decoding rows, DiT-XL/2's 256 tokens) nothing was measured replayed: the
#: order stays.
GRAPH_TRITON_MIN_ELEMENTS = 2**22
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


# --------------------------------------------------------------------------- validation


def _check_x(x, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, L, D), got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be {_DTYPE_NAMES}, got {x.dtype}")


def _check_tensor(t, name: str, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be {_DTYPE_NAMES}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must be on one device")


def _check_modulation(t, name: str, x: Tensor) -> None:
    """shift / scale / gate: None, per sample (B, D) or (B, 1, D), per token (B, L, D); 1 in place of B: one for
    every sample."""
    if t is None:
        return
    _check_tensor(t, name, x)
    b, length, d = x.shape
    shape = tuple(t.shape)
    if not (t.dim() in (2, 3) and shape[0] in (b, 1) and shape[-1] == d and (t.dim() == 2 or shape[1] in (length, 1))):
        raise ValueError(
            f"{name} must have shape ({b}, {d}) or ({b}, 1, {d}) (per sample) or ({b}, {length}, {d}) (per token), "
            f"or one of these with 1 in place of B (one for every sample), for x of shape {tuple(x.shape)}, "
            f"got {shape}"
        )


def _as_modulation(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A checked modulation as (B, D) (per sample) or (B, L, D) (per token), a view of t: (B, 1, D) as (B, D)
    (for L != 1), and a batch dim of 1 expanded to B (stride 0). Autograd takes the gradient back to t's shape
    (summed over B where t had a batch dim of 1)."""
    if t is None:
        return None
    b, length, _ = x.shape
    if t.dim() == 3 and t.shape[1] == 1 and length != 1:
        t = t[:, 0]
    if t.shape[0] != b:
        t = t.expand(b, *t.shape[1:])
    return t


def _check_norm(x, weight, bias, shift, scale, eps, rms) -> float:
    """Raise a clear error naming the argument; returns eps as a float."""
    _check_x(x)
    d = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_tensor(t, name, x)
        if tuple(t.shape) != (d,):
            raise ValueError(f"{name} must have shape ({d},) (D = x.shape[-1]) or be None, got {tuple(t.shape)}")
    if not isinstance(rms, bool):
        raise TypeError(f"rms must be a bool, got {rms!r}")
    if rms and bias is not None:
        raise ValueError("bias must be None when rms=True (RMSNorm has no bias), got a tensor")
    _check_modulation(shift, "shift", x)
    _check_modulation(scale, "scale", x)
    if not (_checks.is_finite_real(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    return float(eps)


def _check_gate(x, y, gate) -> None:
    _check_x(x)
    _check_x(y, "y")
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}: all tensors must be on one device")
    _check_modulation(gate, "gate", x)


def _gate_dtype(x: Tensor, y: Tensor) -> torch.dtype:
    """gated_residual's output dtype: torch's promotion of x's and y's (a gate, like shift and scale, does not
    widen it)."""
    return torch.promote_types(x.dtype, y.dtype)


# --------------------------------------------------------------------------- reference


def _acc(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _mod3(t: Tensor | None, groups: int, tokens: int) -> Tensor | None:
    """A modulation as a tensor broadcasting against (groups, tokens, D): per token (groups * tokens, D) or
    (groups, tokens, D) as (groups, tokens, D); per sample (groups, D) as (groups, 1, D)."""
    if t is None:
        return None
    if t.dim() == 3 or (t.shape[0] == groups * tokens and tokens > 1):
        return t.reshape(groups, tokens, t.shape[-1])
    if tokens == 0:  # L = 0, nothing modulated: groups is B in the public ops, 0 for the kernels' 2-D views
        return t[:groups, None, :]
    return t[:, None, :]


def _norm(h: Tensor, weight, bias, eps: float, rms: bool):
    """(n, xhat, mean, rstd) of h (..., D) in the accumulation dtype."""
    hf = h.to(_acc(h))
    if rms:
        mean = torch.zeros(hf.shape[:-1], dtype=hf.dtype, device=hf.device)
        centered = hf
    else:
        mean = hf.mean(-1)
        centered = hf - mean[..., None]
    rstd = torch.rsqrt(centered.square().mean(-1) + eps)
    xhat = centered * rstd[..., None]
    n = xhat
    if weight is not None:
        n = n * weight.to(hf.dtype)
    if bias is not None:
        n = n + bias.to(hf.dtype)
    return n, xhat, mean, rstd


def _modulate(n: Tensor, shift3, scale3) -> Tensor:
    y = n
    if scale3 is not None:
        y = y * (1 + scale3.to(n.dtype))
    if shift3 is not None:
        y = y + shift3.to(n.dtype)
    return y


def layer_norm_modulate_reference(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    eps: float = 1e-6,
    rms: bool = False,
) -> Tensor:
    """The specification of :func:`layer_norm_modulate` in eager PyTorch (float32 arithmetic, float64 for
    float64 x), differentiable to any order. Returns y in x's dtype, contiguous."""
    eps = _check_norm(x, weight, bias, shift, scale, eps, rms)
    shift, scale = _as_modulation(shift, x), _as_modulation(scale, x)
    b, length, _ = x.shape
    n, _, _, _ = _norm(x, weight, bias, eps, rms)
    y = _modulate(n, _mod3(shift, b, length), _mod3(scale, b, length))
    return y.to(x.dtype, memory_format=torch.contiguous_format)


def _gated(x: Tensor, y: Tensor, gate3: Tensor | None) -> Tensor:
    """x + gate * y in float32 (float64 where x or y is) rounded once to x's dtype."""
    acc = _acc(x, y)
    branch = y.to(acc) if gate3 is None else gate3.to(acc) * y.to(acc)
    return (x.to(acc) + branch).to(x.dtype, memory_format=torch.contiguous_format)


def gated_residual_reference(x: Tensor, y: Tensor, gate: Tensor | None = None) -> Tensor:
    """The specification of :func:`gated_residual`: x + gate * y (x + y without a gate) in float32 (float64
    where x or y is float64), in torch.promote_types(x.dtype, y.dtype); differentiable to any order."""
    _check_gate(x, y, gate)
    gate = _as_modulation(gate, x)
    return _gated(x.to(_gate_dtype(x, y)), y, _mod3(gate, x.shape[0], x.shape[1]))


def gated_residual_layer_norm_modulate_reference(
    x: Tensor,
    y: Tensor,
    gate: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    eps: float = 1e-6,
    rms: bool = False,
) -> tuple[Tensor, Tensor]:
    """The specification of :func:`gated_residual_layer_norm_modulate`: (h, out) with h = x + gate * y (x + y
    without a gate)
    rounded to x's dtype (whatever y's dtype: the residual stream keeps its dtype) and
    out = layer_norm_modulate_reference(h, ...); differentiable to any order."""
    _check_gate(x, y, gate)
    _check_norm(x, weight, bias, shift, scale, eps, rms)
    h = _gated(x, y, _mod3(_as_modulation(gate, x), x.shape[0], x.shape[1]))
    return h, layer_norm_modulate_reference(h, weight, bias, shift, scale, eps=eps, rms=rms)


# The reference formulas behind the fast backends' 2-D interface (the traced ops run them when the
# reference is selected). Row tensors are (R, D); modulations (S, D) as in the module docstring.


def _groups(x2: Tensor, tokens: int) -> int:
    return x2.shape[0] // tokens if tokens else 0


def _per_token(t: Tensor | None, rows: int) -> bool:
    # No rows (B = 0): a (0, D) modulation is taken per sample, as the autograd formulas take it.
    return t is not None and rows > 0 and t.shape[0] == rows


def _ref_norm_forward(x2, weight, bias, shift, scale, tokens, eps, rms, stats=True):
    g = _groups(x2, tokens)
    x3 = x2.reshape(g, tokens, x2.shape[-1])
    n, _, mean, rstd = _norm(x3, weight, bias, eps, rms)
    y = _modulate(n, _mod3(shift, g, tokens), _mod3(scale, g, tokens)).reshape(x2.shape).to(x2.dtype)
    return (y, mean.reshape(-1), rstd.reshape(-1)) if stats else (y, None, None)


def _sum_tokens(t: Tensor, per_token: bool) -> Tensor:
    """A (groups, tokens, D) gradient as its modulation's: (R, D) per token, summed over tokens per sample."""
    return t.reshape(-1, t.shape[-1]) if per_token else t.sum(1)


def _ref_norm_backward_acc(dy, x2, weight, bias, shift, scale, mean, rstd, tokens, rms, needs):
    """(dx, dweight, dbias, dshift, dscale) in the accumulation dtype (see the module docstring's formulas);
    dx (groups, tokens, D)."""
    need_dx, need_dweight, need_dbias, need_dshift, need_dscale = needs
    rows = x2.shape[0]
    g = _groups(x2, tokens)
    acc = _acc(x2)
    x3 = x2.reshape(g, tokens, x2.shape[-1]).to(acc)
    dy3 = dy.reshape(g, tokens, dy.shape[-1]).to(acc)
    xhat = (x3 - mean.reshape(g, tokens, 1).to(acc)) * rstd.reshape(g, tokens, 1).to(acc)
    scale3 = _mod3(scale, g, tokens)
    dn = dy3 if scale3 is None else dy3 * (1 + scale3.to(acc))
    dweight = (dn * xhat).sum((0, 1)) if need_dweight and weight is not None else None
    dbias = dn.sum((0, 1)) if need_dbias and bias is not None else None
    dshift = None
    if need_dshift and shift is not None and not _per_token(shift, rows):
        dshift = dy3.sum(1)
    dscale = None
    if need_dscale and scale is not None:
        n = xhat if weight is None else xhat * weight.to(acc)
        if bias is not None:
            n = n + bias.to(acc)
        dscale = _sum_tokens(dy3 * n, _per_token(scale, rows))
    dx = None
    if need_dx:
        dxhat = dn if weight is None else dn * weight.to(acc)
        proj = (dxhat * xhat).mean(-1, keepdim=True)
        dx = dxhat - xhat * proj if rms else dxhat - dxhat.mean(-1, keepdim=True) - xhat * proj
        dx = dx * rstd.reshape(g, tokens, 1).to(acc)
    return dx, dweight, dbias, dshift, dscale


def _out_dtype(grad: Tensor | None, like: Tensor | None, rows: int) -> Tensor | None:
    """A modulation's gradient in the interface's dtype: per token its own dtype, per sample float32."""
    if grad is None:
        return None
    return grad.to(like.dtype) if _per_token(like, rows) else grad


def _ref_norm_backward(dy, x2, weight, bias, shift, scale, mean, rstd, tokens, rms, *needs):
    dx, dweight, dbias, dshift, dscale = _ref_norm_backward_acc(
        dy, x2, weight, bias, shift, scale, mean, rstd, tokens, rms, needs
    )
    rows = x2.shape[0]
    dx = None if dx is None else dx.reshape(x2.shape).to(x2.dtype)
    return dx, dweight, dbias, dshift, _out_dtype(dscale, scale, rows)


def _ref_gate_forward(x2, y2, gate, tokens):
    g = _groups(x2, tokens)
    out = _gated(x2.reshape(g, tokens, x2.shape[-1]), y2.reshape(g, tokens, y2.shape[-1]), _mod3(gate, g, tokens))
    return out.reshape(x2.shape)


def _ref_gate_backward_acc(dh3, y2, gate, tokens, need_dy, need_dgate):
    """(dy, dgate) of the gated residual from h's gradient dh3 (groups, tokens, D) in the accumulation dtype
    (without a gate dy is dh3 itself; y2 may be None when dy and dgate are not asked for)."""
    dy = dgate = None
    if need_dy:
        scaled = dh3 if gate is None else dh3 * _mod3(gate, dh3.shape[0], tokens).to(dh3.dtype)
        dy = scaled.reshape(y2.shape).to(y2.dtype)
    if need_dgate:
        rows, g = y2.shape[0], _groups(y2, tokens)
        dgate = _sum_tokens(dh3 * y2.reshape(g, tokens, y2.shape[-1]).to(dh3.dtype), _per_token(gate, rows))
        dgate = _out_dtype(dgate, gate, rows)
    return dy, dgate


def _ref_gate_backward(dout, y2, gate, tokens, need_dy, need_dgate):
    g = _groups(y2, tokens)
    return _ref_gate_backward_acc(
        dout.reshape(g, tokens, dout.shape[-1]).to(_acc(dout, y2)), y2, gate, tokens, need_dy, need_dgate
    )


def _ref_fused_forward(x2, y2, gate, weight, bias, shift, scale, tokens, eps, rms, stats=True):
    h = _ref_gate_forward(x2, y2, gate, tokens)
    out, mean, rstd = _ref_norm_forward(h, weight, bias, shift, scale, tokens, eps, rms, stats)
    return h, out, mean, rstd


def _ref_fused_backward(
    dh, dout, h2, y2, gate, weight, bias, shift, scale, mean, rstd, tokens, rms, need_dy, need_dgate, *needs
):
    dxn, dweight, dbias, dshift, dscale = _ref_norm_backward_acc(
        dout, h2, weight, bias, shift, scale, mean, rstd, tokens, rms, (True, *needs)
    )
    if dh is not None:
        dxn = dxn + dh.reshape(dxn.shape).to(dxn.dtype)
    dy, dgate = _ref_gate_backward_acc(dxn, y2, gate, tokens, need_dy, need_dgate)
    rows = h2.shape[0]
    return dxn.reshape(h2.shape).to(h2.dtype), dy, dgate, dweight, dbias, dshift, _out_dtype(dscale, scale, rows)


class _ReferenceKernels:
    """The reference formulas behind the fast backends' interface (used inside the traced ops)."""

    layer_norm_modulate_forward = staticmethod(_ref_norm_forward)
    layer_norm_modulate_backward = staticmethod(_ref_norm_backward)
    gated_residual_forward = staticmethod(_ref_gate_forward)
    gated_residual_backward = staticmethod(_ref_gate_backward)
    gated_residual_layer_norm_modulate_forward = staticmethod(_ref_fused_forward)
    gated_residual_layer_norm_modulate_backward = staticmethod(_ref_fused_backward)


# --------------------------------------------------------------------------- registry


def _fast_not_supported(backend, op: str):
    """A not_supported taking the op's public arguments (as `genkernels.explain` passes them): the first is x,
    whose dtype decides, and the gated ops' second y, whose dtype must be one the kernels read; the backend module
    then checks x's device and D, and (the fused op) a y in another dtype than x's (``fused_y_not_supported``)."""
    y_not_supported = getattr(backend, "fused_y_not_supported", None) if op == FUSED_OP else None

    def not_supported(x, *args, **kwargs) -> str | None:
        if x.dtype not in FAST_DTYPES:
            return f"x has dtype {x.dtype}; supported: float32, float16, bfloat16"
        y = None if op == NORM_OP else (args[0] if args else kwargs.get("y"))
        if isinstance(y, Tensor) and y.dtype not in FAST_DTYPES:
            return f"y has dtype {y.dtype}; supported: float32, float16, bfloat16"
        reason = backend.not_supported(x)
        if reason is None and isinstance(y, Tensor) and y_not_supported is not None:
            reason = y_not_supported(x, y)
        return reason

    return not_supported


def _no_reason(*_args, **_kwargs) -> None:
    return None


def _graph_order(x, *_args, **_kwargs) -> tuple[str, ...] | None:
    """The adaLN ops' auto order inside ``genkernels.graph_mode()``: triton first for a CUDA x of at least
    GRAPH_TRITON_MIN_ELEMENTS elements, else the registration order."""
    if getattr(x, "is_cuda", False) and x.numel() >= GRAPH_TRITON_MIN_ELEMENTS:
        return ("triton",)
    return None


for _op in OPS:
    _registry.register(_op, "cuda", _fast_not_supported(_cuda, _op), _cuda)
    _registry.register(_op, "triton", _fast_not_supported(_triton, _op), _triton)
    _registry.register(_op, "reference", _no_reason, _ReferenceKernels)
    _registry.register_graph_order(_op, _graph_order)


def _probe_x(device: torch.device) -> Tensor:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.randn(2, 64, 72, device=device, dtype=dtype)


def _norm_probe(device: torch.device) -> tuple:
    """A typical call (a DiT block's per-sample modulation), for `genkernels.info()`."""
    x = _probe_x(device)
    return (x, None, None, torch.randn(2, 72, device=device), torch.randn(2, 72, device=device))


def _gate_probe(device: torch.device) -> tuple:
    x = _probe_x(device)
    return (x, torch.randn_like(x), torch.randn(2, 72, device=device))


def _fused_probe(device: torch.device) -> tuple:
    return _gate_probe(device) + _norm_probe(device)[1:]


_registry.register_probe(NORM_OP, _norm_probe)
_registry.register_probe(GATE_OP, _gate_probe)
_registry.register_probe(FUSED_OP, _fused_probe)


# --------------------------------------------------------------------------- the 2-D views the kernels take


def _rows(t: Tensor) -> Tensor:
    """A (B, L, D) tensor as (R, D) with stride(1) == 1: a view when its rows are evenly spaced, else a copy."""
    d = t.shape[-1]
    if t.stride(-1) != 1 and d > 1:
        t = t.contiguous()
    try:
        return t.view(-1, d)
    except RuntimeError:  # rows not evenly spaced (e.g. a slice along L of a strided batch)
        return t.contiguous().view(-1, d)


def _mod_rows(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A modulation as the kernels take it: (S, D), stride(1) == 1, x's dtype or float32."""
    if t is None:
        return None
    if t.dtype not in (x.dtype, torch.float32):
        t = t.float()
    if t.dim() == 3:
        return _rows(t)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _affine(weight: Tensor | None, bias: Tensor | None, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(weight, bias) in the interface's form: contiguous, as they are when they share a dtype that is x's or
    float32 (a bf16 model's norms launch no conversion), else both float32."""
    present = [t for t in (weight, bias) if t is not None]
    dtypes = {t.dtype for t in present}
    keep = len(dtypes) <= 1 and dtypes <= {x.dtype, torch.float32}
    return tuple(None if t is None else (t if keep else t.float()).contiguous() for t in (weight, bias))


def _mod_grad(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """A kernel gradient (float32 (B, D) or (R, D)) in the modulation's own shape and dtype."""
    if grad is None or like is None:
        return None
    return grad.reshape(like.shape).to(like.dtype)


def _affine_grad(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if grad is None or like is None else grad.to(like.dtype)


# --------------------------------------------------------------------------- autograd (eager fast path)


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shift, scale, eps, rms, impl):
        x2 = _rows(x)
        kernel_args = (*_affine(weight, bias, x), _mod_rows(shift, x), _mod_rows(scale, x))
        # The statistics only where a backward may follow (autograd records this call).
        stats = _autograd.records(ctx)
        y2, mean, rstd = impl.layer_norm_modulate_forward(x2, *kernel_args, x.shape[1], eps, rms, stats)
        if stats:
            ctx.save_for_backward(x2, *kernel_args, mean, rstd)
            ctx.args = (x.shape, weight, bias, shift, scale, rms, impl)
        return y2.view_as(x)

    @staticmethod
    @_autograd.first_order_only(NORM_OP)  # create_graph=True: an explicit error, never a silent zero
    def backward(ctx, dy):
        x2, w32, b32, shift2, scale2, mean, rstd = ctx.saved_tensors
        shape, weight, bias, shift, scale, rms, impl = ctx.args
        needs = ctx.needs_input_grad
        dy2 = _rows(dy.to(x2.dtype))
        dx, dweight, dbias, dshift, dscale = impl.layer_norm_modulate_backward(
            dy2, x2, w32, b32, shift2, scale2, mean, rstd, shape[1], rms, *needs[:5]
        )
        if needs[3] and dshift is None and shift is not None:  # per token: dshift is dy
            dshift = dy2
        return (
            None if dx is None else dx.view(shape),
            _affine_grad(dweight, weight),
            _affine_grad(dbias, bias),
            _mod_grad(dshift, shift),
            _mod_grad(dscale, scale),
            None,
            None,
            None,
        )


class _GateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, impl):
        y2, gate2 = _rows(y), _mod_rows(gate, x)
        out = impl.gated_residual_forward(_rows(x), y2, gate2, x.shape[1])
        ctx.save_for_backward(y2, gate2)
        ctx.args = (x.shape, x.dtype, gate, impl)
        return out.view_as(x)

    @staticmethod
    @_autograd.first_order_only(GATE_OP)  # create_graph=True: an explicit error, never a silent zero
    def backward(ctx, dout):
        y2, gate2 = ctx.saved_tensors
        shape, dtype, gate, impl = ctx.args
        needs = ctx.needs_input_grad
        dout = dout.to(dtype)
        if gate is None:  # x + y: both gradients are dout (in y's dtype), no launch
            dy, dgate = (dout.to(y2.dtype) if needs[1] else None), None
        else:
            dy, dgate = impl.gated_residual_backward(_rows(dout), y2, gate2, shape[1], needs[1], needs[2])
        return (
            dout if needs[0] else None,
            None if dy is None else dy.view(shape),
            _mod_grad(dgate, gate),
            None,
        )


class _FusedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, weight, bias, shift, scale, eps, rms, impl):
        ctx.set_materialize_grads(False)  # an unused h (or out) costs no zero-filled gradient
        y2, gate2 = _rows(y), _mod_rows(gate, x)
        kernel_args = (*_affine(weight, bias, x), _mod_rows(shift, x), _mod_rows(scale, x))
        stats = _autograd.records(ctx)  # the statistics only where a backward may follow
        h, out, mean, rstd = impl.gated_residual_layer_norm_modulate_forward(
            _rows(x), y2, gate2, *kernel_args, x.shape[1], eps, rms, stats
        )
        if stats:
            # Without a gate y's gradient is x's: y is not needed (nor kept) for the backward.
            ctx.save_for_backward(h, None if gate is None else y2, gate2, *kernel_args, mean, rstd)
            ctx.args = (x.shape, y.dtype, gate, weight, bias, shift, scale, rms, impl)
        return h.view_as(x), out.view_as(x)

    @staticmethod
    @_autograd.first_order_only(FUSED_OP)  # create_graph=True: an explicit error, never a silent zero
    def backward(ctx, dh, dout):
        h, y2, gate2, w32, b32, shift2, scale2, mean, rstd = ctx.saved_tensors
        shape, y_dtype, gate, weight, bias, shift, scale, rms, impl = ctx.args
        needs = ctx.needs_input_grad
        tokens = shape[1]
        gated = gate is not None
        # What the kernels compute: without a gate neither dy nor dgate (y's gradient is x's, taken below).
        need_dy, need_dgate = (needs[1], needs[2]) if gated else (False, False)
        kernel_needs = (need_dy, need_dgate, *needs[3:7])
        dh2 = None if dh is None else _rows(dh.to(h.dtype))
        grads = [None] * 7  # dx, dy, dgate, dweight, dbias, dshift, dscale
        if dout is not None:
            dout2 = _rows(dout.to(h.dtype))
            grads = list(
                impl.gated_residual_layer_norm_modulate_backward(
                    dh2, dout2, h, y2, gate2, w32, b32, shift2, scale2, mean, rstd, tokens, rms, *kernel_needs
                )
            )
            if needs[5] and grads[5] is None and shift is not None:  # per token: dshift is dout
                grads[5] = dout2
        elif dh2 is not None:  # only h is used downstream: the gated residual's backward
            grads[0] = dh2
            if gated:
                grads[1], grads[2] = impl.gated_residual_backward(dh2, y2, gate2, tokens, need_dy, need_dgate)
        if not gated and needs[1] and grads[0] is not None:  # x + y: y's gradient is x's, in y's dtype
            grads[1] = grads[0].to(y_dtype)
        dx, dy, dgate, dweight, dbias, dshift, dscale = grads
        return (
            dx.view(shape) if dx is not None and needs[0] else None,
            dy.view(shape) if dy is not None and needs[1] else None,
            _mod_grad(dgate, gate) if needs[2] else None,
            _affine_grad(dweight, weight),
            _affine_grad(dbias, bias),
            _mod_grad(dshift, shift),
            _mod_grad(dscale, scale),
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------- torch.library ops (traced path)


def _impl_for(op: str, backend: str, x: Tensor, *args):
    """Resolve the backend at run time (the scope and environment apply to compiled code too); args: the gated
    ops' y (or None), whose dtype the fast backends check."""
    if x.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(op, x, *args, backend=backend or None)
        return _ReferenceKernels
    return _registry.select(op, x, *args, backend=backend or None).impl


def _kernel_mods(impl, x: Tensor, *mods):
    """The modulation tensors in the interface's form (the reference takes them as they are)."""
    if impl is _ReferenceKernels:
        return tuple(None if t is None else (_rows(t) if t.dim() == 3 else t) for t in mods)
    return tuple(_mod_rows(t, x) for t in mods)


def _kernel_affine(impl, x: Tensor, weight: Tensor | None, bias: Tensor | None):
    return (weight, bias) if impl is _ReferenceKernels else _affine(weight, bias, x)


def _empty_like_or_none(t: Tensor | None, x: Tensor, needed: bool) -> Tensor:
    """The fake of a gradient: like t when it is needed, else an empty (0,) tensor (ops cannot return None)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format) if needed and t is not None else x.new_empty((0,))


def _token_shift(shift: Tensor | None, x: Tensor) -> bool:
    """Whether shift has a row per token (then its gradient is the incoming gradient itself, which the
    backward ops leave to the autograd formula: an op output may not alias its input)."""
    return shift is not None and (shift.dim() == 3 or x.shape[1] == 1)


def _grad_or_empty(grad: Tensor | None, like: Tensor | None, x: Tensor) -> Tensor:
    if grad is None or like is None:
        return x.new_empty((0,))
    if x.numel() == 0 and grad.numel() != like.numel():  # L = 0: a per-sample sum over no tokens is zero
        return torch.zeros_like(like)
    return grad.reshape(like.shape).to(like.dtype)


@torch.library.custom_op(
    "genkernels::layer_norm_modulate",
    mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale, float eps, bool rms, str backend)"
    " -> (Tensor, Tensor, Tensor)",
)
def _norm_op(x, weight, bias, shift, scale, eps, rms, backend):
    """(y (B, L, D), mean (R,), rstd (R,)); statistics in the accumulation dtype."""
    impl = _impl_for(NORM_OP, backend, x)
    y2, mean, rstd = impl.layer_norm_modulate_forward(
        _rows(x), *_kernel_affine(impl, x, weight, bias), *_kernel_mods(impl, x, shift, scale), x.shape[1], eps, rms
    )
    return y2.view(x.shape), mean, rstd


@_norm_op.register_fake
def _(x, weight, bias, shift, scale, eps, rms, backend):
    stats = x.new_empty((x.shape[0] * x.shape[1],), dtype=_acc(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


_NORM_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale, Tensor mean, Tensor rstd,"
    " bool rms, bool need_dweight, bool need_dbias, bool need_dshift, bool need_dscale, str backend)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("genkernels::layer_norm_modulate_backward", mutates_args=(), schema=_NORM_BACKWARD_SCHEMA)
def _norm_backward_op(dy, x, weight, bias, shift, scale, mean, rstd, rms, nw, nb, nsh, nsc, backend):
    """(dx, dweight, dbias, dshift, dscale), each in its input's shape and dtype; empty (0,) when not needed,
    and for a per-token shift (its gradient is dy: the autograd formula takes it)."""
    impl = _impl_for(NORM_OP, backend, x)
    dy2 = _rows(dy.to(x.dtype))
    dx, dweight, dbias, dshift, dscale = impl.layer_norm_modulate_backward(
        dy2,
        _rows(x),
        *_kernel_affine(impl, x, weight, bias),
        *_kernel_mods(impl, x, shift, scale),
        mean,
        rstd,
        x.shape[1],
        rms,
        True,
        nw,
        nb,
        nsh,
        nsc,
    )
    return (
        dx.view(x.shape),
        _grad_or_empty(dweight if nw else None, weight, x),
        _grad_or_empty(dbias if nb else None, bias, x),
        _grad_or_empty(dshift if nsh else None, shift, x),
        _grad_or_empty(dscale if nsc else None, scale, x),
    )


@_norm_backward_op.register_fake
def _(dy, x, weight, bias, shift, scale, mean, rstd, rms, nw, nb, nsh, nsc, backend):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        _empty_like_or_none(weight, x, nw),
        _empty_like_or_none(bias, x, nb),
        _empty_like_or_none(shift, x, nsh and not _token_shift(shift, x)),
        _empty_like_or_none(scale, x, nsc),
    )


def _norm_setup(ctx, inputs, output):
    x, weight, bias, shift, scale, eps, rms, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, shift, scale, mean, rstd)
    ctx.args = (rms, backend)


def _norm_op_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, shift, scale, mean, rstd = ctx.saved_tensors
    rms, backend = ctx.args
    n = ctx.needs_input_grad
    needs = (
        n[1] and weight is not None,
        n[2] and bias is not None,
        n[3] and shift is not None,
        n[4] and scale is not None,
    )
    dx, *rest = _norm_backward_op(dy, x, weight, bias, shift, scale, mean, rstd, rms, *needs, backend)
    if needs[2] and _token_shift(shift, x):
        rest[2] = dy.reshape(shift.shape).to(shift.dtype)
    return (dx, *(g if need else None for g, need in zip(rest, needs)), None, None, None)


_norm_op.register_autograd(_norm_op_backward, setup_context=_norm_setup)


@torch.library.custom_op(
    "genkernels::gated_residual", mutates_args=(), schema="(Tensor x, Tensor y, Tensor? gate, str backend) -> Tensor"
)
def _gate_op(x, y, gate, backend):
    """x + gate * y, (B, L, D) in x's dtype (the public op gives x the output's dtype)."""
    impl = _impl_for(GATE_OP, backend, x, y)
    (gate2,) = _kernel_mods(impl, x, gate)
    return impl.gated_residual_forward(_rows(x), _rows(y), gate2, x.shape[1]).view(x.shape)


@_gate_op.register_fake
def _(x, y, gate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "genkernels::gated_residual_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor y, Tensor gate, bool need_dy, bool need_dgate, str backend) -> (Tensor, Tensor)",
)
def _gate_backward_op(dout, y, gate, need_dy, need_dgate, backend):
    """(dy, dgate) in y's and gate's shapes and dtypes; empty (0,) when not needed. dout is in x's dtype (the
    output's)."""
    impl = _impl_for(GATE_OP, backend, dout, y)
    (gate2,) = _kernel_mods(impl, dout, gate)
    dy, dgate = impl.gated_residual_backward(_rows(dout), _rows(y), gate2, y.shape[1], need_dy, need_dgate)
    return _grad_or_empty(dy, y if need_dy else None, y), _grad_or_empty(dgate, gate if need_dgate else None, y)


@_gate_backward_op.register_fake
def _(dout, y, gate, need_dy, need_dgate, backend):
    return _empty_like_or_none(y, y, need_dy), _empty_like_or_none(gate, y, need_dgate)


def _gate_setup(ctx, inputs, output):
    x, y, gate, backend = inputs
    ctx.save_for_backward(y, gate)
    ctx.backend = backend


def _gate_op_backward(ctx, dout):
    y, gate = ctx.saved_tensors
    n = ctx.needs_input_grad
    if gate is None:  # x + y: both gradients are dout (y's in its dtype)
        return dout if n[0] else None, dout.to(y.dtype) if n[1] else None, None, None
    dy, dgate = _gate_backward_op(dout, y, gate, n[1], n[2], ctx.backend)
    return dout if n[0] else None, dy if n[1] else None, dgate if n[2] else None, None


_gate_op.register_autograd(_gate_op_backward, setup_context=_gate_setup)


@torch.library.custom_op(
    "genkernels::gated_residual_layer_norm_modulate",
    mutates_args=(),
    schema="(Tensor x, Tensor y, Tensor? gate, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale, float eps,"
    " bool rms, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _fused_op(x, y, gate, weight, bias, shift, scale, eps, rms, backend):
    """(h, out, mean, rstd): h and out (B, L, D) in x's dtype, the statistics of h (R,)."""
    impl = _impl_for(FUSED_OP, backend, x, y)
    h, out, mean, rstd = impl.gated_residual_layer_norm_modulate_forward(
        _rows(x),
        _rows(y),
        *_kernel_mods(impl, x, gate),
        *_kernel_affine(impl, x, weight, bias),
        *_kernel_mods(impl, x, shift, scale),
        x.shape[1],
        eps,
        rms,
    )
    return h.view(x.shape), out.view(x.shape), mean, rstd


@_fused_op.register_fake
def _(x, y, gate, weight, bias, shift, scale, eps, rms, backend):
    stats = x.new_empty((x.shape[0] * x.shape[1],), dtype=_acc(x))
    like = torch.empty_like(x, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like), stats, torch.empty_like(stats)


@torch.library.custom_op(
    "genkernels::gated_residual_layer_norm_modulate_backward",
    mutates_args=(),
    schema="(Tensor? dh, Tensor dout, Tensor h, Tensor? y, Tensor? gate, Tensor? weight, Tensor? bias, Tensor? shift,"
    " Tensor? scale, Tensor mean, Tensor rstd, bool rms, bool need_dy, bool need_dgate, bool need_dweight,"
    " bool need_dbias, bool need_dshift, bool need_dscale, str backend)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _fused_backward_op(
    dh, dout, h, y, gate, weight, bias, shift, scale, mean, rstd, rms, ny, ng, nw, nb, nsh, nsc, backend
):
    """(dx, dy, dgate, dweight, dbias, dshift, dscale) in their inputs' shapes and dtypes; empty (0,) when not
    needed, and for a per-token shift (its gradient is dout: the autograd formula takes it). Without a gate, y
    is None (and need_dy, need_dgate False): y's gradient is dx, which the autograd formula takes."""
    impl = _impl_for(FUSED_OP, backend, h, y)
    dout2 = _rows(dout.to(h.dtype))
    dx, dy, dgate, dweight, dbias, dshift, dscale = impl.gated_residual_layer_norm_modulate_backward(
        None if dh is None else _rows(dh.to(h.dtype)),
        dout2,
        _rows(h),
        None if y is None else _rows(y),
        *_kernel_mods(impl, h, gate),
        *_kernel_affine(impl, h, weight, bias),
        *_kernel_mods(impl, h, shift, scale),
        mean,
        rstd,
        h.shape[1],
        rms,
        ny,
        ng,
        nw,
        nb,
        nsh,
        nsc,
    )
    return (
        dx.view(h.shape),
        _grad_or_empty(dy if ny else None, y, h),
        _grad_or_empty(dgate if ng else None, gate, h),
        _grad_or_empty(dweight if nw else None, weight, h),
        _grad_or_empty(dbias if nb else None, bias, h),
        _grad_or_empty(dshift if nsh else None, shift, h),
        _grad_or_empty(dscale if nsc else None, scale, h),
    )


@_fused_backward_op.register_fake
def _(dh, dout, h, y, gate, weight, bias, shift, scale, mean, rstd, rms, ny, ng, nw, nb, nsh, nsc, backend):
    return (
        torch.empty_like(h, memory_format=torch.contiguous_format),
        _empty_like_or_none(y, h, ny),
        _empty_like_or_none(gate, h, ng),
        _empty_like_or_none(weight, h, nw),
        _empty_like_or_none(bias, h, nb),
        _empty_like_or_none(shift, h, nsh and not _token_shift(shift, h)),
        _empty_like_or_none(scale, h, nsc),
    )


def _fused_setup(ctx, inputs, output):
    x, y, gate, weight, bias, shift, scale, eps, rms, backend = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h, None if gate is None else y, gate, weight, bias, shift, scale, mean, rstd)
    ctx.args = (rms, backend, y.dtype)


def _fused_op_backward(ctx, dh, dout, _dmean, _drstd):
    h, y, gate, weight, bias, shift, scale, mean, rstd = ctx.saved_tensors
    rms, backend, y_dtype = ctx.args
    n = ctx.needs_input_grad
    gated = gate is not None
    needs = (
        n[1] and gated,
        n[2] and gated,
        n[3] and weight is not None,
        n[4] and bias is not None,
        n[5] and shift is not None,
        n[6] and scale is not None,
    )
    if dout is None:
        dout = torch.zeros_like(h)
    dx, *rest = _fused_backward_op(dh, dout, h, y, gate, weight, bias, shift, scale, mean, rstd, rms, *needs, backend)
    if needs[4] and _token_shift(shift, h):
        rest[4] = dout.reshape(shift.shape).to(shift.dtype)
    grads = [g if need else None for g, need in zip(rest, needs)]
    if not gated and n[1]:  # x + y: y's gradient is x's (in y's dtype)
        grads[0] = dx.to(y_dtype)
    return (dx if n[0] else None, *grads, None, None, None)


_fused_op.register_autograd(_fused_op_backward, setup_context=_fused_setup)


# --------------------------------------------------------------------------- public ops


def layer_norm_modulate(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    eps: float = 1e-6,
    rms: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """LayerNorm (or RMSNorm) over the last dim, then adaLN modulation, in one pass:

        xhat = (x - mean) * rsqrt(var + eps)         (LayerNorm, biased variance over D)
        xhat = x * rsqrt(mean(x^2) + eps)            (RMSNorm, rms=True)
        y = (xhat * weight + bias) * (1 + scale) + shift

    Args:
        x: (B, L, D) float32, float16 or bfloat16 (float64: reference only). Rows must be evenly spaced
            with the last dim contiguous to run without a copy; anything else is copied once.
        weight, bias: None or (D,) (the norm's affine), any float dtype (used in float32). bias must be
            None with rms=True.
        shift, scale: None, (B, D) or (B, 1, D) (per sample) or (B, L, D) (per token), any float dtype; 1 in
            place of B: the same for every sample. Taken as views (no copy; a (1, L, D) one is copied once by
            the fast backends); their gradients have their shapes.
        eps: finite float > 0 added to the variance (to the mean square with rms=True).
        rms: RMSNorm instead of LayerNorm.
        backend: "auto" / None, "reference", "triton" or "cuda".

    Returns y, (B, L, D) in x's dtype, contiguous. Statistics in float32. Differentiable in x, weight,
    bias, shift and scale: the fast backends' backward is one fused pass (dx per row; dweight, dbias and
    per-sample dshift / dscale from deterministic per-block partials), first order only. Under
    torch.compile the call goes through ``genkernels::layer_norm_modulate`` (and its _backward op).
    """
    eps = _check_norm(x, weight, bias, shift, scale, eps, rms)
    shift, scale = _as_modulation(shift, x), _as_modulation(scale, x)
    if torch.compiler.is_compiling():
        return _norm_op(x, weight, bias, shift, scale, eps, rms, backend or "")[0]
    if x.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(NORM_OP, x, weight, bias, shift, scale, eps=eps, rms=rms, backend=backend)
        return layer_norm_modulate_reference(x, weight, bias, shift, scale, eps=eps, rms=rms)
    chosen = _registry.select(NORM_OP, x, weight, bias, shift, scale, eps=eps, rms=rms, backend=backend)
    if chosen.name == "reference":
        return layer_norm_modulate_reference(x, weight, bias, shift, scale, eps=eps, rms=rms)
    return _autograd.apply(_NormFunction, x, weight, bias, shift, scale, eps, rms, chosen.impl)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """The gated residual of adaLN-Zero blocks, out = x + gate * y, in one pass.

    Args:
        x: (B, L, D) the residual stream, float32, float16 or bfloat16 (float64: reference only).
        y: (B, L, D) the branch output, any of x's dtypes (an autocast branch's bfloat16 with a float32 x: the
            kernels read it in its own dtype, or the cuda backend converts it to the output's once).
        gate: (B, D) or (B, 1, D) (per sample) or (B, L, D) (per token), any float dtype, 1 in place of B: the
            same for every sample; None: out = x + y.
        backend: "auto" / None, "reference", "triton" or "cuda".

    Returns out, (B, L, D) in torch.promote_types(x.dtype, y.dtype) (x's where y has it; the gate's dtype does
    not widen it), contiguous (arithmetic in float32; a narrower x is widened to the output's dtype first, exactly).
    Differentiable in x, y and gate, each gradient in its input's dtype and shape (dx = dout, dy = dout * gate,
    dgate = dout * y summed over L for a per-sample gate; fused, first order on the fast backends; without a
    gate dx = dy = dout, no launch).
    """
    _check_gate(x, y, gate)
    gate = _as_modulation(gate, x)
    if y.dtype != x.dtype:  # x in the output's dtype: exact
        x = x.to(_gate_dtype(x, y))
    if torch.compiler.is_compiling():
        return _gate_op(x, y, gate, backend or "")
    if x.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(GATE_OP, x, y, gate, backend=backend)
        return gated_residual_reference(x, y, gate)
    chosen = _registry.select(GATE_OP, x, y, gate, backend=backend)
    if chosen.name == "reference":
        return gated_residual_reference(x, y, gate)
    return _autograd.apply(_GateFunction, x, y, gate, chosen.impl)


def gated_residual_layer_norm_modulate(
    x: Tensor,
    y: Tensor,
    gate: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    eps: float = 1e-6,
    rms: bool = False,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The residual add of one DiT sub-block and the next sub-block's modulated norm, in one pass:

        h = x + gate * y                                    (rounded to x's dtype; x + y without a gate)
        out = layer_norm_modulate(h, weight, bias, shift, scale, eps=eps, rms=rms)

    Without a gate it is a pre-norm transformer's residual add and the next norm (for example RMSNorm with a
    weight: ``gated_residual_layer_norm_modulate(h, attn_out, None, norm_weight, rms=True)``).

    Args:
        x, y, gate: as :func:`gated_residual` (gate None: h = x + y). y may have another dtype than x (a
            float32 y with a bfloat16 x: the cuda backend declines it, the others read it as it is).
        weight, bias, shift, scale, eps, rms: as :func:`layer_norm_modulate` (shapes against x's).
        backend: "auto" / None, "reference", "triton" or "cuda".

    Returns (h, out), each (B, L, D) in x's dtype whatever y's (the residual stream keeps its dtype),
    contiguous: h is the new residual stream, out the next branch's input. x and y are read once, h and out
    written once. Differentiable in every tensor argument (one fused backward pass on the fast backends, first
    order only).
    """
    _check_gate(x, y, gate)
    eps = _check_norm(x, weight, bias, shift, scale, eps, rms)
    gate, shift, scale = (_as_modulation(t, x) for t in (gate, shift, scale))
    if torch.compiler.is_compiling():
        h, out, _, _ = _fused_op(x, y, gate, weight, bias, shift, scale, eps, rms, backend or "")
        return h, out
    if x.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(FUSED_OP, x, y, gate, weight, bias, shift, scale, eps=eps, rms=rms, backend=backend)
        return gated_residual_layer_norm_modulate_reference(x, y, gate, weight, bias, shift, scale, eps=eps, rms=rms)
    chosen = _registry.select(FUSED_OP, x, y, gate, weight, bias, shift, scale, eps=eps, rms=rms, backend=backend)
    if chosen.name == "reference":
        return gated_residual_layer_norm_modulate_reference(x, y, gate, weight, bias, shift, scale, eps=eps, rms=rms)
    return _autograd.apply(_FusedFunction, x, y, gate, weight, bias, shift, scale, eps, rms, chosen.impl)


__all__ = [
    "gated_residual",
    "gated_residual_layer_norm_modulate",
    "gated_residual_layer_norm_modulate_reference",
    "gated_residual_reference",
    "layer_norm_modulate",
    "layer_norm_modulate_reference",
]


def _check_fused(x, y, gate, weight, bias, shift, scale, eps, rms) -> None:
    """gated_residual_layer_norm_modulate's argument checks, in the order it runs them."""
    _check_gate(x, y, gate)
    _check_norm(x, weight, bias, shift, scale, eps, rms)


_registry.register_check(NORM_OP, layer_norm_modulate, _check_norm)
_registry.register_check(GATE_OP, gated_residual, _check_gate)
_registry.register_check(FUSED_OP, gated_residual_layer_norm_modulate, _check_fused)
