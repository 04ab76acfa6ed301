"""Adaptive LayerNorm (adaLN) in Triton: LayerNorm / RMSNorm with modulation, the gated residual, and the
two fused, forward and fused backward (see genkernels.ops.adaln for the formulas and the interface).

Every tensor is a 2-D view of R rows of D elements (last dim contiguous, any row stride). One kernel
serves the three forwards and one the three backwards, specialized by constexpr flags (NORM: a
normalization; RESIDUAL: a gated residual in front of it; RMS; which of weight, bias, shift, scale are
present; whether each modulation is per token or per sample). A program holds tiles of BLOCK_R rows by
BLOCK_D = next_pow2(D) columns (masked past D), so a row's statistics are one in-register reduction
in float32; row offsets are 64-bit. The forward may split a row into two power-of-two column blocks
instead (1152 = 1024 + 128, 3072 = 2048 + 1024: :func:`_column_blocks`), so that no lane is masked.

Forward: one program per tile of BLOCK_R rows. It reads x (and the residual branch y and the gate) once,
writes h once (the residual; rounded to x's dtype before it is normalized) and out once, and the per-row
float32 mean and rstd. Per-sample modulations (row r reads row r // tokens) are gathered from cache.

Backward: programs over (group, chunk) walk chunk_rows consecutive rows in tiles, where a group is one
sample (when a per-sample modulation gradient is wanted: its sum over the sample's tokens stays inside
the program's group) or all R rows. Each tile recomputes xhat from the saved float32 mean and rstd, and
writes dx in one pass (the row sums of dxhat and dxhat * xhat are in-register reductions). The column
gradients (dweight, dbias, and dshift / dscale / dgate when per sample) accumulate in float32 registers
and are stored as one partial row per program, then summed here by torch in a fixed order
(deterministic, no atomics). Memory traffic: dout and x (or h; plus dh and y in the fused op) read once,
dx (and dy) written once, per-token dscale / dgate written once, and the partials (programs x D floats
per gradient, programs about twice the SM count).
"""

from __future__ import annotations

import torch
from torch import Tensor

from genkernels._adaln_interface import AdalnInterface
from genkernels.triton._common import cdiv, next_power_of_2, on_device, sm_count, tl, triton, triton_unavailable

# Widest row held in registers (BLOCK_D = next_pow2(D)).
MAX_D = 16384
# Elements of one forward / backward tile (BLOCK_R rows x BLOCK_D columns; at least one row).
FORWARD_TILE = 2048
BACKWARD_TILE = 2048
# Forward tile elements per warp: 32 a thread. A forward program pays a fixed cost a thread (the row offsets
# and the sample's, two block-wide reductions, the statistics' stores) that 8 elements a thread did not
# amortize: at DiT-XL's (8192, 1152) bf16, 384 SASS instructions a thread of 4.5 real elements (85 an
# element, against the about 40 that 4 bytes an element allow at an H100's copy bandwidth before the issue
# rate bounds it); one row a program of 2 warps takes it to 33 (FLUX's D = 3072: 46 to 25). The row in two
# unmasked column blocks (_column_blocks) of one warp takes DiT-XL to 23 (the fused gated residual + norm
# 46 to 31; FLUX 25 to 22); the same blocks on 2 warps gave 27 and 36. Counted by
# `python -m tests.triton._compile_kernels --arch 90 --label bench --sass` (triton 3.6, sm_90).
FORWARD_ELEMENTS_PER_WARP = 1024
# Backward programs per SM (each leaves a partial row per column gradient).
PROGRAMS_PER_SM = 2
# Partial slots of the backward's column gradients.
_PART_W, _PART_B, _PART_SHIFT, _PART_SCALE, _PART_GATE = range(5)
_PARTS = 5


