"""The modulated-convolution ops of StyleGAN2 in Triton (see genkernels.ops.modconv for the formulas
and the backend interface): the demodulation coefficients and the fused epilogue, forward and backward.

Demodulation. W2[o, i] = sum_k w[o, i, k]^2 is never stored: each program squares its (BLOCK_O, BLOCK_I)
weight tiles as it goes. The forward runs programs over (n-block, o-block) and loops over I:
acc[n, o] += (s^2)[n, i-block] . W2[o, i-block]^T with tl.dot in IEEE float32 (no TF32), then
dcoef = 1 / sqrt_rn(acc + eps). The backward has two kernels of the same shape: d styles over
(n-block, i-block), looping over O (-s * G . W2), and d weight over (o-block, i-block), looping over N
(-w * G^T . s^2), with G = grad * dcoef^3 formed as its tiles load. Memory traffic: the weight is read
once per n-block (forward, d weight: once; d styles: once per n-block), styles / grad / dcoef are small.

Epilogue. y is dense, and out / dout / dy share its strides, so each is a matrix of R rows of L
contiguous elements: contiguous NCHW has rows (n, c) of L = H*W positions, so that dcoef[n, c] is the
row's own element of the flat (N*C,) dcoef and the bias is bias[row % C]; channels_last has rows (n, p)
of L = C channels, dcoef is gathered at n*C + c and the bias at c. Noise is (Nn, 1, H, W), Nn in {1, N}:
its element of position p of sample n sits at n*H*W + p (or p). A program handles a (BLOCK_R, BLOCK_L)
tile (BLOCK_L a power of two up to 2048 along the contiguous axis, so 16-byte vectors when L is a
multiple of 8), with arithmetic in float32. Offsets are 32-bit unless numel > 2^31 - 2^16 (INDEX_64).

Forward: one pass, y read once and out written once (dcoef, bias, noise gathered from cache).

Backward: one pass, dout and y read once, dy written once, g = dout * gain * act'(z) * m (bias_act's
gradient map, in torch's order at non-finite values). The
reductions are deterministic per-program float32 partials, summed afterwards by torch in a fixed order:
in NCHW a row is one (n, c), so each program writes its rows' sums of g * y (ddcoef) and g (dbias) into
a (column blocks, R) array; in channels_last a program walks a chunk of positions of one sample (rows
of that sample only) accumulating per-channel sums, written into an (N * chunks, C) array. d strength
(sum g * noise) is one partial per program. No atomics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genkernels._layout import is_channels_last
from genkernels.triton._common import cdiv, next_power_of_2, on_device, sm_count, tl, triton, triton_unavailable

# The ACT constexpr of each activation (genkernels.triton.bias_act's codes, whose _act / _grad_map run here).
ACTS = {"linear": 0, "relu": 1, "lrelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5, "gelu": 6}
# Elements of an epilogue tile, forward and backward (the backward holds more live values).
FORWARD_TILE = 2048
BACKWARD_TILE = 1024
# Demodulation tiles (tl.dot needs 16 or more along each dim).
DEMOD_BLOCK = 32
# Grid limits: axis 0 of 2^31 - 1 programs, axis 1 of 65,535.
MAX_PROGRAMS = 2**31 - 1
MAX_PROGRAMS_1 = 65535
INT32_LIMIT = 2**31 - 2**16


def demod_not_supported(weight: Tensor, styles: Tensor) -> str | None:
    """Why the triton backend cannot run demodulation_coefficients on these inputs, or None when it can.

    The op has checked shapes, dtypes and devices; what remains is the device and 32-bit weight offsets."""
    reason = triton_unavailable(weight, "weight")
    if reason is not None:
        return reason
    if weight.numel() >= INT32_LIMIT or styles.numel() >= INT32_LIMIT:
        return f"weight of {weight.numel()} or styles of {styles.numel()} elements: 32-bit offsets only"
    return None


def epilogue_not_supported(
    y: Tensor, dcoef: Tensor | None, noise: Tensor | None, bias: Tensor | None, act: str
) -> str | None:
    """Why the triton backend cannot run modconv_epilogue on these inputs, or None when it can.

    The op has checked shapes, dtypes, layouts and devices (and refused a noise that needs its gradient);
    what remains is the device, the activation and the grid."""
    reason = triton_unavailable(y, "y")
    if reason is not None:
        return reason
    if act not in ACTS:
        return f"act {act!r} has no triton kernel; supported: {', '.join(ACTS)}"
    rows, length = _rows(y)
    if cdiv(length, FORWARD_TILE) > MAX_PROGRAMS_1:
        return f"rows of {length} elements: more than {MAX_PROGRAMS_1} blocks of {FORWARD_TILE}"
    if rows > MAX_PROGRAMS:
        return f"{rows} rows: more than {MAX_PROGRAMS} programs"
    return None


# --------------------------------------------------------------------------- demodulation


def _demod_blocks(n: int) -> int:
    """BLOCK_N: the batch in one block where it fits (N <= 32 in StyleGAN2 training), 16 at least for tl.dot."""
    return min(max(next_power_of_2(n), 16), DEMOD_BLOCK)


def _demod_warps(block_n: int) -> int:
    """8 warps for 32-sample blocks: the IEEE float32 dots of 32 x 32 tiles spill with 4."""
    return 8 if block_n >= 32 else 4


def demod_forward(weight3: Tensor, styles: Tensor, eps: float) -> Tensor:
    """dcoef[n, o] = rsqrt(sum_i styles[n, i]^2 W2[o, i] + eps), W2 = sum_k weight3^2, in float32.

    weight3: contiguous (O, I, K), float32 / float16 / bfloat16; styles: contiguous float32 (N, I).
    Returns a new float32 (N, O). Never synchronizes with the host."""
    o, i, k = weight3.shape
    n = styles.shape[0]
    dcoef = torch.empty((n, o), dtype=torch.float32, device=weight3.device)
    block_n = _demod_blocks(n)
    grid = (cdiv(n, block_n), cdiv(o, DEMOD_BLOCK))
    with on_device(weight3):
        _demod_forward_kernel[grid](
            weight3, styles, dcoef, n, o, i, k, float(eps),
            BLOCK_N=block_n, BLOCK_O=DEMOD_BLOCK, BLOCK_I=DEMOD_BLOCK, num_warps=_demod_warps(block_n),
        )  # fmt: skip
    return dcoef


def demod_backward(grad: Tensor, dcoef: Tensor, weight3: Tensor, styles: Tensor) -> tuple[Tensor, Tensor]:
    """(d weight3, d styles) of dcoef, with G = grad * dcoef^3:
    d styles = -styles * (G @ W2), d weight3[o, i, k] = -weight3[o, i, k] * (G^T @ styles^2)[o, i].

    grad, dcoef: contiguous float32 (N, O); weight3, styles as in :func:`demod_forward`. Returns float32
    (O, I, K) and (N, I). Never synchronizes with the host."""
    o, i, k = weight3.shape
    n = styles.shape[0]
    d_weight3 = torch.empty((o, i, k), dtype=torch.float32, device=weight3.device)
    d_styles = torch.empty((n, i), dtype=torch.float32, device=weight3.device)
    block_n = _demod_blocks(n)
    b = DEMOD_BLOCK
    with on_device(weight3):
        _demod_styles_grad_kernel[(cdiv(n, block_n), cdiv(i, b))](
            grad,
            dcoef,
            weight3,
            styles,
            d_styles,
            n,
            o,
            i,
            k,
            BLOCK_N=block_n,
            BLOCK_O=b,
            BLOCK_I=b,
            num_warps=_demod_warps(block_n),
        )
        _demod_weight_grad_kernel[(cdiv(o, b), cdiv(i, b))](
            grad,
            dcoef,
            weight3,
            styles,
            d_weight3,
            n,
            o,
            i,
            k,
            BLOCK_N=block_n,
            BLOCK_O=b,
            BLOCK_I=b,
            num_warps=_demod_warps(block_n),
        )
    return d_weight3, d_styles


# --------------------------------------------------------------------------- epilogue


def _rows(y: Tensor) -> tuple[int, int]:
    """(R, L): y as R rows of L contiguous elements (module docstring)."""
    n, c, h, w = y.shape
    if is_channels_last(y):
        return n * h * w, c
    return n * c, h * w


def _tile(rows: int, length: int, elements: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_L) of about ``elements``: the whole row where it fits, then several rows."""
    block_l = min(next_power_of_2(length), elements)
    return min(max(elements // block_l, 1), next_power_of_2(rows)), block_l


def _common_args(y, dcoef32, noise, strength32, bias32, act, alpha, gain, clamp) -> dict:
    n, c, h, w = y.shape
    return {
        "C": c,
        "HW": h * w,
        "alpha": float(alpha),
        "gain": float(gain),
        "clamp": float(clamp) if clamp is not None else 0.0,
        "ACT": ACTS[act],
        "CHANNELS_LAST": is_channels_last(y),
        "HAS_DCOEF": dcoef32 is not None,
        "HAS_NOISE": noise is not None,
        "NOISE_PER_SAMPLE": noise is not None and noise.shape[0] == n and n > 1,
        "HAS_STRENGTH": strength32 is not None,
        "HAS_BIAS": bias32 is not None,
        "HAS_CLAMP": clamp is not None,
        "INDEX_64": y.numel() > INT32_LIMIT,
    }


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
    """out = clamp(act(y * dcoef + noise * strength + bias) * gain) in one pass over memory order.

    y: dense (contiguous or channels_last) (N, C, H, W), float32 / float16 / bfloat16, numel > 0.
    dcoef32: None or contiguous float32 (N, C); noise: None or contiguous (Nn, 1, H, W), Nn in {1, N};
    strength32: None (1) or a float32 (1,) tensor (read in the kernel); bias32: None or float32 (C,);
    act: a key of ACTS; clamp: None or > 0. Returns out with y's shape, strides and dtype. Reads y once,
    writes out once; never synchronizes with the host."""
    out = torch.empty_like(y)
    rows, length = _rows(y)
    block_r, block_l = _tile(rows, length, FORWARD_TILE)
    grid = (cdiv(rows, block_r), cdiv(length, block_l))
    args = _common_args(y, dcoef32, noise, strength32, bias32, act, alpha, gain, clamp)
    with on_device(y):
        _epilogue_forward_kernel[grid](
            y, dcoef32 if dcoef32 is not None else y, noise if noise is not None else y,
            strength32 if strength32 is not None else y, bias32 if bias32 is not None else y, out,
            rows, length, **args, BLOCK_R=block_r, BLOCK_L=block_l, num_warps=min(8, max(1, block_r * block_l // 256)),
        )  # fmt: skip
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
    """(dy, ddcoef32, dbias32, dstrength32) in one pass over dout and y: g = dout * gain * act'(z) * m,
    dy = g * dcoef, ddcoef = sum_hw g * y, dbias = sum_nhw g, dstrength = sum g * noise.

    dout: y's shape, dtype and strides; the other arguments as in :func:`epilogue_forward`. dy comes back
    in y's dtype and strides; the others float32 ((N, C), (C,), (1,)) or None when not needed (or their
    input is None), reduced from per-program partials in a fixed order (deterministic). Reads dout and y
    once, writes dy once; never synchronizes with the host."""
    n, c, h, w = y.shape
    dy = torch.empty_like(y)
    rows, length = _rows(y)
    block_r, block_l = _tile(rows, length, BACKWARD_TILE)
    channels_last = is_channels_last(y)
    col_blocks = cdiv(length, block_l)
    if channels_last:
        # Each program walks `chunk` positions of one sample; enough programs to fill the device twice.
        per_sample = max(1, cdiv(2 * sm_count(y.device), n * col_blocks))
        chunk = max(block_r, cdiv(cdiv(h * w, per_sample), block_r) * block_r)
        segment, programs_per_segment = h * w, cdiv(h * w, chunk)
        row_programs = n * programs_per_segment
        partial_shape = (row_programs, length)  # per (program, channel)
    else:
        chunk = block_r
        segment, programs_per_segment = rows, cdiv(rows, block_r)
        row_programs = programs_per_segment
        partial_shape = (col_blocks, rows)  # per (column block, row)
    need_dcoef = need_dcoef and dcoef32 is not None
    need_bias = need_bias and bias32 is not None
    need_strength = need_strength and noise is not None
    f32 = {"dtype": torch.float32, "device": y.device}
    part_d = torch.empty(partial_shape, **f32) if need_dcoef else None
    part_b = torch.empty(partial_shape, **f32) if need_bias else None
    part_s = torch.empty((row_programs, col_blocks), **f32) if need_strength else None
    args = _common_args(y, dcoef32, noise, strength32, bias32, act, alpha, gain, clamp)
    with on_device(y):
        _epilogue_backward_kernel[(row_programs, col_blocks)](
            dout, y, dcoef32 if dcoef32 is not None else y, noise if noise is not None else y,
            strength32 if strength32 is not None else y, bias32 if bias32 is not None else y, dy,
            part_d if part_d is not None else dy, part_b if part_b is not None else dy,
            part_s if part_s is not None else dy,
            rows, length, segment, chunk, programs_per_segment, **args,
            NEED_DCOEF=need_dcoef, NEED_BIAS=need_bias, NEED_STRENGTH=need_strength,
            BLOCK_R=block_r, BLOCK_L=block_l, num_warps=min(8, max(1, block_r * block_l // 256)),
        )  # fmt: skip
    ddcoef = dbias = dstrength = None
    if channels_last:
        if need_dcoef:
            ddcoef = part_d.view(n, programs_per_segment, c).sum(1)
        if need_bias:
            dbias = part_b.sum(0)
    else:
        if need_dcoef:
            ddcoef = part_d.sum(0).view(n, c)
        if need_bias:
            dbias = part_b.sum(0).view(n, c).sum(0)
    if need_strength:
        dstrength = part_s.sum().reshape(1)
    return dy, ddcoef, dbias, dstrength


if triton is not None:
    from genkernels.triton.bias_act import _act, _grad_map

    # ----------------------------------------------------------------------- demodulation kernels

    @triton.jit
    def _w2_tile(w_ptr, offs_o, offs_i, CO, CI, K, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
        """W2[o, i] = sum_k w[o, i, k]^2 of an (o, i) tile, float32 (0 outside the weight)."""
        mask = (offs_o[:, None] < CO) & (offs_i[None, :] < CI)
        base = offs_o[:, None] * (CI * K) + offs_i[None, :] * K
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for k in range(K):
            w = tl.load(w_ptr + base + k, mask=mask, other=0.0).to(tl.float32)
            acc += w * w
        return acc

    @triton.jit
    def _g_tile(grad_ptr, dcoef_ptr, offs_n, offs_o, N, CO):
        """G = grad * dcoef^3 of an (n, o) tile (0 outside)."""
        mask = (offs_n[:, None] < N) & (offs_o[None, :] < CO)
        idx = offs_n[:, None] * CO + offs_o[None, :]
        g = tl.load(grad_ptr + idx, mask=mask, other=0.0)
        d = tl.load(dcoef_ptr + idx, mask=mask, other=0.0)
        return g * d * d * d

    @triton.jit
    def _s_tile(s_ptr, offs_n, offs_i, N, CI):
        """styles of an (n, i) tile (0 outside)."""
        mask = (offs_n[:, None] < N) & (offs_i[None, :] < CI)
        return tl.load(s_ptr + offs_n[:, None] * CI + offs_i[None, :], mask=mask, other=0.0)

    @triton.jit
    def _demod_forward_kernel(
        w_ptr, s_ptr, out_ptr, N, CO, CI, K, eps,
        BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        """dcoef of an (n-block, o-block); grid (ceil(N / BLOCK_N), ceil(CO / BLOCK_O)).

        Memory traffic: the weight's o-block read once, the styles' n-block once per o-block, dcoef written once."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
        for i0 in range(0, CI, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            s = _s_tile(s_ptr, offs_n, offs_i, N, CI)
            w2 = _w2_tile(w_ptr, offs_o, offs_i, CO, CI, K, BLOCK_O, BLOCK_I)
            acc += tl.dot(s * s, tl.trans(w2), input_precision="ieee")
        dcoef = 1.0 / tl.sqrt_rn(acc + eps)
        mask = (offs_n[:, None] < N) & (offs_o[None, :] < CO)
        tl.store(out_ptr + offs_n[:, None] * CO + offs_o[None, :], dcoef, mask=mask)

    @triton.jit
    def _demod_styles_grad_kernel(
        grad_ptr, dcoef_ptr, w_ptr, s_ptr, ds_ptr, N, CO, CI, K,
        BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        """d styles = -s * (G @ W2) of an (n-block, i-block), looping over the CO outputs;
        grid (ceil(N / BLOCK_N), ceil(CI / BLOCK_I)).

        Memory traffic: the weight's i-block read once, grad and dcoef's n-block once per i-block."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
        for o0 in range(0, CO, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            g = _g_tile(grad_ptr, dcoef_ptr, offs_n, offs_o, N, CO)
            w2 = _w2_tile(w_ptr, offs_o, offs_i, CO, CI, K, BLOCK_O, BLOCK_I)
            acc += tl.dot(g, w2, input_precision="ieee")
        s = _s_tile(s_ptr, offs_n, offs_i, N, CI)
        mask = (offs_n[:, None] < N) & (offs_i[None, :] < CI)
        tl.store(ds_ptr + offs_n[:, None] * CI + offs_i[None, :], -s * acc, mask=mask)

    @triton.jit
    def _demod_weight_grad_kernel(
        grad_ptr, dcoef_ptr, w_ptr, s_ptr, dw_ptr, N, CO, CI, K,
        BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        """d weight[o, i, k] = -w[o, i, k] * (G^T @ s^2)[o, i] of an (o-block, i-block), looping over N;
        grid (ceil(CO / BLOCK_O), ceil(CI / BLOCK_I)).

        Memory traffic: the weight tile read once, d weight written once, grad / dcoef / styles small."""
        offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            g = _g_tile(grad_ptr, dcoef_ptr, offs_n, offs_o, N, CO)
            s = _s_tile(s_ptr, offs_n, offs_i, N, CI)
            acc += tl.dot(tl.trans(g), s * s, input_precision="ieee")
        mask = (offs_o[:, None] < CO) & (offs_i[None, :] < CI)
        base = offs_o[:, None] * (CI * K) + offs_i[None, :] * K
        for k in range(K):
            w = tl.load(w_ptr + base + k, mask=mask, other=0.0).to(tl.float32)
            tl.store(dw_ptr + base + k, -w * acc, mask=mask)

    # ----------------------------------------------------------------------- epilogue kernels

    @triton.jit
    def _epilogue_tile(
        y_ptr, d_ptr, nz_ptr, st_ptr, b_ptr, rows, cols, row_mask, col_mask, L, C, HW,
        CHANNELS_LAST: tl.constexpr, HAS_DCOEF: tl.constexpr, HAS_NOISE: tl.constexpr,
        NOISE_PER_SAMPLE: tl.constexpr, HAS_STRENGTH: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        """(offsets, mask, y, dcoef, noise, z) of a (rows, cols) tile, in float32 (dcoef and noise broadcast
        to the tile's shape only where they vary along it)."""
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * L + cols[None, :]
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = y
        d = 1.0
        if HAS_DCOEF:
            if CHANNELS_LAST:  # rows (n, p), columns c
                d = tl.load(d_ptr + (rows // HW)[:, None] * C + cols[None, :], mask=mask, other=0.0)
            else:  # rows (n, c): the row's own dcoef
                d = tl.load(d_ptr + rows, mask=row_mask, other=0.0)[:, None]
            z = z * d
        nz = 0.0
        if HAS_NOISE:
            if CHANNELS_LAST:
                p = rows if NOISE_PER_SAMPLE else rows % HW
                nz = tl.load(nz_ptr + p, mask=row_mask, other=0.0).to(tl.float32)[:, None]
            else:
                if NOISE_PER_SAMPLE:
                    p = (rows // C)[:, None] * HW + cols[None, :]
                else:
                    p = cols[None, :] + rows[:, None] * 0
                nz = tl.load(nz_ptr + p, mask=mask, other=0.0).to(tl.float32)
            if HAS_STRENGTH:
                z = z + nz * tl.load(st_ptr)
            else:
                z = z + nz
        if HAS_BIAS:
            if CHANNELS_LAST:
                z = z + tl.load(b_ptr + cols, mask=col_mask, other=0.0)[None, :]
            else:
                z = z + tl.load(b_ptr + rows % C, mask=row_mask, other=0.0)[:, None]
        return offs, mask, y, d, nz, z

    @triton.jit
    def _epilogue_forward_kernel(
        y_ptr, d_ptr, nz_ptr, st_ptr, b_ptr, out_ptr, R, L, C, HW, alpha, gain, clamp,
        ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_DCOEF: tl.constexpr, HAS_NOISE: tl.constexpr,
        NOISE_PER_SAMPLE: tl.constexpr, HAS_STRENGTH: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_CLAMP: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """out of a (BLOCK_R, BLOCK_L) tile of the R x L matrix; grid (ceil(R / BLOCK_R), ceil(L / BLOCK_L)).

        Memory traffic: y read once, out written once; dcoef, noise and bias gathered from cache."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        if INDEX_64:
            rows = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        offs, mask, y, d, nz, z = _epilogue_tile(
            y_ptr, d_ptr, nz_ptr, st_ptr, b_ptr, rows, cols, rows < R, cols < L, L, C, HW,
            CHANNELS_LAST, HAS_DCOEF, HAS_NOISE, NOISE_PER_SAMPLE, HAS_STRENGTH, HAS_BIAS,
        )  # fmt: skip
        out = _act(z, alpha, ACT) * gain
        if HAS_CLAMP:
            # Comparisons rather than min / max, so that NaN passes as in torch.clamp.
            out = tl.where(out < -clamp, -clamp, tl.where(out > clamp, clamp, out))
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _epilogue_backward_kernel(
        dout_ptr, y_ptr, d_ptr, nz_ptr, st_ptr, b_ptr, dy_ptr, pd_ptr, pb_ptr, ps_ptr,
        R, L, segment, chunk, programs_per_segment, C, HW, alpha, gain, clamp,
        ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_DCOEF: tl.constexpr, HAS_NOISE: tl.constexpr,
        NOISE_PER_SAMPLE: tl.constexpr, HAS_STRENGTH: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_CLAMP: tl.constexpr, INDEX_64: tl.constexpr, NEED_DCOEF: tl.constexpr, NEED_BIAS: tl.constexpr,
        NEED_STRENGTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """dy of rows [start, end) x a column block, and this program's partial sums; grid
        (segments * programs_per_segment, ceil(L / BLOCK_L)). A segment is a run of `segment` rows (a
        sample's positions in channels_last, all rows in NCHW) cut into chunks of `chunk` rows, one a program.

        Memory traffic: dout and y read once, dy written once; partials: one float32 per (program, row) in
        NCHW, per (program, channel) in channels_last, one per program for the strength."""
        pid = tl.program_id(0)
        pid_l = tl.program_id(1)
        seg = pid // programs_per_segment
        if INDEX_64:
            seg = seg.to(tl.int64)
        seg_start = seg * segment
        start = seg_start + (pid % programs_per_segment) * chunk
        end = tl.minimum(start + chunk, seg_start + segment)
        cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        col_mask = cols < L
        # Elementwise accumulators, reduced once at the end (channels_last sums and the strength's).
        acc_d = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
        acc_s = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_mask = rows < end
            offs, mask, y, d, nz, z = _epilogue_tile(
                y_ptr, d_ptr, nz_ptr, st_ptr, b_ptr, rows, cols, row_mask, col_mask, L, C, HW,
                CHANNELS_LAST, HAS_DCOEF, HAS_NOISE, NOISE_PER_SAMPLE, HAS_STRENGTH, HAS_BIAS,
            )  # fmt: skip
            dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(mask, _grad_map(dout, z, alpha, gain, clamp, ACT, HAS_CLAMP), 0.0)
            tl.store(dy_ptr + offs, (g * d).to(dy_ptr.dtype.element_ty), mask=mask)
            if CHANNELS_LAST:  # per-channel sums, accumulated over the chunk
                if NEED_DCOEF:
                    acc_d += g * y
                if NEED_BIAS:
                    acc_b += g
            else:  # each row is one (n, c): its sums go out directly (one row block per program)
                if NEED_DCOEF:
                    tl.store(pd_ptr + pid_l * R + rows, tl.sum(g * y, axis=1), mask=row_mask)
                if NEED_BIAS:
                    tl.store(pb_ptr + pid_l * R + rows, tl.sum(g, axis=1), mask=row_mask)
            if NEED_STRENGTH:
                acc_s += g * nz
        if CHANNELS_LAST:
            if NEED_DCOEF:
                tl.store(pd_ptr + pid * L + cols, tl.sum(acc_d, axis=0), mask=col_mask)
            if NEED_BIAS:
                tl.store(pb_ptr + pid * L + cols, tl.sum(acc_b, axis=0), mask=col_mask)
        if NEED_STRENGTH:
            tl.store(ps_ptr + pid * tl.num_programs(1) + pid_l, tl.sum(tl.sum(acc_s, axis=1), axis=0))
