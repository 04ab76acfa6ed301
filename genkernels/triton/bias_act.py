"""Fused bias + activation (StyleGAN's bias_act; see genkernels.ops.bias_act for the formula and the
interface) in Triton: the forward and the fused gradient map.

x is dense: contiguous or channels_last / channels_last_3d, and y, dy and dz share its strides, so every
tensor is walked as one flat run of numel elements in memory order. One program handles BLOCK = 2,048
consecutive elements (grid (ceil(numel / BLOCK),); smaller tensors get one program of next_pow2(numel)),
so that loads and stores of 16-byte vectors (eight bf16 / fp16 or four fp32 elements per thread access)
cover contiguous memory, with no division for the data. The bias of flat element e is
bias[(e // x.stride(dim)) % C], which holds in both dense layouts (channels_last has stride(1) == 1, a
stride triton specializes, so the division folds away); the bias is a float32 (C,) gather that stays in
L1 / L2. Offsets are 32-bit unless numel > 2^31 - BLOCK (the constexpr INDEX_64: then 64-bit, so that the
masked tail of the last program cannot wrap).

The activation is a constexpr (ACT: one specialization each), the bias and the clamp are constexpr
flags; alpha (lrelu's slope), gain and clamp are float32 arguments. Arithmetic is float32, and accurate
to a few float32 ulp where torch's formulas are: exp through an exact range reduction (tl.exp on NVIDIA
is ex2.approx of a rounded product, off by up to |x| ulp), tanh from exp(-2|z|) (a Cephes polynomial for
|z| < 0.625, where 1 - exp(-2|z|) would cancel), sigmoid from exp(-|z|) (no overflow), erf from
tl.math.erf (libdevice erff on NVIDIA). Every formula stays finite for large |z| (1e4 and beyond): the
exponentials only ever see non-positive arguments, and underflow to 0 below -87.

Forward, per element: z = x + b, y = act(z) * gain, then y = min(max(y, -clamp), clamp) (NaN passes,
as in torch.clamp). Memory traffic: x read once, y written once, bias gathered (C * 4 bytes, cached).

Gradient map, per element: dz = dy * gain * act'(z) * m, m = (-clamp <= act(z) * gain <= clamp) when
clamped (torch.clamp's gradient: passed at the bounds, zero outside and for NaN), else 1; act' is
torch's autograd's: relu (z > 0), lrelu (z > 0 ? 1 : alpha), tanh 1 - tanh^2 = 4t / (1 + t)^2 with
t = exp(-2|z|), sigmoid s (1 - s), silu s (1 + z (1 - s)), gelu Phi(z) + z phi(z), with s and 1 - s
each computed without cancellation. Memory traffic: dy and x read once, dz written once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genkernels.triton._common import cdiv, next_power_of_2, on_device, tl, triton, triton_unavailable

# Elements per program (smaller tensors get one program of next_pow2(numel)).
MAX_BLOCK = 2048
# The ACT constexpr of each activation.
ACTS = {"linear": 0, "relu": 1, "lrelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5, "gelu": 6}
# Programs of a 1-D grid.
MAX_PROGRAMS = 2**31 - 1


def not_supported(x: Tensor, bias: Tensor | None, act: str, dim: int) -> str | None:
    """Why the triton backend cannot run this bias_act call, or None when it can.

    The op module has already checked dtypes, shapes, layouts and devices; what remains is whether
    triton runs on x's device, the activation, and the 1-D grid of ceil(numel / 2048) programs."""
    reason = triton_unavailable(x)
    if reason is not None:
        return reason
    if act not in ACTS:
        return f"act {act!r} has no triton kernel; supported: {', '.join(ACTS)}"
    if cdiv(x.numel(), MAX_BLOCK) > MAX_PROGRAMS:
        return f"{x.numel()} elements: more than {MAX_PROGRAMS} programs of {MAX_BLOCK}"
    return None


