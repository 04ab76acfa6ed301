"""CUDA launchers for StyleGAN2's modulated convolution (csrc/modconv.cu): a thin wrapper over ``genkernels._C``.

Implements the backend interface of :mod:`genkernels.ops.modconv` (see its module docstring for the
formulas): the demodulation coefficients (forward and backward) and the fused epilogue that follows the
convolution (forward and backward). All arithmetic is float32; every sum runs in a fixed order (per-warp
or per-block partials merged in index order, no atomics), so results are bitwise reproducible. Launches
on torch's current stream without synchronizing (CUDA-graph capturable): the noise strength is read by
the kernels from device memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._layout import contiguous_or_none
from ._common import (
    DTYPE_CODES,
    MAX_BLOCKS,
    device_guard,
    dtype_code,
    kernels_unavailable,
    require_extension,
    stream_handle,
)
from .bias_act import ACTS  # the activation codes of bias_act.cuh, which the epilogue kernels reuse

# Threads per block (kModconvThreads).
THREADS = 256

_DEMOD_SYMBOLS = ("modconv_demod_forward", "modconv_demod_backward")
_EPILOGUE_SYMBOLS = ("modconv_epilogue_forward", "modconv_epilogue_backward_workspace", "modconv_epilogue_backward")


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _same_device(name: str, t: Tensor | None, ref: Tensor) -> str | None:
    if t is not None and t.device != ref.device:
        return f"{name} is on {t.device}, the other inputs on {ref.device}"
    return None


def demod_not_supported(weight: Tensor, styles: Tensor) -> str | None:
    """Why the cuda backend cannot compute these demodulation coefficients (one line), or None when it can.

    weight: (O, I, kh, kw) or (O, I); styles: (N, I). The op has checked ranks, shapes and devices;
    what remains is the device, the extension, the weight dtype and the grid sizes."""
    reason = kernels_unavailable(weight, "weight", "modconv", _DEMOD_SYMBOLS)
    if reason is not None:
        return reason
    reason = _same_device("styles", styles, weight)
    if reason is not None:
        return reason
    if weight.dtype not in DTYPE_CODES:
        return f"weight dtype {weight.dtype} has no cuda kernel; supported: float32, float16, bfloat16"
    o, i = weight.shape[0], weight.shape[1]
    n = styles.shape[0]
    if -(-o * i // THREADS) > MAX_BLOCKS or -(-n * i // THREADS) > MAX_BLOCKS:
        return f"weight {tuple(weight.shape)} and styles {tuple(styles.shape)} need more than 2^31 - 1 blocks"
    return None


def demod_forward(weight3: Tensor, styles: Tensor, eps: float) -> Tensor:
    """dcoef[n, o] = 1 / sqrt(sum_i styles[n, i]^2 sum_k weight3[o, i, k]^2 + eps), in float32.

    weight3: contiguous (O, I, K), float32, float16 or bfloat16; styles: contiguous float32 (N, I) on the
    same device; eps: > 0. Returns a new contiguous float32 (N, O) tensor (empty sizes: no launch). One
    kernel: one warp per output channel o computes W2[o, :] once into registers and reuses it for every n."""
    o, i, k = weight3.shape
    n = styles.shape[0]
    dcoef = torch.empty((n, o), dtype=torch.float32, device=weight3.device)
    if dcoef.numel() == 0:
        return dcoef
    if i * k == 0:
        return dcoef.fill_(float(eps) ** -0.5)
    ext = require_extension()
    device = weight3.device
    with device_guard(device):
        ext.modconv_demod_forward(
            weight3.data_ptr(),
            styles.data_ptr(),
            dcoef.data_ptr(),
            o=o,
            i=i,
            k=k,
            n=n,
            dtype=dtype_code(weight3),
            eps=float(eps),
            device=device.index,
            stream=stream_handle(device),
        )
    return dcoef


def demod_backward(grad: Tensor, dcoef: Tensor, weight3: Tensor, styles: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`demod_forward`, with G = grad * dcoef^3 (N, O).

    grad, dcoef: contiguous float32 (N, O); weight3 and styles as in :func:`demod_forward`. Returns
    (d_weight3, d_styles): float32 (O, I, K) = -weight3 * sum_n G[n, o] styles[n, i]^2 and float32
    (N, I) = -styles * sum_o G[n, o] W2[o, i], both deterministic (sums in a fixed order)."""
    o, i, k = weight3.shape
    n = styles.shape[0]
    device = weight3.device
    d_weight = torch.empty((o, i, k), dtype=torch.float32, device=device)
    d_styles = torch.empty((n, i), dtype=torch.float32, device=device)
    if o * i * k == 0 or n == 0:
        d_weight.zero_()
        d_styles.zero_()
        return d_weight, d_styles
    ext = require_extension()
    w2 = torch.empty((o, i), dtype=torch.float32, device=device)
    with device_guard(device):
        ext.modconv_demod_backward(
            grad.data_ptr(),
            dcoef.data_ptr(),
            weight3.data_ptr(),
            styles.data_ptr(),
            d_weight.data_ptr(),
            d_styles.data_ptr(),
            w2.data_ptr(),
            o=o,
            i=i,
            k=k,
            n=n,
            dtype=dtype_code(weight3),
            device=device.index,
            stream=stream_handle(device),
        )
    return d_weight, d_styles


