"""Fused bias + activation (StyleGAN's bias_act; see genkernels.ops.bias_act for the formula and the
interface) in Triton: the forward and the fused gradient map.

x is dense: contiguous or channels_last / channels_last_3d, and y, dy and dz share its strides, so every
tensor is walked as one flat run of numel elements in memory order. One program handles BLOCK = 2,048
consecutive elements (grid (ceil(numel / BLOCK),); smaller tensors get one program of next_pow2(numel);
tuning BLOCK and the warp count per size with triton.autotune measured no gain on an H100),
so that loads and stores of 16-byte vectors (eight bf16 / fp16 or four fp32 elements per thread access)
cover contiguous memory, with no division for the data. The bias of flat element e is
bias[(e // stride_c) % C] with stride_c = x.stride(dim) (:func:`channel_stride`: the product of the later
sizes for a size-1 dim, whose stride torch leaves free), which holds in both dense layouts (channels_last
has stride(1) == 1, a stride triton specializes, so the division folds away); the bias, a (C,) tensor in
float32, float16 or bfloat16 (read in its own dtype: no cast kernel before the launch), is a gather that
stays in L1 / L2.
When stride_c is a multiple of BLOCK (contiguous NCHW from 64 x 64 up: every program's BLOCK
elements lie in one channel), the channel is one scalar per program and the bias one scalar load
(the constexpr UNIFORM_C) instead of an index and a gather per element. Offsets are 32-bit unless
numel > 2^31 - BLOCK (the constexpr INDEX_64: then 64-bit, so that the masked tail of the last program
cannot wrap).

The activation is a constexpr (ACT: one specialization each), the bias and the clamp are constexpr
flags; alpha (lrelu's slope), gain and clamp are float32 arguments. Arithmetic is float32, and accurate
to a few float32 ulp where torch's formulas are: exp through an exact range reduction (tl.exp on NVIDIA
is ex2.approx of a rounded product, off by up to |x| ulp), tanh from exp(-2|z|) (a Cephes polynomial for
|z| < 0.625, where 1 - exp(-2|z|) would cancel), sigmoid from exp(-|z|) (no overflow), erf from
tl.math.erf (libdevice erff on NVIDIA). Every formula stays finite for large |z| (1e4 and beyond): the
exponentials only ever see non-positive arguments, and underflow to 0 below -87.

Forward, per element: z = x + b, y = act(z) * gain, then y = min(max(y, -clamp), clamp) (NaN passes,
as in torch.clamp). Memory traffic: x read once, y written once, bias gathered (C elements, cached).

Gradient map, per element: dz = dy * gain * act'(z) * m, m = (-clamp <= act(z) * gain <= clamp) when
clamped (torch.clamp's gradient: passed at the bounds, zero outside and for NaN), else 1, in torch's
autograd order: g = m ? dy * gain : 0, then dz = g * act'(z), for relu a select (z <= 0 ? 0 : g, as
threshold_backward: a NaN z passes g, and a NaN dy gives 0 where z <= 0), so a NaN act'(z) keeps dz NaN
where the clamp stops the gradient, as torch's does. act' is torch's autograd's: lrelu (z > 0 ? 1 : alpha),
tanh 1 - tanh^2 = 4t / (1 + t)^2 with
t = exp(-2|z|), sigmoid s (1 - s), silu s (1 + z (1 - s)), gelu Phi(z) + z phi(z), with s and 1 - s
each computed without cancellation. Memory traffic: dy and x read once, dz written once.

Gradient map with the bias gradient (``grad_bias``): the same dz, plus dbias = dz summed over every dim
but ``dim``, in the same pass. Memory order is viewed as a matrix of R = numel / (C * inner) rows and
Q = C * inner columns (inner = stride_c: every dense layout is (outer, C, inner) in memory). A
program reduces a tile of ROW_ITERS * RB rows by BQ columns in float32, from the unrounded dz: when BQ
divides inner (contiguous NCHW and its like: a tile lies in one channel, whose bias is one scalar
load), to one partial per tile; else to one partial per column (channels_last: inner = 1). A program
takes several row tiles (up to TILE_ROW_ITERS with partials per tile, MAX_ROW_ITERS per column), so
that its block-wide sum is amortized (at the benchmark's shape, NCHW: 4 tiles of 2,048), and loads up
to LOAD_TILES of them at once: a thread issues the loads of all of them before its first store. A
store may alias a later load for all the compiler knows, so tiles loaded one at a time would leave
one vector of x and one of dy a thread in flight, too few to keep HBM busy at the occupancy these
registers allow. A second small
kernel sums the partials of each channel in a fixed order (deterministic, no atomics) and writes dbias
in the bias's dtype. Memory traffic: dy and x read once, dz written once (not at all when only dbias
is wanted), plus the partials (at most about 1/16 of dz in float32).

Instruction budget (why the channel is a scalar where it can be): at the H100's 3.0 TB/s, a bf16
backward moves 6 bytes an element (dy, x read, dz written), 0.5 T elements/s, against the 132 SMs'
issue rate of 4 warp instructions a cycle (about 30 T thread instructions/s at 1.755 GHz): about 59
instructions an element before the issue rate, not memory, bounds the kernel. An index divided and a
bias gathered per element, with 2-D masks, came to 452 SASS instructions per thread of 8 bf16 elements
on sm_90 (57 an element: issue-bound); the scalar channel takes it to 212 (27), four row tiles a
program to 518 per 32 elements (16), and four row tiles in one load to 460 (14.4; 9 global loads ahead
of the first store instead of 3). `python -m tests.triton._compile_kernels --arch 90 --label anchor
--sass` prints these counts (triton 3.6, sm_90).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from genkernels.triton._common import cdiv, next_power_of_2, on_device, tl, triton, triton_unavailable

# Elements per program (smaller tensors get one program of next_pow2(numel)).
MAX_BLOCK = 2048
# The ACT constexpr of each activation.
ACTS = {"linear": 0, "relu": 1, "lrelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5, "gelu": 6}
# Programs of a 1-D grid.
MAX_PROGRAMS = 2**31 - 1
# The bias dtypes the kernels read as they are (genkernels.ops.bias_act casts any other to float32).
BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def channel_stride(x: Tensor, dim: int) -> int:
    """The elements between consecutive indices along ``dim`` in x's memory order: x.stride(dim), except for a
    size-1 dim, whose stride torch leaves free (a contiguous (4, 1, 3) tensor may have stride 7 there), where
    it is the product of the later sizes (a divisor of numel, as the kernels' (outer, C, inner) view needs)."""
    if x.shape[dim] != 1:
        return x.stride(dim)
    return math.prod(x.shape[dim + 1 :])


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
    stride_c = channel_stride(x, dim) if has_bias else 1
    args = {
        "N": n,
        "stride_c": stride_c,
        "C": x.shape[dim] if has_bias else 1,
        "alpha": float(alpha),
        "gain": float(gain),
        "clamp": float(clamp) if clamp is not None else 0.0,
        "ACT": ACTS[act],
        "HAS_BIAS": has_bias,
        # Every program's BLOCK elements in one channel: one scalar bias load a program.
        "UNIFORM_C": has_bias and stride_c % block == 0,
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
    contiguous (C,) tensor of a BIAS_DTYPES dtype, C = x.shape[dim], added along dim. act: a key of ACTS;
    alpha: lrelu's slope; gain: output scale; clamp: None or > 0. Returns y, a new tensor with x's shape, strides and
    dtype. Reads x once, writes y once; never synchronizes with the host."""
    y = torch.empty_like(x)
    grid, args = _launch_args(x, bias, act, alpha, gain, clamp, dim)
    with on_device(x):
        _bias_act_forward_kernel[grid](x, bias if bias is not None else x, y, **args)
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
        _bias_act_grad_kernel[grid](dy, x, bias if bias is not None else x, dz, **args)
    return dz


# Elements of one backward tile with the bias gradient (rows x BQ columns); the most row tiles a program
# takes with partials per column, and with partials per tile (4: 16 SASS instructions an element in bf16 and
# 44 registers on sm_90, against 27 and 31 for one tile and 15 and 44 for eight, each loaded alone); the
# fewest programs a per-tile launch keeps (8 per SM of an H100's 132: the last wave a small part of the
# launch); and the row tiles one load takes (RB = tile rows x LOAD_TILES; ROW_ITERS loads a program).
TILE = 2048
MAX_ROW_ITERS = 16
TILE_ROW_ITERS = 4
MIN_PROGRAMS = 1056
LOAD_TILES = 4


def _bias_grad_plan(x: Tensor, dim: int) -> dict:
    """Tile shape and partial layout of grad_bias's launch over the (R, Q) memory-order matrix."""
    c = x.shape[dim]
    inner = channel_stride(x, dim)
    q = c * inner
    r = x.numel() // q
    # The widest power of two (64 .. TILE) dividing inner: each tile then lies in one channel.
    bq = 0
    cand = TILE
    while cand >= 64:
        if inner % cand == 0:
            bq = cand
            break
        cand //= 2
    per_tile = bq > 0
    if not per_tile:
        bq = min(TILE, next_power_of_2(q))
    rb = max(1, min(TILE // bq, next_power_of_2(r)))
    col_progs = cdiv(q, bq)
    if per_tile:  # as many row tiles a program as keep MIN_PROGRAMS programs (a power of two, for the tail)
        row_iters = 1
        while row_iters < TILE_ROW_ITERS and col_progs * cdiv(r, rb * row_iters * 2) >= MIN_PROGRAMS:
            row_iters *= 2
    else:
        row_iters = min(MAX_ROW_ITERS, next_power_of_2(cdiv(r, rb * 64)))
    row_progs = cdiv(r, rb * row_iters)
    # Up to LOAD_TILES row tiles in one load: a thread issues all their loads before it stores anything (a
    # store may alias a later load for all the compiler knows, so tiles loaded one at a time would leave
    # one vector a thread in flight).
    per_load = min(row_iters, LOAD_TILES)
    return {
        "R": r,
        "Q": q,
        "C": c,
        "inner": inner,
        "BQ": bq,
        "RB": rb * per_load,
        "ROW_ITERS": row_iters // per_load,
        "PER_TILE": per_tile,
        "grid": (col_progs, row_progs),
    }


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
) -> tuple[Tensor | None, Tensor]:
    """(dz, dbias) in one pass: dz as :func:`grad` gives it (x's dtype; None when ``need_dz`` is False,
    then nothing is written) and dbias = dz summed over every dim but ``dim``, (C,) in bias's dtype,
    reduced in float32 from the unrounded dz, deterministic. bias: a contiguous (C,) tensor of a
    BIAS_DTYPES dtype (not None). Two launches: the fused pass, and the fixed-order sum of its partials."""
    plan = _bias_grad_plan(x, dim)
    n = x.numel()
    dz = torch.empty_like(x) if need_dz else None
    col_progs, row_progs = plan["grid"]
    width = col_progs if plan["PER_TILE"] else plan["Q"]
    partial = torch.empty((row_progs, width), device=x.device, dtype=torch.float32)
    with on_device(x):
        _bias_act_grad_bias_kernel[plan["grid"]](
            dy,
            x,
            bias,
            dz if dz is not None else x,
            partial,
            plan["R"],
            plan["Q"],
            plan["inner"],
            plan["C"],
            width,
            float(alpha),
            float(gain),
            float(clamp) if clamp is not None else 0.0,
            ACT=ACTS[act],
            HAS_CLAMP=clamp is not None,
            STORE_DZ=need_dz,
            PER_TILE=plan["PER_TILE"],
            INDEX_64=n > 2**31 - TILE,
            BQ=plan["BQ"],
            RB=plan["RB"],
            ROW_ITERS=plan["ROW_ITERS"],
            num_warps=8 if plan["BQ"] * plan["RB"] >= 2048 else 4,
        )
    c, inner = plan["C"], plan["inner"]
    per = inner // plan["BQ"] if plan["PER_TILE"] else inner  # partials of one channel in a row of them
    dbias = torch.empty((c,), device=x.device, dtype=bias.dtype)
    # Channels a program: about FINISH_PROGRAMS programs, each summing BLOCK_K terms of its channels at once.
    block_c = min(next_power_of_2(c), next_power_of_2(cdiv(c, FINISH_PROGRAMS)))
    block_k = max(1, min(FINISH_BLOCK // block_c, next_power_of_2(row_progs * per)))
    with on_device(x):
        _bias_grad_finish_kernel[(cdiv(c, block_c),)](
            partial, dbias, row_progs, c, per, BLOCK_K=block_k, BLOCK_C=block_c, num_warps=4
        )
    return dz, dbias


# The finishing kernel: partials summed a step per program, and the programs wanted (one per channel when
# C is smaller).
FINISH_BLOCK = 4096
FINISH_PROGRAMS = 64


if triton is not None:
    from genkernels.triton._math import _exp, _sigmoid_pair, _tanh

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
        """act'(z) in float32, as torch's autograd gives it (lrelu: alpha at 0 and at NaN), for every
        activation but relu (a select: :func:`_act_backward`)."""
        if ACT == 0:
            return tl.full(z.shape, 1.0, tl.float32)
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
    def _act_backward(g, z, alpha, ACT: tl.constexpr):
        """g * act'(z), as torch's autograd applies act' to an incoming gradient g: for relu a select (0 where
        z <= 0, else g, as threshold_backward: a NaN z passes g, a NaN or infinite g gives 0 where z <= 0)."""
        if ACT == 1:
            return tl.where(z <= 0.0, 0.0, g)
        else:
            return g * _act_grad(z, alpha, ACT)

    @triton.jit
    def _grad_map(dy, z, alpha, gain, clamp, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr):
        """dz = act_backward(m ? dy * gain : 0, z) in float32 (m: the clamp's pass mask), torch's order."""
        g = dy * gain
        if HAS_CLAMP:
            y = _act(z, alpha, ACT) * gain
            g = tl.where((y >= -clamp) & (y <= clamp), g, 0.0)
        return _act_backward(g, z, alpha, ACT)

    @triton.jit
    def _preact(
        x_ptr,
        b_ptr,
        N,
        stride_c,
        C,
        HAS_BIAS: tl.constexpr,
        UNIFORM_C: tl.constexpr,
        INDEX_64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """(offsets, mask, z = x + bias in float32) of this program's BLOCK flat elements; with UNIFORM_C
        (stride_c a multiple of BLOCK) the bias is one scalar load."""
        pid = tl.program_id(0)
        if INDEX_64:
            start = pid.to(tl.int64) * BLOCK
        else:
            start = pid * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            if UNIFORM_C:
                z += tl.load(b_ptr + (start // stride_c) % C).to(tl.float32)
            else:
                c = (offs // stride_c) % C
                z += tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        return offs, mask, z

    @triton.jit
    def _bias_act_forward_kernel(
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
        UNIFORM_C: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        INDEX_64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """y of BLOCK consecutive elements; grid (ceil(N / BLOCK),).

        Memory traffic: x read once, y written once, bias gathered from cache."""
        offs, mask, z = _preact(x_ptr, b_ptr, N, stride_c, C, HAS_BIAS, UNIFORM_C, INDEX_64, BLOCK)
        y = _act(z, alpha, ACT) * gain
        if HAS_CLAMP:
            # Comparisons rather than min / max, so that NaN passes as in torch.clamp.
            y = tl.where(y < -clamp, -clamp, tl.where(y > clamp, clamp, y))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_act_grad_kernel(
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
        UNIFORM_C: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        INDEX_64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """dz of BLOCK consecutive elements; grid (ceil(N / BLOCK),).

        Memory traffic: dy and x read once, dz written once, bias gathered from cache."""
        offs, mask, z = _preact(x_ptr, b_ptr, N, stride_c, C, HAS_BIAS, UNIFORM_C, INDEX_64, BLOCK)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = _grad_map(dy, z, alpha, gain, clamp, ACT, HAS_CLAMP)
        tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_act_grad_bias_kernel(
        dy_ptr,
        x_ptr,
        b_ptr,
        dz_ptr,
        part_ptr,
        R,
        Q,
        inner,
        C,
        part_width,
        alpha,
        gain,
        clamp,
        ACT: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        STORE_DZ: tl.constexpr,
        PER_TILE: tl.constexpr,
        INDEX_64: tl.constexpr,
        BQ: tl.constexpr,
        RB: tl.constexpr,
        ROW_ITERS: tl.constexpr,
    ):
        """dz of ROW_ITERS * RB rows by BQ columns of the (R, Q) memory-order matrix, and their float32
        sums: one partial per tile (PER_TILE) or per column; grid (ceil(Q / BQ), ceil(R / (RB ROW_ITERS))).
        With PER_TILE the tile lies in one channel: its bias is one scalar load, and a row of the tile is
        BQ consecutive elements."""
        pid_q = tl.program_id(0)
        pid_r = tl.program_id(1)
        cols = pid_q * BQ + tl.arange(0, BQ)
        col_ok = cols < Q
        if PER_TILE:
            b = tl.load(b_ptr + ((pid_q * BQ) // inner) % C).to(tl.float32)
        else:
            b = tl.load(b_ptr + (cols // inner) % C, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.zeros((BQ,), tl.float32)
        for it in tl.static_range(ROW_ITERS):
            rows = (pid_r * ROW_ITERS + it) * RB + tl.arange(0, RB)
            if INDEX_64:
                offs = rows.to(tl.int64)[:, None] * Q + cols[None, :]
            else:
                offs = rows[:, None] * Q + cols[None, :]
            if PER_TILE:  # BQ divides Q: every column of the tile is in range
                mask = (rows < R)[:, None]
            else:
                mask = (rows < R)[:, None] & col_ok[None, :]
            z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dz = _grad_map(dy, z, alpha, gain, clamp, ACT, HAS_CLAMP)
            if STORE_DZ:
                tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
            acc += tl.sum(tl.where(mask, dz, 0.0), axis=0)
        if PER_TILE:
            tl.store(part_ptr + pid_r * part_width + pid_q, tl.sum(acc, axis=0))
        else:
            tl.store(part_ptr + pid_r * part_width + cols, acc, mask=col_ok)

    @triton.jit
    def _bias_grad_finish_kernel(part_ptr, out_ptr, ROWS, C, PER, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[c] = the sum of partials[r, c * PER + j] over r < ROWS and j < PER, in float32 and a fixed
        order, stored in out's dtype; grid (ceil(C / BLOCK_C),). The K = ROWS * PER terms of a channel
        are walked BLOCK_K at a time (k = r * PER + j)."""
        chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        chan_ok = chans < C
        acc = tl.zeros((BLOCK_K, BLOCK_C), tl.float32)
        for k0 in range(0, ROWS * PER, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            r = k // PER
            offs = r[:, None] * (C * PER) + chans[None, :] * PER + (k - r * PER)[:, None]
            mask = (k < ROWS * PER)[:, None] & chan_ok[None, :]
            acc += tl.load(part_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + chans, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=chan_ok)
