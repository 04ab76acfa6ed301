"""CUDA launchers for the normalizing-flow steps (csrc/coupling.cu): a thin wrapper over ``genkernels._C``.

Implements the backend interface of :mod:`genkernels.ops.coupling` (see its module docstring for the
formulas): the affine coupling (forward, reverse and the forward direction's backward) and ActNorm
(forward, reverse, backward with its per-channel sums). The kernels take device addresses, the
(N, C, S) sizes of a dense tensor with a channels-last flag, a dtype code and a stream; this module
allocates the outputs and the scratch memory of the partial sums with torch and launches on torch's
current stream without synchronizing (CUDA-graph capturable).

Every big tensor is dense, contiguous or channels_last, all in x's layout (the op arranges that);
h has its own channel count. One dtype throughout: float32, float16 or bfloat16; math in float32.
The kernels move 16-byte vectors when a vector cannot straddle a channel run or the a/b channel
boundary and the tensors are 16-byte aligned, else single elements. Log-determinants and ActNorm's
per-channel sums come from fixed per-chunk float32 partials merged in a fixed order: the same bits
on every run and every GPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._layout import image_layout
from ._common import (
    address,
    device_guard,
    dtype_code,
    grid_unavailable,
    kernels_unavailable,
    require_extension,
    stream_handle,
)

_SYMBOLS = (
    "coupling_forward_workspace",
    "coupling_forward",
    "coupling_backward",
    "actnorm_forward",
    "actnorm_backward_workspace",
    "actnorm_backward",
)
# Must match CouplingScale in csrc/include/genkernels/coupling.cuh.
SCALE_CODES = {"exp": 0, "sigmoid": 1, "softclamp_tanh": 2, "softclamp_atan": 3, "additive": 4}


def _problem(x: Tensor, h_channels: int | None = None) -> tuple:
    """The (N, C, S, [Ch,] channels_last, dtype, device) arguments of ``_C`` for dense x."""
    lay = image_layout(x)
    sizes = (lay.n, lay.c, lay.s) if h_channels is None else (lay.n, lay.c, lay.s, h_channels)
    return (*sizes, lay.channels_last, dtype_code(x), x.device.index)


def coupling_not_supported(x: Tensor, h: Tensor, scale: str, reverse: bool) -> str | None:
    """Why the cuda backend cannot run this affine coupling (one line), or None when it can.

    The op has validated shapes, dtypes, devices and the scale mode, and copies x to a dense layout
    and h to x's before a kernel runs (so layouts are no reason here: ``genkernels.explain`` passes the
    raw arguments); what remains is the device, the extension and the grid size of csrc/coupling.cu.
    """
    reason = kernels_unavailable(x, "x", "coupling", _SYMBOLS)
    if reason is None and scale not in SCALE_CODES:
        reason = f"scale {scale!r}; supported: {', '.join(SCALE_CODES)}"
    if reason is None and x.shape[1] < 2:
        reason = f"x has {x.shape[1]} channels; the coupling needs at least 2"
    if reason is None:
        reason = grid_unavailable(x.shape[0], math.prod(x.shape[1:]))
    return reason


def coupling_forward(
    x: Tensor, h: Tensor, scale: str, clamp: float, reverse: bool, want_logdet: bool
) -> tuple[Tensor, Tensor | None]:
    """y = coupling(x, h) and, when want_logdet, logdet (N,) float32, in one pass over x and h.

    With Ca = C // 2, Cb = C - Ca, h_s = h[:, :Cb], t = h[:, Cb:] (additive: t = h) and log s of h_s by
    ``scale`` (exp, sigmoid, softclamp_tanh, softclamp_atan with ``clamp``, additive: 0), s = exp(log s):
    y_a = x_a, y_b = x_b * s + t, logdet[n] = sum over b-channels and positions of log s; reverse:
    y_b = (x_b - t) * exp(-log s), logdet = -sum log s. x: (N, C, *) dense (contiguous or
    channels_last), float32 / float16 / bfloat16; h: (N, 2 Cb, *) (additive (N, Cb, *)) in x's layout
    and dtype. y: a new tensor in x's dtype and layout. float32 math; logdet from fixed partials merged
    in a fixed order. No host synchronization.
    """
    ext = require_extension()
    y = torch.empty_like(x)
    n = x.shape[0]
    logdet = torch.empty(n, dtype=torch.float32, device=x.device) if want_logdet else None
    if x.numel() == 0:
        return y, None if logdet is None else logdet.zero_()
    code, clamp = SCALE_CODES[scale], float(clamp)
    problem = _problem(x, h.shape[1])
    with device_guard(x.device):
        nbytes = ext.coupling_forward_workspace(*problem, code, clamp) if want_logdet else 0
        scratch = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if nbytes else None
        ext.coupling_forward(
            x.data_ptr(),
            h.data_ptr(),
            y.data_ptr(),
            address(logdet),
            *problem,
            code,
            clamp,
            bool(reverse),
            address(scratch),
            nbytes,
            stream_handle(x.device),
        )
    return y, logdet


def coupling_backward(
    dy: Tensor | None,
    dlogdet: Tensor | None,
    x: Tensor,
    h: Tensor,
    scale: str,
    clamp: float,
    need_dx: bool,
    need_dh: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of :func:`coupling_forward` (forward direction), in one pass: (dx or None, dh or None).

    Per element, in float32, with g = d log s / d h_s: dx_a = dy_a, dx_b = dy_b * s, dt = dy_b,
    dh_s = (dy_b * x_b * s + dlogdet[n]) * g (additive: dh = dt). dy: None (zero) or x's shape, dtype
    and layout; dlogdet: None (zero) or float32 (N,). dx in x's dtype and layout, dh in h's; each
    allocated only when asked for. Reads dy, h_s and (for dh) x_b once. No host synchronization.
    """
    ext = require_extension()
    dx = torch.empty_like(x) if need_dx else None
    dh = torch.empty_like(h) if need_dh else None
    if x.numel() == 0 or (dx is None and dh is None):
        return dx, dh
    if dlogdet is not None:
        dlogdet = dlogdet.to(device=x.device, dtype=torch.float32).contiguous()
    with device_guard(x.device):
        ext.coupling_backward(
            address(dy),
            address(dlogdet),
            x.data_ptr(),
            h.data_ptr(),
            address(dx),
            address(dh),
            *_problem(x, h.shape[1]),
            SCALE_CODES[scale],
            float(clamp),
            stream_handle(x.device),
        )
    return dx, dh