def epilogue_not_supported(
    y: Tensor, dcoef: Tensor | None, noise: Tensor | None, bias: Tensor | None, act: str
) -> str | None:
    """Why the cuda backend cannot run this modconv_epilogue call (one line), or None when it can.

    y: (N, C, H, W); dcoef: None or (N, C); noise: None or (N or 1, 1, H, W); bias: None or (C,). The
    op has checked shapes and layouts; what remains is the device, the extension, the dtypes, the
    activation, a noise tensor that requires grad (its gradient is the reference's job) and the grid."""
    reason = kernels_unavailable(y, "y", "modconv", _EPILOGUE_SYMBOLS)
    if reason is not None:
        return reason
    for name, t in (("dcoef", dcoef), ("noise", noise), ("bias", bias)):
        reason = _same_device(name, t, y)
        if reason is not None:
            return reason
    if y.dtype not in DTYPE_CODES:
        return f"y dtype {y.dtype} has no cuda kernel; supported: float32, float16, bfloat16"
    if act not in ACTS:
        return f"act {act!r} has no cuda kernel; supported: {', '.join(ACTS)}"
    if noise is not None and noise.requires_grad:
        return "noise requires grad: the cuda backend has no noise gradient (the reference has)"
    if -(-y.numel() // THREADS) > MAX_BLOCKS:
        return f"{y.numel()} elements: more than 2^31 - 1 blocks of {THREADS}"
    return None


def _dense_float32(**tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The side inputs as the kernels index them, dense (a strided view, as the traced op passes a float32 dcoef or
    bias, is copied once); ValueError for one that is not float32 (the kernels read raw float32)."""
    for name, t in tensors.items():
        if t is not None and t.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 tensor, got {t.dtype}")
    return tuple(contiguous_or_none(t) for t in tensors.values())


def _layout(y: Tensor) -> tuple[bool, torch.memory_format]:
    """(channels_last, memory format) of a dense y; a tensor that is both (C == 1 or H * W == 1) is
    taken as contiguous, the same memory order."""
    if y.is_contiguous():
        return False, torch.contiguous_format
    if y.is_contiguous(memory_format=torch.channels_last):
        return True, torch.channels_last
    raise ValueError(f"y must be contiguous or channels_last, got strides {y.stride()} for shape {tuple(y.shape)}")


def _problem(y: Tensor, noise: Tensor | None, act: str, alpha: float, gain: float, clamp: float | None) -> dict:
    n, c, h, w = y.shape
    channels_last, _ = _layout(y)
    return {
        "n": n,
        "c": c,
        "s": h * w,
        "channels_last": channels_last,
        "dtype": dtype_code(y),
        "device": y.device.index,
        "noise_dtype": dtype_code(noise),
        "noise_batch": 1 if noise is None else noise.shape[0],
        "act": ACTS[act],
        "alpha": float(alpha),
        "gain": float(gain),
        "has_clamp": clamp is not None,
        "clamp": float(clamp) if clamp is not None else 0.0,
    }


def _noise(noise: Tensor | None) -> Tensor | None:
    """noise as the kernels read it: contiguous, float32 / float16 / bfloat16 (other float dtypes as float32)."""
    if noise is None:
        return None
    if noise.dtype not in DTYPE_CODES:
        noise = noise.float()
    return noise.contiguous()


def epilogue_forward(
    y: Tensor,
    dcoef32: Tensor | None,
    noise: Tensor | None,
    strength32: Tensor | None,
    bias32: Tensor | None,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
) -> Tensor:
    """out = clamp(act(y * dcoef[n, c] + noise[n or 0, 0, h, w] * strength + bias[c]) * gain), one pass.

    y: dense (contiguous or channels_last) (N, C, H, W), float32 / float16 / bfloat16, numel > 0.
    dcoef32: None or float32 (N, C); noise: None or (Nn, 1, H, W), Nn in {1, N}, float32 / float16 /
    bfloat16 (others are converted to float32); strength32: None (strength 1) or a float32 (1,) device tensor
    read in the kernel; bias32: None or float32 (C,); side inputs with other strides are copied once to
    contiguous. act: a key of ACTS; alpha, gain: floats; clamp: None or > 0. Returns out with y's shape,
    strides and dtype. Reads y once and writes out once; never synchronizes with the host."""
    ext = require_extension()
    dcoef32, strength32, bias32 = _dense_float32(dcoef32=dcoef32, strength32=strength32, bias32=bias32)
    out = torch.empty_like(y)
    noise = _noise(noise)
    device = y.device
    with device_guard(device):
        ext.modconv_epilogue_forward(
            y.data_ptr(),
            _address(dcoef32),
            _address(noise),
            _address(strength32),
            _address(bias32),
            out.data_ptr(),
            stream=stream_handle(device),
            **_problem(y, noise, act, alpha, gain, clamp),
        )
    return out


def epilogue_backward(
    dout: Tensor,
    y: Tensor,
    dcoef32: Tensor | None,
    noise: Tensor | None,
    strength32: Tensor | None,
    bias32: Tensor | None,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
    need_dcoef: bool,
    need_bias: bool,
    need_strength: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`epilogue_forward` in one fused pass over dout and y.

    With g = dout * gain * act'(z) * m (z the pre-activation, m the clamp's pass mask): dy = g * dcoef
    in y's dtype and strides (always); ddcoef32 (N, C) = sum_{h,w} g * y, dbias32 (C,) = sum_{n,h,w} g
    and dstrength32 (1,) = sum g * noise, each float32 and only when its need_* flag is set (else None;
    dstrength is 0 without noise). dout: y's shape and dtype (other strides are copied to y's once); the
    other arguments as in :func:`epilogue_forward`. The sums come from per-warp / per-block float32
    partials merged in a fixed order (deterministic, no atomics); never synchronizes."""
    ext = require_extension()
    dcoef32, strength32, bias32 = _dense_float32(dcoef32=dcoef32, strength32=strength32, bias32=bias32)
    _, memory_format = _layout(y)
    if not dout.is_contiguous(memory_format=memory_format):
        dout = dout.contiguous(memory_format=memory_format)
    noise = _noise(noise)
    n, c = y.shape[0], y.shape[1]
    device = y.device
    dy = torch.empty_like(y)
    ddcoef = torch.empty((n, c), dtype=torch.float32, device=device) if need_dcoef else None
    dbias = torch.empty((c,), dtype=torch.float32, device=device) if need_bias else None
    dstrength = torch.empty((1,), dtype=torch.float32, device=device) if need_strength else None
    problem = _problem(y, noise, act, alpha, gain, clamp)
    with device_guard(device):
        workspace_bytes = 0
        workspace = None
        if need_dcoef or need_bias or need_strength:
            workspace_bytes = ext.modconv_epilogue_backward_workspace(
                dout.data_ptr(),
                y.data_ptr(),
                dy.data_ptr(),
                **problem,
            )
            workspace = torch.empty(workspace_bytes // 4, dtype=torch.float32, device=device)
        ext.modconv_epilogue_backward(
            dout.data_ptr(),
            y.data_ptr(),
            _address(dcoef32),
            _address(noise),
            _address(strength32),
            _address(bias32),
            dy.data_ptr(),
            _address(ddcoef),
            _address(dbias),
            _address(dstrength),
            workspace=_address(workspace),
            workspace_bytes=workspace_bytes,
            stream=stream_handle(device),
            **problem,
        )
    return dy, ddcoef, dbias, dstrength