def _launch_args(x: Tensor, bias: Tensor | None, act: str, alpha: float, gain: float, clamp, dim: int):
    """(grid, arguments after the pointers) of one flat launch over x."""
    n = x.numel()
    block = min(MAX_BLOCK, next_power_of_2(n))
    has_bias = bias is not None
    args = {
        "N": n,
        "stride_c": x.stride(dim) if has_bias else 1,
        "C": x.shape[dim] if has_bias else 1,
        "alpha": float(alpha),
        "gain": float(gain),
        "clamp": float(clamp) if clamp is not None else 0.0,
        "ACT": ACTS[act],
        "HAS_BIAS": has_bias,
        "HAS_CLAMP": clamp is not None,
        "INDEX_64": n > 2**31 - MAX_BLOCK,
        "BLOCK": block,
        "num_warps": min(8, max(1, block // 256)),
    }
    return (cdiv(n, block),), args


def forward(
    x: Tensor, bias: Tensor | None, act: str, alpha: float, gain: float, clamp: float | None, dim: int
) -> Tensor:
    """y = clamp(act(x + bias) * gain) in one pass over memory order.

    x: dense (contiguous or channels_last), float32, float16 or bfloat16, numel > 0. bias: None or a
    contiguous float32 (C,) tensor, C = x.shape[dim], added along dim. act: a key of ACTS; alpha: lrelu's
    slope; gain: output scale; clamp: None or > 0. Returns y, a new tensor with x's shape, strides and
    dtype. Reads x once, writes y once; never synchronizes with the host."""
    y = torch.empty_like(x)
    grid, args = _launch_args(x, bias, act, alpha, gain, clamp, dim)
    with on_device(x):
        _forward_kernel[grid](x, bias if bias is not None else x, y, **args)
    return y


def grad(
    dy: Tensor,
    x: Tensor,
    bias: Tensor | None,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
    dim: int,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """dz = dy * gain * act'(x + bias) * m (m: the clamp's pass mask) in one pass over memory order.

    dy: x's shape, dtype and strides; the other arguments as in :func:`forward`. Returns dz, a new
    tensor like x in ``out_dtype`` (default x's; float32 keeps the unrounded dz for the bias
    gradient's sum). Reads dy and x once, writes dz once; never synchronizes with the host."""
    dz = torch.empty_like(x, dtype=out_dtype or x.dtype)
    grid, args = _launch_args(x, bias, act, alpha, gain, clamp, dim)
    with on_device(x):
        _grad_kernel[grid](dy, x, bias if bias is not None else x, dz, **args)
    return dz


if triton is not None:
    from genkernels.triton._math import _exp

    @triton.jit
    def _sigmoid_pair(z):
        """(sigmoid(z), 1 - sigmoid(z)), each without cancellation or overflow: with e = exp(-|z|),
        1 / (1 + e) is the one on z's side and e / (1 + e) the other."""
        e = _exp(-tl.abs(z))
        p = 1.0 / (1.0 + e)
        q = e * p
        pos = z >= 0.0
        return tl.where(pos, p, q), tl.where(pos, q, p)

    @triton.jit
    def _tanh(z):
        """tanh(z): Cephes' tanhf polynomial for |z| < 0.625, else sign(z) (1 - t) / (1 + t), t = exp(-2|z|)."""
        a = tl.abs(z)
        t = _exp(-2.0 * a)
        big = (1.0 - t) / (1.0 + t)
        big = tl.where(z < 0.0, -big, big)
        zs = tl.where(a < 0.625, z, 0.0)  # the polynomial's branch only: no overflow elsewhere
        s = zs * zs
        p = -5.70498872745e-3 * s + 2.06390887954e-2
        p = p * s - 5.37397155531e-2
        p = p * s + 1.33314422036e-1
        p = p * s - 3.33332819422e-1
        small = p * s * zs + zs
        return tl.where(a < 0.625, small, big)

    @triton.jit
    def _gelu_cdf(z):
        """Phi(z) = 0.5 (1 + erf(z / sqrt 2)), torch's exact GELU formula."""
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))

    @triton.jit
    def _act(z, alpha, ACT: tl.constexpr):
        """act(z) in float32 (ACT: the index in ACTS)."""
        if ACT == 0:
            return z
        elif ACT == 1:
            return tl.where(z < 0.0, 0.0, z)  # NaN passes, as in F.relu
        elif ACT == 2:
            return tl.where(z > 0.0, z, z * alpha)
        elif ACT == 3:
            return _tanh(z)
        elif ACT == 4:
            s, _ = _sigmoid_pair(z)
            return s
        elif ACT == 5:
            s, _ = _sigmoid_pair(z)
            return z * s
        else:
            return z * _gelu_cdf(z)

    @triton.jit
    def _act_grad(z, alpha, ACT: tl.constexpr):
        """act'(z) in float32, as torch's autograd gives it (relu: 0 at 0; lrelu: alpha at 0)."""
        if ACT == 0:
            return tl.full(z.shape, 1.0, tl.float32)
        elif ACT == 1:
            return tl.where(z > 0.0, 1.0, 0.0)
        elif ACT == 2:
            return tl.where(z > 0.0, 1.0, alpha)
        elif ACT == 3:
            t = _exp(-2.0 * tl.abs(z))
            u = 1.0 + t
            return 4.0 * t / (u * u)
        elif ACT == 4:
            s, sc = _sigmoid_pair(z)
            return s * sc
        elif ACT == 5:
            s, sc = _sigmoid_pair(z)
            return s * (1.0 + z * sc)
        else:
            return _gelu_cdf(z) + z * (0.3989422804014327 * _exp(-0.5 * z * z))

    @triton.jit
    def _preact(x_ptr, b_ptr, N, stride_c, C, HAS_BIAS: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
        """(offsets, mask, z = x + bias in float32) of this program's BLOCK flat elements."""
        pid = tl.program_id(0)
        if INDEX_64:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            c = (offs // stride_c) % C
            z += tl.load(b_ptr + c, mask=mask, other=0.0)
        return offs, mask, z

    @triton.jit
    def _forward_kernel(
        x_ptr,
        b_ptr,
        y_ptr,
        N,
        stride_c,
        C,
        alpha,
        gain,
        clamp,
        ACT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        INDEX_64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """y of BLOCK consecutive elements; grid (ceil(N / BLOCK),).

        Memory traffic: x read once, y written once, bias gathered from cache."""
        offs, mask, z = _preact(x_ptr, b_ptr, N, stride_c, C, HAS_BIAS, INDEX_64, BLOCK)
        y = _act(z, alpha, ACT) * gain
        if HAS_CLAMP:
            # Comparisons rather than min / max, so that NaN passes as in torch.clamp.
            y = tl.where(y < -clamp, -clamp, tl.where(y > clamp, clamp, y))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_kernel(
        dy_ptr,
        x_ptr,
        b_ptr,
        dz_ptr,
        N,
        stride_c,
        C,
        alpha,
        gain,
        clamp,
        ACT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        INDEX_64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """dz of BLOCK consecutive elements; grid (ceil(N / BLOCK),).

        Memory traffic: dy and x read once, dz written once, bias gathered from cache."""
        offs, mask, z = _preact(x_ptr, b_ptr, N, stride_c, C, HAS_BIAS, INDEX_64, BLOCK)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = dy * gain * _act_grad(z, alpha, ACT)
        if HAS_CLAMP:
            y = _act(z, alpha, ACT) * gain
            dz = tl.where((y >= -clamp) & (y <= clamp), dz, 0.0)
        tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
