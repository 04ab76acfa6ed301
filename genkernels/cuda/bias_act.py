"""CUDA launcher for the fused bias + activation (csrc/bias_act.cu): a thin wrapper over ``genkernels._C``.

Implements the backend interface of :mod:`genkernels.ops.bias_act` (see its module docstring for the
formulas), with the semantics of :mod:`genkernels.triton.bias_act`: x is dense (contiguous or
channels_last), and y, dy and dz share its strides, so every tensor is walked as one flat run of
numel elements in memory order; the bias ((C,) in float32, float16 or bfloat16, read in its own
dtype, or None) of flat element e is
bias[(e // stride_c) % C], stride_c = x.stride(dim) (genkernels.triton.bias_act.channel_stride: the
product of the later sizes for a size-1 dim, whose stride torch leaves free). One thread per 16-byte
vector when every pointer is 16-byte aligned (the tail of a length that is not a multiple of the width
one element at a time), else one thread per element. Arithmetic is float32 with accurate expf / tanhf /
erff. Launches on torch's current stream without synchronizing (CUDA-graph capturable).

Gradient codes: for the piecewise-linear activations (CODE_ACTS) :func:`forward_codes` also writes 2 bits
an element (z > 0, and whether the clamp passes the gradient), and :func:`grad` and :func:`grad_bias` take
them in place of x: the backward then reads a quarter of a byte an element instead of x's 2 or 4, with the
same dz bit for bit, and autograd keeps the codes (1/8 of a bf16 x) instead of x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..triton.bias_act import channel_stride
from ._common import MAX_BLOCKS, device_guard, dtype_code, kernels_unavailable, require_extension, stream_handle

# The activation codes of csrc/include/genkernels/bias_act.cuh (BiasActKind).
ACTS = {"linear": 0, "relu": 1, "lrelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5, "gelu": 6}
# Threads per block (kBiasActThreads); the scalar path has one element a thread.
THREADS = 256
# The bias dtypes the kernels read as they are (genkernels.ops.bias_act casts any other to float32 first).
BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The activations whose gradient the codes carry (act' takes two values: linear, relu, lrelu).
CODE_ACTS = ("linear", "relu", "lrelu")
# Codes for tensors of at least this many elements: a smaller call is bound by its CPU time (the codes cost
# an allocation and some microseconds of it) and its x by little memory.
CODES_MIN_NUMEL = 1 << 16

_SYMBOLS = (
    "bias_act_forward",
    "bias_act_grad",
    "bias_act_grad_bias_plan",
    "bias_act_grad_bias",
    "bias_act_codes_bytes",
)


def not_supported(x: Tensor, bias: Tensor | None, act: str, dim: int) -> str | None:
    """Why the cuda backend cannot run this bias_act call (one line), or None when it can.

    The op has checked dtypes, shapes, layouts and devices; what remains is the device, the
    extension, the activation and the 1-D grid (one thread per element at worst)."""
    reason = kernels_unavailable(x, "x", "bias_act", _SYMBOLS)
    if reason is not None:
        return reason
    if act not in ACTS:
        return f"act {act!r} has no cuda kernel; supported: {', '.join(ACTS)}"
    if -(-x.numel() // THREADS) > MAX_BLOCKS:
        return f"{x.numel()} elements: more than 2^31 - 1 blocks of {THREADS}"
    return None


def _problem(x: Tensor, bias: Tensor | None, act: str, alpha: float, gain: float, clamp, dim: int) -> dict:
    has_bias = bias is not None
    return {
        "n": x.numel(),
        "stride_c": channel_stride(x, dim) if has_bias else 1,
        "channels": x.shape[dim] if has_bias else 1,
        "act": ACTS[act],
        "alpha": float(alpha),
        "gain": float(gain),
        "has_clamp": clamp is not None,
        "clamp": float(clamp) if clamp is not None else 0.0,
        "bias_dtype": dtype_code(bias),
    }


def forward(
    x: Tensor, bias: Tensor | None, act: str, alpha: float, gain: float, clamp: float | None, dim: int
) -> Tensor:
    """y = clamp(act(x + bias) * gain) in one pass over memory order.

    x: dense (contiguous or channels_last), float32, float16 or bfloat16, numel > 0. bias: None or a
    contiguous (C,) tensor of a BIAS_DTYPES dtype, C = x.shape[dim], added along dim. act: a key of
    ACTS; alpha: lrelu's slope; gain: output scale; clamp: None or > 0. Returns y, a new tensor with
    x's shape, strides and dtype. Reads x once, writes y once; never synchronizes with the host."""
    return _forward(x, bias, act, alpha, gain, clamp, dim, None)


def _forward(x: Tensor, bias: Tensor | None, act: str, alpha: float, gain: float, clamp, dim: int, codes) -> Tensor:
    """y, and the gradient codes into ``codes`` when it is a tensor (see :func:`forward_codes`)."""
    ext = require_extension()
    y = torch.empty_like(x)
    device = x.device
    with device_guard(device):
        ext.bias_act_forward(
            x.data_ptr(),
            0 if bias is None else bias.data_ptr(),
            y.data_ptr(),
            dtype=dtype_code(x),
            device=device.index,
            stream=stream_handle(device),
            codes=0 if codes is None else codes.data_ptr(),
            **_problem(x, bias, act, alpha, gain, clamp, dim),
        )
    return y


