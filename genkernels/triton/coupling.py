"""Affine coupling and ActNorm (see genkernels.ops.coupling for the formulas and the interface) in Triton:
forward, reverse and fused backward.

Affine coupling. In both dense layouts (:mod:`genkernels._layout`) a sample of x is ``rows`` rows of
``a_len + b_len`` elements, each row an a-part followed by a b-part, and a sample of h is ``rows`` rows
of ``h_len`` elements (h_s, then t; additive: t alone):

- channels first, one row per sample: a_len = Ca * S, b_len = Cb * S, h_len = 2 * Cb * S (or Cb * S);
- channels last, one row per position: rows = S, a_len = Ca, b_len = Cb, h_len = 2 * Cb (or Cb).

Element k of a row's b-part pairs x_b (at a_len + k in x's row), h_s (at k in h's row) and t (at b_len
+ k; additive: k), and element k < a_len of the a-part is copied. So no kernel needs an element's
channel or position, only (sample, row, k), and there is no division per element: a tile is BLOCK_N
samples by BLOCK_J flattened (row, k) pairs, BLOCK_K (a power of two >= b_len, or a slice of a long
row) per row, r = j // BLOCK_K and k = j % BLOCK_K being shifts. A program handles one tile of the
b-parts and the a-part elements of the same rows, so x is read once, h once, y written once. Tiles
never straddle samples: the per-sample values (the logdet partial, dlogdet[n]) are one per sample of
the tile, and small samples are packed BLOCK_N to a program. The benchmark's (64, 32, 64, 64) makes
64 x 32 programs of 2,048 b-elements in either layout. Offsets of a sample's start are 64-bit; within a
sample they are 32-bit (checked in :func:`coupling_not_supported`).

log s per scale mode, in float32 (u = h_s; for every mode s = exp(log s) and g = d log s / d u):

- exp: log s = u, g = 1;
- sigmoid: v = u + 2, e = exp(-|v|), log s = -softplus(-v) = min(v, 0) - log1p(e), g = sigmoid(-v) =
  (v >= 0 ? e : 1) / (1 + e): nothing overflows or takes log(0) for any finite u;
- softclamp_tanh: z = u / clamp, tanh z from _math (a polynomial for |z| < 0.625, where (1 - e) / (1 + e)
  with e = exp(-2|z|) would cancel), g = 4e / (1 + e)^2;
- softclamp_atan: z = u / clamp, log s = 0.636 clamp atan(z) (atan below), g = 0.636 / (1 + z^2);
- additive: log s = 0, no h_s.

The logdet is the sum over T per-(sample, tile) float32 partials, taken by torch in a fixed order.

ActNorm. x is seen as (A, C, B) with strides (C * B, B, 1): (N, C, S) in channels first, (N * S, C, 1)
in channels last, so one address formula serves both (B == 1 is specialized: C is then the contiguous
axis). A tile is [BLOCK_C, BLOCK_A, BLOCK_B]: a channel's values in channels first are N runs of S, so
a tile is a few channels by up to MAX_BLOCK positions of one or more samples (the benchmark's: one
channel, 2,048 positions); in channels last it is the C consecutive channels of MAX_BLOCK / C pixels.
The forward is elementwise with exp(log_scale[c]) per tile channel. The backward writes dx and, per
program, the per-channel sums of dy and dy * (x + bias) over its chunk (up to _MAX_TILES_PER_CHUNK tiles
along A, one B tile), as float32 partials (2, chunks, C) that torch sums in a fixed order. dlog_scale is
exp(log_scale) times the second: formed as sum dy x + bias sum dy it would cancel where |bias| is large
against x + bias (ActNorm's initialization sets bias = -mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from genkernels._layout import image_layout
from genkernels.triton._common import cdiv, next_power_of_2, on_device, sm_count, tl, triton, triton_unavailable

# Elements (b-elements for the coupling) per program; tiles packing several small samples stop at half
# of it (their rows are short and unaligned: no vector access).
MAX_BLOCK = 2048
# ActNorm backward: programs to aim for per SM; a program loops over more rows beyond that, up to
# _MAX_TILES_PER_CHUNK tiles (each lane adds that many values in sequence: a short, accurate chain).
_PROGRAMS_PER_SM = 4
_MAX_TILES_PER_CHUNK = 8

# The kernels' SCALE constexpr.
SCALE_CODES = {"exp": 0, "sigmoid": 1, "softclamp_tanh": 2, "softclamp_atan": 3, "additive": 4}
_ADDITIVE = SCALE_CODES["additive"]
_HALF = (torch.float32, torch.float16, torch.bfloat16)


def _num_warps(block: int) -> int:
    """4 elements per thread up to 8 warps (8 in a tile of MAX_BLOCK): unaligned tiles address each
    element on its own (64-bit addresses), and 8 of those per thread spill in the sigmoid modes."""
    return min(8, max(1, block // 128))


def coupling_not_supported(x: Tensor, h: Tensor, scale: str, reverse: bool) -> str | None:
    """Why the triton backend cannot run this affine_coupling call, or None when it can.

    The op module validates shapes and dtypes and brings x to a dense layout and h to x's before a
    kernel runs (so layouts are no reason here: ``genkernels.explain`` passes the raw arguments); what
    remains is whether triton runs on x's device, the dtype (float32, float16, bfloat16: float64 is the
    reference's), the scale mode and 32-bit offsets within a sample. Both directions are supported."""
    reason = triton_unavailable(x)
    if reason is not None:
        return reason
    if x.dtype not in _HALF:
        return f"x is {x.dtype}: the triton kernels take float32, float16 or bfloat16"
    if scale not in SCALE_CODES:
        return f"scale is {scale!r}: the triton kernels know {', '.join(map(repr, SCALE_CODES))}"
    lay = image_layout(x)
    per_sample = max(lay.c, h.shape[1], 2 * next_power_of_2(lay.c - lay.c // 2)) * lay.s
    if per_sample > 2**31 - 2 * MAX_BLOCK:
        return f"{per_sample} elements per sample: the triton kernels index a sample with 32 bits"
    return None


def _coupling_plan(x: Tensor, h: Tensor, scale: str) -> dict:
    """The rows view of x and h and the tile sizes (module docstring); same for forward and backward."""
    lay = image_layout(x)
    ca, cb = lay.c // 2, lay.c - lay.c // 2
    ch = h.shape[1]
    if lay.channels_last:
        rows, a_len, b_len, h_len = lay.s, ca, cb, ch
    else:
        rows, a_len, b_len, h_len = 1, ca * lay.s, cb * lay.s, ch * lay.s
    block_k = min(MAX_BLOCK, next_power_of_2(b_len))
    row_tiles = cdiv(b_len, block_k)
    rows_per_tile = min(next_power_of_2(rows), MAX_BLOCK // block_k)
    block_j = block_k * rows_per_tile
    tiles = row_tiles * cdiv(rows, rows_per_tile)
    block_n = min(next_power_of_2(lay.n), max(1, MAX_BLOCK // 2 // block_j))
    return {
        "n": lay.n,
        "programs": cdiv(lay.n, block_n) * tiles,
        "args": {
            "N": lay.n,
            "tiles": tiles,
            "rows": rows,
            "row_tiles": row_tiles,
            "a_len": a_len,
            "b_len": b_len,
            "t_off": 0 if scale == "additive" else b_len,
            "h_len": h_len,
        },
        "SCALE": SCALE_CODES[scale],
        "BLOCK_N": block_n,
        "BLOCK_J": block_j,
        "BLOCK_K": block_k,
        "num_warps": _num_warps(block_n * block_j),
    }


def coupling_forward(
    x: Tensor, h: Tensor, scale: str, clamp: float, reverse: bool, want_logdet: bool
) -> tuple[Tensor, Tensor | None]:
    """y_a = x_a, y_b = x_b * s + t (reverse: (x_b - t) * exp(-log s)), logdet[n] = +-sum log s.

    x: (N, C, *spatial), C >= 2, float32, float16 or bfloat16, contiguous or channels_last; Ca = C // 2,
    Cb = C - Ca. h: (N, 2 * Cb, *spatial) (additive: (N, Cb, *spatial)) in x's dtype and layout, h_s =
    h[:, :Cb] and t = h[:, Cb:] (additive: t = h). log s of h_s per ``scale`` (module docstring) with
    ``clamp`` > 0 for the softclamp modes; all math in float32. Returns y, new, in x's dtype and layout,
    and logdet, float32 (N,) (the sum over b-channels and positions of log s, negated when reverse),
    when want_logdet (else None). One pass: reads x and h once, writes y once; the per-(sample, tile)
    partials of logdet are summed by torch in a fixed order. Never synchronizes with the host.
    """
    plan = _coupling_plan(x, h, scale)
    y = torch.empty_like(x)
    n = plan["n"]
    has_logdet = want_logdet and plan["SCALE"] != _ADDITIVE
    tiles = plan["args"]["tiles"]
    partials = torch.empty((n, tiles), device=x.device, dtype=torch.float32) if has_logdet else y
    with on_device(x):
        _coupling_forward_kernel[(plan["programs"],)](
            x,
            h,
            y,
            partials,
            **plan["args"],
            clamp=float(clamp),
            inv_clamp=1.0 / float(clamp),
            SCALE=plan["SCALE"],
            REVERSE=bool(reverse),
            WANT_LOGDET=has_logdet,
            BLOCK_N=plan["BLOCK_N"],
            BLOCK_J=plan["BLOCK_J"],
            BLOCK_K=plan["BLOCK_K"],
            num_warps=plan["num_warps"],
        )
    if not want_logdet:
        return y, None
    if not has_logdet:  # additive: s = 1
        return y, torch.zeros(n, device=x.device, dtype=torch.float32)
    return y, (partials.view(n) if tiles == 1 else partials.sum(dim=1))


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
    """Gradients of the forward direction: dx_a = dy_a, dx_b = dy_b * s, dt = dy_b and
    dh_s = (dy_b * x_b * s + dlogdet[n]) * g (g = d log s / d h_s; additive: dh = dy_b).

    dy: None (zero) or in x's shape, dtype and layout; dlogdet: None (zero) or float32 (N,) contiguous.
    x, h, scale, clamp: as in :func:`coupling_forward`. Returns dx (x's dtype and layout) when need_dx
    and dh (h's) when need_dh, else None for each. One pass: reads dy, x_b and h where a wanted gradient
    needs them and writes dx and dh once. Never synchronizes with the host.
    """
    if not (need_dx or need_dh):
        return None, None
    plan = _coupling_plan(x, h, scale)
    dx = torch.empty_like(x) if need_dx else None
    dh = torch.empty_like(h) if need_dh else None
    with on_device(x):
        _coupling_backward_kernel[(plan["programs"],)](
            dy if dy is not None else x,
            dlogdet if dlogdet is not None else x,
            x,
            h,
            dx if dx is not None else x,
            dh if dh is not None else h,
            **plan["args"],
            clamp=float(clamp),
            inv_clamp=1.0 / float(clamp),
            SCALE=plan["SCALE"],
            HAS_DY=dy is not None,
            HAS_DLOGDET=dlogdet is not None and plan["SCALE"] != _ADDITIVE,
            NEED_DX=need_dx,
            NEED_DH=need_dh,
            BLOCK_N=plan["BLOCK_N"],
            BLOCK_J=plan["BLOCK_J"],
            BLOCK_K=plan["BLOCK_K"],
            num_warps=plan["num_warps"],
        )
    return dx, dh


def actnorm_not_supported(x: Tensor, log_scale: Tensor, bias: Tensor, reverse: bool) -> str | None:
    """Why the triton backend cannot run this actnorm call, or None when it can.

    The op module validates shapes, brings x to a dense layout and converts log_scale and bias to
    contiguous float32 (C,) before a kernel runs; what remains is whether triton runs on x's device,
    x's dtype and 32-bit offsets within a sample. Both directions are supported."""
    reason = triton_unavailable(x)
    if reason is not None:
        return reason
    if x.dtype not in _HALF:
        return f"x is {x.dtype}: the triton kernels take float32, float16 or bfloat16"
    lay = image_layout(x)
    if lay.c * lay.s > 2**31 - 2 * MAX_BLOCK:
        return f"{lay.c * lay.s} elements per sample: the triton kernels index a sample with 32 bits"
    return None


def _actnorm_plan(x: Tensor) -> dict:
    """The (A, C, B) view of x and its tile sizes (module docstring)."""
    lay = image_layout(x)
    a, b = (lay.n * lay.s, 1) if lay.channels_last else (lay.n, lay.s)
    block_b = min(MAX_BLOCK, next_power_of_2(b))
    block_c = min(next_power_of_2(lay.c), MAX_BLOCK // block_b)
    block_a = min(next_power_of_2(a), MAX_BLOCK // (block_b * block_c))
    return {
        "A": a,
        "C": lay.c,
        "B": b,
        "a_tiles": cdiv(a, block_a),
        "b_tiles": cdiv(b, block_b),
        "c_tiles": cdiv(lay.c, block_c),
        "BLOCK_A": block_a,
        "BLOCK_C": block_c,
        "BLOCK_B": block_b,
        "num_warps": _num_warps(block_a * block_c * block_b),
    }


def actnorm_forward(x: Tensor, log_scale: Tensor, bias: Tensor, reverse: bool) -> Tensor:
    """y = (x + bias[c]) * exp(log_scale[c]) (reverse: x * exp(-log_scale[c]) - bias[c]).

    x: (N, C, *spatial), float32, float16 or bfloat16, contiguous or channels_last; log_scale, bias:
    contiguous float32 (C,). Returns y, new, in x's dtype and layout; math in float32. One pass: reads x
    once and writes y once. Never synchronizes with the host.
    """
    p = _actnorm_plan(x)
    y = torch.empty_like(x)
    with on_device(x):
        _actnorm_forward_kernel[(p["a_tiles"] * p["b_tiles"] * p["c_tiles"],)](
            x,
            log_scale,
            bias,
            y,
            p["A"],
            p["C"],
            p["B"],
            p["b_tiles"],
            p["c_tiles"],
            REVERSE=bool(reverse),
            BLOCK_A=p["BLOCK_A"],
            BLOCK_C=p["BLOCK_C"],
            BLOCK_B=p["BLOCK_B"],
            num_warps=p["num_warps"],
        )
    return y


def actnorm_backward(
    dy: Tensor, x: Tensor, log_scale: Tensor, bias: Tensor, need_dx: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """dx = dy * exp(log_scale[c]) and the per-channel sums sum_{n,s} dy and sum_{n,s} dy * (x + bias[c]).

    dy, x: (N, C, *spatial) in one dtype (float32, float16, bfloat16) and layout (contiguous or
    channels_last); log_scale, bias: contiguous float32 (C,). Returns dx (x's dtype and layout) when
    need_dx (else None), and the two sums, float32 (C,). One pass over dy and x: each program loops over
    its chunk of rows, writes dx and one float32 partial per channel and sum; torch sums the partials in a
    fixed order (no atomics). Never synchronizes with the host.
    """
    p = _actnorm_plan(x)
    target = _PROGRAMS_PER_SM * sm_count(x.device)
    per_chunk = min(_MAX_TILES_PER_CHUNK, max(1, (p["a_tiles"] * p["b_tiles"] * p["c_tiles"]) // target))
    a_chunks = cdiv(p["a_tiles"], per_chunk)
    chunks = a_chunks * p["b_tiles"]
    partials = torch.empty((2, chunks, p["C"]), device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if need_dx else None
    with on_device(x):
        _actnorm_backward_kernel[(chunks * p["c_tiles"],)](
            dy,
            x,
            log_scale,
            bias,
            dx if dx is not None else x,
            partials,
            p["A"],
            p["C"],
            p["B"],
            p["b_tiles"],
            p["c_tiles"],
            per_chunk,
            chunks,
            NEED_DX=need_dx,
            BLOCK_A=p["BLOCK_A"],
            BLOCK_C=p["BLOCK_C"],
            BLOCK_B=p["BLOCK_B"],
            num_warps=p["num_warps"],
        )
    # Two separate sums: the outputs must not alias each other (torch.library ops check it).
    return dx, partials[0].sum(dim=0), partials[1].sum(dim=0)


if triton is not None:
    from genkernels.triton._math import _exp, _tanh

    @triton.jit
    def _atan(z):
        """atan(z) in float32 to 3 ulp, branch-free: |z| is reduced to |t| <= tan(pi/8) by atan(a) =
        pi/2 + atan(-1/a) (a > tan(3pi/8)) or pi/4 + atan((a - 1) / (a + 1)) (a > tan(pi/8)), one
        division either way, then atan(t) = t + t^3 P(t^2) with P a degree-4 polynomial fitted to
        atan on that interval (relative error 2e-9 in exact arithmetic)."""
        a = tl.abs(z)
        big = a > 2.414213562373095
        mid = a > 0.41421356237309503
        num = tl.where(big, -1.0, tl.where(mid, a - 1.0, a))
        den = tl.where(big, a, tl.where(mid, a + 1.0, 1.0))
        t = num / den
        w = t * t
        p = w * -6.2832952610e-02 + 1.0681206923e-01
        p = p * w - 1.4256641997e-01
        p = p * w + 1.9999275763e-01
        p = p * w - 3.3333331698e-01
        r = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0)) + (t + t * w * p)
        return tl.where(z < 0.0, -r, r)

    @triton.jit
    def _log1p_small(e):
        """log(1 + e) for 0 <= e <= 1 to a few ulp: log(w) * e / (w - 1) with w = 1 + e corrects the
        rounding of w (and is e itself where w rounds to 1, where the ratio would be 0 / 0)."""
        w = 1.0 + e
        return tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))

    @triton.jit
    def _log_scale(u, clamp, inv_clamp, SCALE: tl.constexpr, WANT_G: tl.constexpr):
        """(log s, g = d log s / d u) of the pre-activation u (float32) in mode SCALE (module docstring;
        additive is not asked for). g is 0.0 (unused) unless WANT_G."""
        g = 0.0
        if SCALE == 0:  # exp
            log_s = u
            g = 1.0
        elif SCALE == 1:  # sigmoid: log sigmoid(u + 2), e in (0, 1] for any finite u
            v = u + 2.0
            e = _exp(-tl.abs(v))
            log_s = tl.minimum(v, 0.0) - _log1p_small(e)
            if WANT_G:
                g = tl.where(v >= 0.0, e, 1.0) / (1.0 + e)
        elif SCALE == 2:  # softclamp_tanh
            z = u * inv_clamp
            log_s = clamp * _tanh(z)  # to a few ulp for small |z| too, where (1 - e) / (1 + e) cancels
            if WANT_G:
                e = _exp(-2.0 * tl.abs(z))
                r = 1.0 / (1.0 + e)
                g = 4.0 * e * r * r  # 1 - tanh^2 without the cancellation near |z| large
        else:  # softclamp_atan
            z = u * inv_clamp
            log_s = (0.636 * clamp) * _atan(z)
            if WANT_G:
                g = 0.636 / (1.0 + z * z)
        return log_s, g

    @triton.jit
    def _coupling_tile(
        pid,
        N,
        tiles,
        rows,
        row_tiles,
        a_len,
        b_len,
        h_len,
        BLOCK_N: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """The samples of program ``pid`` ([BLOCK_N]), its tile index, and for its [BLOCK_N, BLOCK_J]
        tile: offsets of the a-part element (in x), of the h_s element (in h; the b-part of x is at
        +a_len, t at +t_off), and the masks of the a- and b-parts (module docstring)."""
        nb = pid // tiles
        t = pid - nb * tiles
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        i = tl.arange(0, BLOCK_J)[None, :]
        # Powers of two: shifts. row_tiles == 1 (specialized) unless a row's b-part exceeds MAX_BLOCK.
        rt = t // row_tiles
        r = rt * (BLOCK_J // BLOCK_K) + i // BLOCK_K
        k = (t - rt * row_tiles) * BLOCK_K + i % BLOCK_K
        x_row = a_len + b_len
        n64 = n.to(tl.int64)[:, None]
        x_off = n64 * (rows * x_row) + (r * x_row + k)
        h_off = n64 * (rows * h_len) + (r * h_len + k)
        in_rows = (n < N)[:, None] & (r < rows)
        return n, t, x_off, h_off, in_rows & (k < a_len), in_rows & (k < b_len)

    @triton.jit
    def _coupling_forward_kernel(
        x_ptr,
        h_ptr,
        y_ptr,
        partial_ptr,
        N,
        tiles,
        rows,
        row_tiles,
        a_len,
        b_len,
        t_off,
        h_len,
        clamp,
        inv_clamp,
        SCALE: tl.constexpr,  # SCALE_CODES: 0 exp, 1 sigmoid, 2 softclamp_tanh, 3 softclamp_atan, 4 additive
        REVERSE: tl.constexpr,
        WANT_LOGDET: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """y and the logdet partials of one tile of BLOCK_N samples; grid (ceil(N / BLOCK_N) * tiles,).

        Memory traffic: x (both parts) and h read once, y written once, one float32 partial per sample
        of the tile."""
        pid = tl.program_id(0)
        n, t, x_off, h_off, mask_a, mask_b = _coupling_tile(
            pid, N, tiles, rows, row_tiles, a_len, b_len, h_len, BLOCK_N, BLOCK_J, BLOCK_K
        )
        x_a = tl.load(x_ptr + x_off, mask=mask_a)
        tl.store(y_ptr + x_off, x_a, mask=mask_a)
        x_b = tl.load(x_ptr + (x_off + a_len), mask=mask_b, other=0.0).to(tl.float32)
        shift = tl.load(h_ptr + (h_off + t_off), mask=mask_b, other=0.0).to(tl.float32)
        if SCALE == 4:
            y_b = x_b - shift if REVERSE else x_b + shift
        else:
            u = tl.load(h_ptr + h_off, mask=mask_b, other=0.0).to(tl.float32)
            log_s, _ = _log_scale(u, clamp, inv_clamp, SCALE, False)
            if REVERSE:
                y_b = (x_b - shift) * _exp(-log_s)
            else:
                y_b = x_b * _exp(log_s) + shift
            if WANT_LOGDET:
                total = tl.sum(tl.where(mask_b, log_s, 0.0), axis=1)
                tl.store(partial_ptr + n * tiles + t, -total if REVERSE else total, mask=n < N)
        tl.store(y_ptr + (x_off + a_len), y_b.to(y_ptr.dtype.element_ty), mask=mask_b)

    @triton.jit
    def _coupling_backward_kernel(
        dy_ptr,
        dlogdet_ptr,
        x_ptr,
        h_ptr,
        dx_ptr,
        dh_ptr,
        N,
        tiles,
        rows,
        row_tiles,
        a_len,
        b_len,
        t_off,
        h_len,
        clamp,
        inv_clamp,
        SCALE: tl.constexpr,
        HAS_DY: tl.constexpr,
        HAS_DLOGDET: tl.constexpr,
        NEED_DX: tl.constexpr,
        NEED_DH: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """dx and dh of one tile of BLOCK_N samples; grid (ceil(N / BLOCK_N) * tiles,).

        Memory traffic: dy (both parts), x_b and h read once, each only when a wanted gradient needs it;
        dx and dh written once; dlogdet one load per sample of the tile."""
        pid = tl.program_id(0)
        n, t, x_off, h_off, mask_a, mask_b = _coupling_tile(
            pid, N, tiles, rows, row_tiles, a_len, b_len, h_len, BLOCK_N, BLOCK_J, BLOCK_K
        )
        if NEED_DX:
            if HAS_DY:
                dx_a = tl.load(dy_ptr + x_off, mask=mask_a)
            else:
                dx_a = tl.zeros([BLOCK_N, BLOCK_J], dtype=dx_ptr.dtype.element_ty)
            tl.store(dx_ptr + x_off, dx_a, mask=mask_a)
        dy_b = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
        if HAS_DY:
            dy_b = tl.load(dy_ptr + (x_off + a_len), mask=mask_b, other=0.0).to(tl.float32)
        if SCALE == 4:
            dx_b = dy_b
        else:
            # h_s only when a wanted gradient needs it: g for dh, s where dy (its only factor) is given.
            s = 0.0
            g = 0.0
            if NEED_DH:
                u = tl.load(h_ptr + h_off, mask=mask_b, other=0.0).to(tl.float32)
                log_s, g = _log_scale(u, clamp, inv_clamp, SCALE, True)
                s = _exp(log_s)
            elif HAS_DY:
                u = tl.load(h_ptr + h_off, mask=mask_b, other=0.0).to(tl.float32)
                log_s, _ = _log_scale(u, clamp, inv_clamp, SCALE, False)
                s = _exp(log_s)
            dx_b = dy_b * s if HAS_DY else dy_b
            if NEED_DH:
                dh_s = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
                if HAS_DY:
                    x_b = tl.load(x_ptr + (x_off + a_len), mask=mask_b, other=0.0).to(tl.float32)
                    dh_s += dy_b * x_b * s
                if HAS_DLOGDET:
                    dh_s += tl.load(dlogdet_ptr + n, mask=n < N, other=0.0)[:, None]
                tl.store(dh_ptr + h_off, (dh_s * g).to(dh_ptr.dtype.element_ty), mask=mask_b)
        if NEED_DX:
            tl.store(dx_ptr + (x_off + a_len), dx_b.to(dx_ptr.dtype.element_ty), mask=mask_b)
        if NEED_DH:
            tl.store(dh_ptr + (h_off + t_off), dy_b.to(dh_ptr.dtype.element_ty), mask=mask_b)

    @triton.jit
    def _actnorm_tile(
        a0,
        c0,
        b0,
        A,
        C,
        B,
        BLOCK_A: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """Offsets and mask of the tile of the (A, C, B) view at (a0, c0, b0), and its channels ([BLOCK_C, 1,
        1]) with their mask. The tile is [BLOCK_C, BLOCK_A, BLOCK_B], channels first whichever axis is
        contiguous in memory, so that the backward's sums run along the last axes: tree reductions on
        the GPU and pairwise sums in the interpreter, not sequential ones."""
        c = c0 + tl.arange(0, BLOCK_C)[:, None, None]
        a = a0 + tl.arange(0, BLOCK_A)[None, :, None]
        b = b0 + tl.arange(0, BLOCK_B)[None, None, :]
        off = a.to(tl.int64) * (C * B) + (c * B + b)
        c_in = c < C
        return off, (a < A) & c_in & (b < B), c, c_in

    @triton.jit
    def _actnorm_forward_kernel(
        x_ptr,
        log_scale_ptr,
        bias_ptr,
        y_ptr,
        A,
        C,
        B,
        b_tiles,
        c_tiles,
        REVERSE: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """y of one [BLOCK_C, BLOCK_A, BLOCK_B] tile; grid (a_tiles * b_tiles * c_tiles,).

        Memory traffic: x read once, y written once, BLOCK_C parameters per program."""
        pid = tl.program_id(0)
        ct = pid % c_tiles
        rest = pid // c_tiles
        bt = rest % b_tiles
        at = rest // b_tiles
        off, mask, c, c_in = _actnorm_tile(at * BLOCK_A, ct * BLOCK_C, bt * BLOCK_B, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B)
        log_scale = tl.load(log_scale_ptr + c, mask=c_in, other=0.0)
        bias = tl.load(bias_ptr + c, mask=c_in, other=0.0)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if REVERSE:
            y = x * _exp(-log_scale) - bias
        else:
            y = (x + bias) * _exp(log_scale)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _actnorm_backward_kernel(
        dy_ptr,
        x_ptr,
        log_scale_ptr,
        bias_ptr,
        dx_ptr,
        partial_ptr,
        A,
        C,
        B,
        b_tiles,
        c_tiles,
        per_chunk,
        chunks,
        NEED_DX: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """dx of ``per_chunk`` consecutive [BLOCK_C, BLOCK_A, BLOCK_B] tiles along A, and the chunk's
        per-channel sums of dy and dy * (x + bias) into partials (2, chunks, C); grid (chunks * c_tiles,),
        chunk = a_chunk * b_tiles + b_tile.

        Memory traffic: dy and x read once, dx written once, 2 * BLOCK_C float32 partials and BLOCK_C
        parameters per program."""
        pid = tl.program_id(0)
        ct = pid % c_tiles
        chunk = pid // c_tiles
        bt = chunk % b_tiles
        ac = chunk // b_tiles
        c0 = ct * BLOCK_C
        tile_c = c0 + tl.arange(0, BLOCK_C)[:, None, None]
        bias = tl.load(bias_ptr + tile_c, mask=tile_c < C, other=0.0)
        scale = 0.0
        if NEED_DX:
            scale = _exp(tl.load(log_scale_ptr + tile_c, mask=tile_c < C, other=0.0))
        sum_dy = tl.zeros([BLOCK_C, BLOCK_A, BLOCK_B], dtype=tl.float32)
        sum_dy_xb = tl.zeros([BLOCK_C, BLOCK_A, BLOCK_B], dtype=tl.float32)
        for step in range(0, per_chunk):
            a0 = (ac * per_chunk + step) * BLOCK_A
            off, mask, c, c_in = _actnorm_tile(a0, c0, bt * BLOCK_B, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            sum_dy += dy
            sum_dy_xb += dy * (x + bias)
            if NEED_DX:
                tl.store(dx_ptr + off, (dy * scale).to(dx_ptr.dtype.element_ty), mask=mask)
        channels = c0 + tl.arange(0, BLOCK_C)
        at = partial_ptr + chunk * C + channels
        tl.store(at, tl.sum(tl.sum(sum_dy, axis=2), axis=1), mask=channels < C)
        tl.store(at + chunks * C, tl.sum(tl.sum(sum_dy_xb, axis=2), axis=1), mask=channels < C)