def not_supported(x: Tensor) -> str | None:
    """Why the triton backend cannot run an adaLN call on x (B, L, D), or None when it can.

    The op module has checked dtypes, shapes and devices; what remains is whether triton runs on x's
    device and whether a row of D elements fits in registers (D <= MAX_D)."""
    reason = triton_unavailable(x)
    if reason is not None:
        return reason
    if x.shape[-1] > MAX_D:
        return f"D = {x.shape[-1]} is wider than the {MAX_D} elements a row tile holds"
    return None


def _num_warps(elements: int) -> int:
    return min(16, max(1, elements // 256))


def _forward_warps(elements: int) -> int:
    """Warps of a forward tile of ``elements`` real elements: about FORWARD_ELEMENTS_PER_WARP a warp, a power of two."""
    return min(16, next_power_of_2(max(1, elements // FORWARD_ELEMENTS_PER_WARP)))


def _floor_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _per_token(t: Tensor | None, rows: int) -> bool:
    return t is not None and t.shape[0] == rows


def _stride(t: Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _column_blocks(d: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2) of the forward: a row of D as one power-of-two block (BLOCK_D2 = 0), or as a
    power-of-two block and a narrower one where the two cover fewer columns than next_pow2(D): DiT-XL's
    1152 = 1024 + 128 and FLUX's 3072 = 2048 + 1024 use every column, where one block of 2048 or 4096
    would leave 44% or 25% of its lanes masked (issuing instructions for nothing)."""
    full = next_power_of_2(d)
    low = full // 2
    rest = next_power_of_2(d - low) if d > low else 0
    if d == full or low + rest >= full:
        return full, 0
    return low, rest


def _forward(x, res, gate, weight, bias, shift, scale, tokens, eps, rms, norm, stats=True):
    """(h or None, out or None, mean, rstd) of one fused forward launch (see the module docstring); mean and
    rstd None without ``stats`` (or ``norm``)."""
    rows, d = x.shape
    block_d, block_d2 = _column_blocks(d)
    width = block_d + block_d2
    block_r = max(1, min(next_power_of_2(rows), _floor_power_of_2(max(1, FORWARD_TILE // width))))
    residual = res is not None
    h = x.new_empty((rows, d)) if residual else None
    out = x.new_empty((rows, d)) if norm else None
    stats = norm and stats
    mean = x.new_empty((rows if stats else 0,), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    with on_device(x):
        _adaln_forward_kernel[(cdiv(rows, block_r),)](
            x,
            res if residual else x,
            gate if gate is not None else x,
            weight if weight is not None else mean,
            bias if bias is not None else mean,
            shift if shift is not None else x,
            scale if scale is not None else x,
            h if residual else out,
            out if norm else h,
            mean,
            rstd,
            rows,
            d,
            tokens,
            x.stride(0),
            _stride(res),
            _stride(gate),
            _stride(shift),
            _stride(scale),
            float(eps),
            RESIDUAL=residual,
            HAS_GATE=gate is not None,
            GATE_TOKEN=_per_token(gate, rows),
            NORM=norm,
            STATS=stats,
            RMS=rms,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            HAS_SHIFT=shift is not None,
            SHIFT_TOKEN=_per_token(shift, rows),
            HAS_SCALE=scale is not None,
            SCALE_TOKEN=_per_token(scale, rows),
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            BLOCK_D2=block_d2,
            num_warps=_forward_warps(block_r * width),
        )
    return h, out, (mean if stats else None), (rstd if stats else None)


def _backward(v, dout, dh, res, gate, weight, bias, shift, scale, mean, rstd, tokens, rms, norm, needs):
    """One fused backward launch (genkernels._adaln_interface's backward): needs are (dx, dres, dgate, dweight,
    dbias, dshift, dscale); returns those gradients (None where not computed or the input is absent)."""
    need_dx, need_dr, need_dgate, need_dw, need_db, need_dshift, need_dscale = needs
    rows, d = dout.shape
    residual = res is not None
    gate_token, scale_token = _per_token(gate, rows), _per_token(scale, rows)
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    need_dscale = need_dscale and scale is not None
    # A per-token dshift is dout itself (the op uses it): only per-sample sums are computed.
    need_dshift = need_dshift and shift is not None and not _per_token(shift, rows)
    part_dshift = need_dshift
    part_dscale = need_dscale and not scale_token
    part_dgate = need_dgate and not gate_token
    per_sample = part_dshift or part_dscale or part_dgate
    groups = rows // tokens if per_sample else 1
    group_rows = tokens if per_sample else rows
    block_d = next_power_of_2(d)
    block_r = max(1, min(next_power_of_2(group_rows), BACKWARD_TILE // block_d))
    want = PROGRAMS_PER_SM * sm_count(dout.device)
    chunks = max(1, min(cdiv(want, groups), cdiv(group_rows, block_r)))
    chunk_rows = cdiv(cdiv(group_rows, chunks), block_r) * block_r
    chunks = cdiv(group_rows, chunk_rows)
    reduce = part_dshift or part_dscale or part_dgate or need_dw or need_db
    device = dout.device
    partials = torch.empty((groups * chunks, _PARTS, d) if reduce else (0,), device=device, dtype=torch.float32)
    store_dx = need_dx or residual
    dx = torch.empty((rows, d), device=device, dtype=dout.dtype) if store_dx else None
    dr = torch.empty((rows, d), device=device, dtype=res.dtype) if need_dr else None  # y's own dtype
    dgate = torch.empty((rows, d), device=device, dtype=gate.dtype) if need_dgate and gate_token else None
    dscale = torch.empty((rows, d), device=device, dtype=scale.dtype) if need_dscale and scale_token else None
    dummy = dout
    with on_device(dout):
        _adaln_backward_kernel[(groups, chunks)](
            dout,
            v if v is not None else dummy,
            dh if dh is not None else dummy,
            res if residual else dummy,
            gate if gate is not None else dummy,
            weight if weight is not None else partials,
            bias if bias is not None else partials,
            scale if scale is not None else dummy,
            mean if mean is not None else partials,
            rstd if rstd is not None else partials,
            dx if dx is not None else dummy,
            dr if dr is not None else dummy,
            dgate if dgate is not None else dummy,
            dscale if dscale is not None else dummy,
            partials,
            rows,
            d,
            tokens,
            group_rows,
            chunk_rows,
            chunks,
            dout.stride(0),
            _stride(v),
            _stride(dh),
            _stride(res),
            _stride(gate),
            _stride(scale),
            RESIDUAL=residual,
            NORM=norm,
            RMS=rms,
            HAS_DH=dh is not None,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            HAS_SCALE=scale is not None,
            SCALE_TOKEN=scale_token,
            GATE_TOKEN=gate_token,
            STORE_DX=store_dx,
            NEED_DW=need_dw,
            NEED_DB=need_db,
            NEED_DSHIFT=part_dshift,
            NEED_DSCALE=need_dscale,
            NEED_DR=need_dr,
            NEED_DGATE=need_dgate,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            # 8 elements a thread (16-byte accesses of bf16 / fp16), or 4 when per-token scale or gate tiles
            # are live too: with those the fused backward spilled at 8 on sm_90 (tests/triton/test_compile.py).
            num_warps=_num_warps(block_r * block_d * (2 if scale_token or gate_token else 1)),
        )

    def column(slot: int, wanted: bool) -> Tensor | None:
        return partials[:, slot].sum(0) if wanted else None

    def per_group(slot: int, wanted: bool) -> Tensor | None:
        return partials[:, slot].view(groups, chunks, d).sum(1) if wanted else None

    return (
        dx,
        dr,
        dgate if gate_token else per_group(_PART_GATE, part_dgate),
        column(_PART_W, need_dw),
        column(_PART_B, need_db),
        per_group(_PART_SHIFT, part_dshift),
        dscale if scale_token else per_group(_PART_SCALE, part_dscale),
    )


# --------------------------------------------------------------------------- the backend interface

# layer_norm_modulate_forward / _backward, gated_residual_forward / _backward and
# gated_residual_layer_norm_modulate_forward / _backward, over the two launches above.
AdalnInterface(_forward, _backward).bind(globals())


if triton is not None:

    @triton.jit
    def _forward_cols(
        x_ptr,
        r_ptr,
        g_ptr,
        h_ptr,
        r64,
        sample,
        row_ok,
        D,
        stride_x,
        stride_r,
        stride_g,
        RESIDUAL: tl.constexpr,
        HAS_GATE: tl.constexpr,
        GATE_TOKEN: tl.constexpr,
        COL0: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Columns COL0 .. COL0 + BLOCK_C of the tile's rows: (v, cols, mask), v the float32 input of the norm
        (0 past D): x, or h = x + gate * y (x + y without HAS_GATE), which is stored (rounded to x's dtype) and
        then read back rounded."""
        cols = COL0 + tl.arange(0, BLOCK_C)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        v = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            branch = tl.load(r_ptr + r64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                grow = r64 if GATE_TOKEN else sample
                g = tl.load(g_ptr + grow[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                branch = g * branch
            h = (v + branch).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + r64[:, None] * D + cols[None, :], h, mask=mask)
            v = h.to(tl.float32)  # the norm of the h that is returned
        return v, cols, mask

    @triton.jit
    def _forward_store(
        centered,
        rstd,
        cols,
        mask,
        r64,
        sample,
        w_ptr,
        b_ptr,
        shift_ptr,
        scale_ptr,
        out_ptr,
        D,
        stride_shift,
        stride_scale,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        SHIFT_TOKEN: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        SCALE_TOKEN: tl.constexpr,
    ):
        """out = ((centered * rstd) * weight + bias) * (1 + scale) + shift on one column block of the tile."""
        col_ok = cols < D
        n = centered * rstd[:, None]
        if HAS_W:
            n = n * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            n = n + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            srow = r64 if SCALE_TOKEN else sample
            sc = tl.load(scale_ptr + srow[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0)
            n = n * (1.0 + sc.to(tl.float32))
        if HAS_SHIFT:
            srow = r64 if SHIFT_TOKEN else sample
            sh = tl.load(shift_ptr + srow[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0)
            n = n + sh.to(tl.float32)
        tl.store(out_ptr + r64[:, None] * D + cols[None, :], n.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _adaln_forward_kernel(
        x_ptr,
        r_ptr,
        g_ptr,
        w_ptr,
        b_ptr,
        shift_ptr,
        scale_ptr,
        h_ptr,
        out_ptr,
        mean_ptr,
        rstd_ptr,
        R,
        D,
        tokens,
        stride_x,
        stride_r,
        stride_g,
        stride_shift,
        stride_scale,
        eps,
        RESIDUAL: tl.constexpr,
        HAS_GATE: tl.constexpr,
        GATE_TOKEN: tl.constexpr,
        NORM: tl.constexpr,
        STATS: tl.constexpr,
        RMS: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        SHIFT_TOKEN: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        SCALE_TOKEN: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_D2: tl.constexpr,
    ):
        """BLOCK_R rows: h = x + gate * y (RESIDUAL; x + y without HAS_GATE), then (NORM) out = modulated norm
        of h (or of x), and (STATS) each row's mean and rstd;
        grid (ceil(R / BLOCK_R),). The row is one column block of BLOCK_D, or with BLOCK_D2 > 0 two, BLOCK_D
        then BLOCK_D2 (:func:`_column_blocks`). Memory traffic: x (y) read once, h (out) written once."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        r64 = rows.to(tl.int64)
        sample = r64 // tokens
        v, cols, mask = _forward_cols(
            x_ptr, r_ptr, g_ptr, h_ptr, r64, sample, row_ok, D, stride_x, stride_r, stride_g,
            RESIDUAL, HAS_GATE, GATE_TOKEN, 0, BLOCK_D,
        )  # fmt: skip
        if BLOCK_D2 > 0:
            v2, cols2, mask2 = _forward_cols(
                x_ptr, r_ptr, g_ptr, h_ptr, r64, sample, row_ok, D, stride_x, stride_r, stride_g,
                RESIDUAL, HAS_GATE, GATE_TOKEN, BLOCK_D, BLOCK_D2,
            )  # fmt: skip
        if NORM:
            if RMS:
                mean = tl.zeros((BLOCK_R,), tl.float32)
                centered = v
                if BLOCK_D2 > 0:
                    centered2 = v2
            else:
                total = tl.sum(v, axis=1)
                if BLOCK_D2 > 0:
                    total += tl.sum(v2, axis=1)
                mean = total / D
                centered = tl.where(mask, v - mean[:, None], 0.0)
                if BLOCK_D2 > 0:
                    centered2 = tl.where(mask2, v2 - mean[:, None], 0.0)
            squares = tl.sum(centered * centered, axis=1)
            if BLOCK_D2 > 0:
                squares += tl.sum(centered2 * centered2, axis=1)
            rstd = 1.0 / tl.sqrt(squares / D + eps)
            _forward_store(
                centered, rstd, cols, mask, r64, sample, w_ptr, b_ptr, shift_ptr, scale_ptr, out_ptr, D,
                stride_shift, stride_scale, HAS_W, HAS_B, HAS_SHIFT, SHIFT_TOKEN, HAS_SCALE, SCALE_TOKEN,
            )  # fmt: skip
            if BLOCK_D2 > 0:
                _forward_store(
                    centered2, rstd, cols2, mask2, r64, sample, w_ptr, b_ptr, shift_ptr, scale_ptr, out_ptr, D,
                    stride_shift, stride_scale, HAS_W, HAS_B, HAS_SHIFT, SHIFT_TOKEN, HAS_SCALE, SCALE_TOKEN,
                )  # fmt: skip
            if STATS:
                tl.store(mean_ptr + rows, mean, mask=row_ok)
                tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _adaln_backward_kernel(
        dout_ptr,
        v_ptr,
        dh_ptr,
        r_ptr,
        g_ptr,
        w_ptr,
        b_ptr,
        scale_ptr,
        mean_ptr,
        rstd_ptr,
        dx_ptr,
        dr_ptr,
        dgate_ptr,
        dscale_ptr,
        part_ptr,
        R,
        D,
        tokens,
        group_rows,
        chunk_rows,
        chunks,
        stride_dout,
        stride_v,
        stride_dh,
        stride_r,
        stride_g,
        stride_scale,
        RESIDUAL: tl.constexpr,
        NORM: tl.constexpr,
        RMS: tl.constexpr,
        HAS_DH: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        SCALE_TOKEN: tl.constexpr,
        GATE_TOKEN: tl.constexpr,
        STORE_DX: tl.constexpr,
        NEED_DW: tl.constexpr,
        NEED_DB: tl.constexpr,
        NEED_DSHIFT: tl.constexpr,
        NEED_DSCALE: tl.constexpr,
        NEED_DR: tl.constexpr,
        NEED_DGATE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """chunk_rows rows of one group (a sample, or all rows) in tiles of BLOCK_R; grid (groups, chunks).

        dx (the norm's input gradient, plus dh; or dout itself without NORM), dy = dx * gate, per-token
        dscale / dgate written per row; dweight, dbias and per-sample dshift / dscale / dgate left as one
        float32 partial row each (part_ptr[program, slot, :]). Memory traffic: dout and v = x or h (dh, y)
        read once; dx (dy) written once."""
        pid_g = tl.program_id(0)
        pid_c = tl.program_id(1)
        group_end = tl.minimum((pid_g + 1).to(tl.int64) * group_rows, R)
        start = pid_g.to(tl.int64) * group_rows + pid_c.to(tl.int64) * chunk_rows
        end = tl.minimum(start + chunk_rows, group_end)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        else:
            w = tl.full((BLOCK_D,), 1.0, tl.float32)
        if HAS_B:
            b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        else:
            b = tl.zeros((BLOCK_D,), tl.float32)
        acc_w = tl.zeros((BLOCK_D,), tl.float32)
        acc_b = tl.zeros((BLOCK_D,), tl.float32)
        acc_shift = tl.zeros((BLOCK_D,), tl.float32)
        acc_scale = tl.zeros((BLOCK_D,), tl.float32)
        acc_gate = tl.zeros((BLOCK_D,), tl.float32)
        for r0 in range(start, end, BLOCK_R):
            r64 = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            row_ok = r64 < end
            mask = row_ok[:, None] & col_ok[None, :]
            sample = r64 // tokens
            dense = r64[:, None] * D + cols[None, :]
            dy = tl.load(dout_ptr + r64[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if NORM:
                v = tl.load(v_ptr + r64[:, None] * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                mean = tl.load(mean_ptr + r64, mask=row_ok, other=0.0)
                rstd = tl.load(rstd_ptr + r64, mask=row_ok, other=0.0)
                xhat = tl.where(mask, (v - mean[:, None]) * rstd[:, None], 0.0)
                if HAS_SCALE:
                    srow = r64 if SCALE_TOKEN else sample
                    sc = tl.load(scale_ptr + srow[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0)
                    dn = dy * (1.0 + sc.to(tl.float32))
                else:
                    dn = dy
                if NEED_DSCALE:
                    dsc = dy * (xhat * w[None, :] + b[None, :])
                    if SCALE_TOKEN:
                        tl.store(dscale_ptr + dense, dsc.to(dscale_ptr.dtype.element_ty), mask=mask)
                    else:
                        acc_scale += tl.sum(dsc, axis=0)
                if NEED_DSHIFT:
                    acc_shift += tl.sum(dy, axis=0)
                if NEED_DW:
                    acc_w += tl.sum(dn * xhat, axis=0)
                if NEED_DB:
                    acc_b += tl.sum(dn, axis=0)
                dxhat = dn * w[None, :]
                proj = tl.sum(dxhat * xhat, axis=1) / D
                if RMS:
                    dx = rstd[:, None] * (dxhat - xhat * proj[:, None])
                else:
                    dx = rstd[:, None] * (dxhat - (tl.sum(dxhat, axis=1) / D)[:, None] - xhat * proj[:, None])
                if HAS_DH:
                    dx += tl.load(dh_ptr + r64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(
                        tl.float32
                    )
                if STORE_DX:
                    tl.store(dx_ptr + dense, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            else:
                dx = dy  # the gated residual alone: h's gradient is dout
            if RESIDUAL:
                if NEED_DR:
                    grow = r64 if GATE_TOKEN else sample
                    g = tl.load(g_ptr + grow[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
                    tl.store(dr_ptr + dense, (dx * g.to(tl.float32)).to(dr_ptr.dtype.element_ty), mask=mask)
                if NEED_DGATE:
                    branch = tl.load(r_ptr + r64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
                    dg = tl.where(mask, dx * branch.to(tl.float32), 0.0)
                    if GATE_TOKEN:
                        tl.store(dgate_ptr + dense, dg.to(dgate_ptr.dtype.element_ty), mask=mask)
                    else:
                        acc_gate += tl.sum(dg, axis=0)
        part = part_ptr + (pid_g * chunks + pid_c).to(tl.int64) * (5 * D) + cols
        if NEED_DW:
            tl.store(part, acc_w, mask=col_ok)
        if NEED_DB:
            tl.store(part + D, acc_b, mask=col_ok)
        if NEED_DSHIFT:
            tl.store(part + 2 * D, acc_shift, mask=col_ok)
        if NEED_DSCALE and not SCALE_TOKEN:
            tl.store(part + 3 * D, acc_scale, mask=col_ok)
        if NEED_DGATE and not GATE_TOKEN:
            tl.store(part + 4 * D, acc_gate, mask=col_ok)