def forward_codes(
    x: Tensor, bias: Tensor | None, act: str, alpha: float, gain: float, clamp: float | None, dim: int
) -> tuple[Tensor, Tensor] | None:
    """(y, codes): :func:`forward`'s y and the gradient codes (uint8, 2 bits an element in memory order: element
    e's at bits 2 (e % 4) of byte e // 4; bit 0 z > 0, bit 1 the clamp passes), in the same pass. None when the
    codes do not apply: an activation outside CODE_ACTS, fewer than CODES_MIN_NUMEL elements, or x not
    16-byte aligned (the kernel writes codes on its vector path only). Never synchronizes."""
    if act not in CODE_ACTS or x.numel() < CODES_MIN_NUMEL or x.data_ptr() % 16 != 0:
        return None
    codes = torch.empty(require_extension().bias_act_codes_bytes(x.numel()), dtype=torch.uint8, device=x.device)
    return _forward(x, bias, act, alpha, gain, clamp, dim, codes), codes


def grad(
    dy: Tensor,
    x: Tensor | None,
    bias: Tensor | None,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
    dim: int,
    out_dtype: torch.dtype | None = None,
    codes: Tensor | None = None,
) -> Tensor:
    """dz = dy * gain * act'(x + bias) * m (m: the clamp's pass mask) in one pass over memory order.

    dy: x's shape, dtype and strides; the other arguments as in :func:`forward`. codes: the gradient codes of
    :func:`forward_codes` for this call, read in place of x and the bias' values (x may then be None). Returns
    dz, a new tensor like dy in ``out_dtype`` (x's dtype or float32, default x's; float32 keeps the unrounded
    dz for the bias gradient's sum). Reads dy and x (or the codes) once, writes dz once; never synchronizes."""
    ext = require_extension()
    out_dtype = out_dtype or dy.dtype
    if out_dtype not in (dy.dtype, torch.float32):
        raise ValueError(f"out_dtype must be x's dtype ({dy.dtype}) or torch.float32, got {out_dtype}")
    dz = torch.empty_like(dy, dtype=out_dtype)
    device = dy.device
    with device_guard(device):
        ext.bias_act_grad(
            dy.data_ptr(),
            0 if codes is not None else x.data_ptr(),
            0 if bias is None else bias.data_ptr(),
            dz.data_ptr(),
            dtype=dtype_code(dy),
            out_dtype=dtype_code(dz),
            device=device.index,
            stream=stream_handle(device),
            codes=0 if codes is None else codes.data_ptr(),
            **_problem(dy, bias, act, alpha, gain, clamp, dim),
        )
    return dz


def grad_bias(
    dy: Tensor,
    x: Tensor,
    bias: Tensor,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
    dim: int,
    need_dz: bool = True,
    codes: Tensor | None = None,
) -> tuple[Tensor | None, Tensor]:
    """(dz, dbias) in one pass: dz as :func:`grad` gives it (x's dtype; None when ``need_dz`` is False, and
    then nothing is written) and dbias = dz summed over every dim but ``dim``, (C,) in bias's dtype,
    reduced in float32 from the unrounded dz.

    Memory order is tiled as R rows by Q = C * stride_c columns (csrc bias_act.cuh,
    bias_act_grad_bias_kernel); each block leaves float32 partial sums, per tile when a tile lies in one
    channel, else per column, and a second kernel of the same extension call (bias_grad_finish_kernel) sums
    them per channel in a fixed order into dbias (deterministic, no atomics). bias: a contiguous (C,) tensor of
    a BIAS_DTYPES dtype (not None). codes: as in :func:`grad` (x may then be None). Never synchronizes with the
    host."""
    ext = require_extension()
    dz = torch.empty_like(dy) if need_dz else None
    problem = _problem(dy, bias, act, alpha, gain, clamp, dim)
    device = dy.device
    x_ptr = 0 if codes is not None else x.data_ptr()
    with device_guard(device):
        common = {"dtype": dtype_code(dy), "device": device.index, **problem}
        _vec, _tq, _per_tile, _rows, _grid_x, grid_y, width = ext.bias_act_grad_bias_plan(
            dy.data_ptr(), x_ptr, 0 if dz is None else dz.data_ptr(), **common
        )
        partials = torch.empty((grid_y, width), device=device, dtype=torch.float32)
        dbias = torch.empty((dy.shape[dim],), device=device, dtype=bias.dtype)
        ext.bias_act_grad_bias(
            dy.data_ptr(),
            x_ptr,
            bias.data_ptr(),
            0 if dz is None else dz.data_ptr(),
            partials.data_ptr(),
            partials.numel(),
            stream=stream_handle(device),
            codes=0 if codes is None else codes.data_ptr(),
            dbias=dbias.data_ptr(),
            **common,
        )
    return dz, dbias