def actnorm_not_supported(x: Tensor, log_scale: Tensor, bias: Tensor, reverse: bool) -> str | None:
    """Why the cuda backend cannot run this ActNorm (one line), or None when it can.

    The op has validated shapes, dtypes and devices, copies x to a dense layout (contiguous or
    channels_last) and makes log_scale and bias contiguous float32 before a kernel runs (so layouts
    are no reason here: ``genkernels.explain`` passes the raw arguments); what remains is the device,
    the extension and the grid size of csrc/coupling.cu.
    """
    reason = kernels_unavailable(x, "x", "coupling", _SYMBOLS)
    if reason is None:
        reason = grid_unavailable(x.shape[0], math.prod(x.shape[1:]))
    return reason


def _param(p: Tensor) -> Tensor:
    return p.to(dtype=torch.float32).contiguous()


def actnorm_forward(x: Tensor, log_scale: Tensor, bias: Tensor, reverse: bool) -> Tensor:
    """y = (x + bias[c]) * exp(log_scale[c]) (reverse: y = x * exp(-log_scale[c]) - bias[c]), one pass.

    x: (N, C, *) dense (contiguous or channels_last), float32 / float16 / bfloat16; log_scale, bias:
    float32 (C,). y: a new tensor in x's dtype and layout, computed in float32.
    """
    ext = require_extension()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    log_scale, bias = _param(log_scale), _param(bias)
    with device_guard(x.device):
        ext.actnorm_forward(
            x.data_ptr(),
            log_scale.data_ptr(),
            bias.data_ptr(),
            y.data_ptr(),
            *_problem(x),
            bool(reverse),
            stream_handle(x.device),
        )
    return y


def actnorm_backward(
    dy: Tensor, x: Tensor, log_scale: Tensor, bias: Tensor, need_dx: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx or None, sum_dy, sum_dy_xb) of ActNorm's forward direction, in one pass over dy and x.

    dx = dy * exp(log_scale[c]) (x's dtype and layout, when need_dx); sum_dy[c] = sum_{n,s} dy and
    sum_dy_xb[c] = sum_{n,s} dy * (x + bias[c]), float32 (C,), from fixed per-chunk partials merged in a
    fixed order (deterministic). dy: x's shape, dtype and layout; log_scale, bias: float32 (C,). The
    kernel adds dy * (x + bias) itself, in float32: sum dy x + bias sum dy would cancel where |bias| is large
    against x + bias (after ActNorm's data-dependent initialization on data far from zero). No host
    synchronization.
    """
    ext = require_extension()
    c = x.shape[1]
    dx = torch.empty_like(x) if need_dx else None
    sums = torch.empty((2, c), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        sums.zero_()
        return dx, sums[0], sums[1]
    log_scale, bias = _param(log_scale), _param(bias)
    problem = _problem(x)
    with device_guard(x.device):
        nbytes = ext.actnorm_backward_workspace(*problem)
        scratch = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if nbytes else None
        ext.actnorm_backward(
            dy.data_ptr(),
            x.data_ptr(),
            log_scale.data_ptr(),
            bias.data_ptr(),
            address(dx),
            sums.data_ptr(),
            *problem,
            address(scratch),
            nbytes,
            stream_handle(x.device),
        )
    return dx, sums[0], sums[1]
