"""CUDA launchers for the transformer MLP activations (csrc/gated_mlp.cu): a thin wrapper over ``genkernels._C``.

Implements the fused backend interface of :mod:`genkernels.ops.gated_mlp` (see its module docstring for the
formulas), with the semantics of :mod:`genkernels.triton.gated_mlp`:

gelu_tanh: x is dense (contiguous or channels_last) and y, dy and dx share its strides, so every tensor is
walked as one flat run of numel elements in memory order: one thread per 16-byte vector when every pointer is
16-byte aligned (a tail shorter than the width one element at a time), else one thread per element. It is
evaluated through s = sigmoid(2u) = 0.5 (1 + tanh u): y = x s, dx = dy s (1 + 2 x (1 - s) u'), which keeps
its relative accuracy where 1 + tanh u would cancel (x far below 0).

swiglu: x contiguous, viewed as (R, 2, M) with R the product of the dims before ``dim`` and M = (the size of
``dim`` / 2) * (the product of the dims after it): a = x[:, 0], b = x[:, 1], y (R, M). One thread per 16-byte
vector of y when M is a multiple of the width and the pointers are aligned, else one per element.

Arithmetic is float32 with accurate expf. Launches on torch's current stream without synchronizing
(CUDA-graph capturable).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import MAX_BLOCKS, device_guard, dtype_code, kernels_unavailable, require_extension, stream_handle

# Threads per block (kGatedMlpThreads); the scalar path has one element a thread.
THREADS = 256

_SYMBOLS = ("gelu_tanh_forward", "gelu_tanh_grad", "swiglu_forward", "swiglu_grad")
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _reason(x: Tensor, outputs: int) -> str | None:
    reason = kernels_unavailable(x, "x", "gated_mlp", _SYMBOLS)
    if reason is not None:
        return reason
    if x.dtype not in _FAST_DTYPES:
        return f"x has dtype {x.dtype}; supported: float32, float16, bfloat16"
    if -(-outputs // THREADS) > MAX_BLOCKS:
        return f"{outputs} elements: more than 2^31 - 1 blocks of {THREADS}"
    return None


def gelu_tanh_not_supported(x: Tensor) -> str | None:
    """Why the cuda backend cannot run gelu_tanh on x (one line), or None when it can: the device, the
    extension, x's dtype and the 1-D grid (one thread per element at worst)."""
    return _reason(x, x.numel())


def swiglu_not_supported(x: Tensor, dim: int) -> str | None:
    """Why the cuda backend cannot run swiglu on x along dim (one line), or None when it can: the device, the
    extension, x's dtype and the 1-D grid over y's elements (one thread per element at worst)."""
    return _reason(x, x.numel() // 2)


def _swiglu_view(x: Tensor, dim: int) -> tuple[int, int]:
    """(R, M): x contiguous is (R, 2, M) in memory, the halves of ``dim`` being its middle axis."""
    rows = 1
    for s in x.shape[:dim]:
        rows *= s
    return rows, x.numel() // (rows * 2)


def gelu_tanh_forward(x: Tensor) -> Tensor:
    """y = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) in one pass over memory order.

    x: dense (contiguous or channels_last), float32, float16 or bfloat16, numel > 0. Returns y, a new tensor
    with x's shape, strides and dtype. Reads x once, writes y once; never synchronizes with the host."""
    ext = require_extension()
    y = torch.empty_like(x)
    device = x.device
    with device_guard(device):
        ext.gelu_tanh_forward(
            x.numel(), dtype_code(x), device.index, x.data_ptr(), y.data_ptr(), stream=stream_handle(device)
        )
    return y


def gelu_tanh_grad(dy: Tensor, x: Tensor) -> Tensor:
    """dx = dy * gelu_tanh'(x) in one pass over memory order.

    dy: x's shape, strides and dtype; x as in :func:`gelu_tanh_forward`. Returns dx, a new tensor like x.
    Reads dy and x once, writes dx once; never synchronizes with the host."""
    ext = require_extension()
    dx = torch.empty_like(x)
    device = x.device
    with device_guard(device):
        ext.gelu_tanh_grad(
            x.numel(),
            dtype_code(x),
            device.index,
            dy.data_ptr(),
            x.data_ptr(),
            dx.data_ptr(),
            stream=stream_handle(device),
        )
    return dx


def swiglu_forward(x: Tensor, dim: int) -> Tensor:
    """y = silu(a) * b with (a, b) the halves of x along dim, in one pass.

    x: contiguous, float32, float16 or bfloat16, numel > 0, x.shape[dim] even; dim in [0, x.dim()). Returns
    y, contiguous, x's shape with dim halved, x's dtype. Reads x once, writes y once; never synchronizes."""
    ext = require_extension()
    shape = list(x.shape)
    shape[dim] //= 2
    y = torch.empty(shape, device=x.device, dtype=x.dtype)
    rows, cols = _swiglu_view(x, dim)
    device = x.device
    with device_guard(device):
        ext.swiglu_forward(
            rows, cols, dtype_code(x), device.index, x.data_ptr(), y.data_ptr(), stream=stream_handle(device)
        )
    return y


def swiglu_grad(dy: Tensor, x: Tensor, dim: int) -> Tensor:
    """dx = [dy * b * silu'(a); dy * silu(a)] in one pass, silu'(a) = s (1 + a (1 - s)), s = sigmoid(a).

    dy: contiguous with y's shape and x's dtype; x and dim as in :func:`swiglu_forward`. Returns dx,
    contiguous like x. Reads dy and x once, writes dx once; never synchronizes with the host."""
    ext = require_extension()
    dx = torch.empty_like(x)
    rows, cols = _swiglu_view(x, dim)
    device = x.device
    with device_guard(device):
        ext.swiglu_grad(
            rows,
            cols,
            dtype_code(x),
            device.index,
            dy.data_ptr(),
            x.data_ptr(),
            dx.data_ptr(),
            stream=stream_handle(device),
        )
    return dx
