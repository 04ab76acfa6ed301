"""Rotary position embedding (see genkernels.ops.rope for the formula and the interface) in Triton: q and
k rotated in one launch, forward and inverse (the backward) from one kernel.

q (B, H, L, Dh) and k (B, Hk, L, Dh) are addressed through their three outer strides with a unit last
stride, so the (B, L, H, Dh) layouts attention projections produce (viewed as (B, H, L, Dh) by a transpose)
and slices of a fused qkv tensor run in place, without copies; the outputs have their own strides (the
output may be the input: the in-place call). A program rotates ROWS rows of Dh channels (a row is one
(b, h, l)); grid (ceil(B H L / ROWS) + ceil(B Hk L / ROWS),): the first programs take q's rows, the rest
k's, so both tensors are rotated in one launch. The row index (32-bit: B H L < 2^31) is split into
(b, h, l) once per row by two 32-bit divisions, never per element; element offsets are 64-bit.

What decides the width of the loads and stores (16-byte vectors, or single elements) is what the compiler
can prove about the offsets, so the kernel tells it: the row strides go in units of VEC, the widest of 8,
4, 2 and 1 elements that divides every one of them (a constexpr; a size-1 dim's stride, never used, counts
as 0), and P, Dh and the tables' row strides are constexprs (one compilation per head layout a model
uses). At DiT-XL's head dim, Dh = 72 and P = 36, where neither is a multiple of 16 and the rows were
accessed element by element, the second half of a row then moves as 8-byte vectors (36 elements = 4 x 9)
and the tables as 16-byte ones. A row's pairs are one power-of-two block, or two where they cover fewer lanes
(``_pair_blocks``: 36 = 32 + 4, where one block of 64 left 28 lanes masked). SASS on sm_90 (``python -m
tests.triton._compile_kernels --arch 90 --label bench --sass``, triton 3.6), both tensors' paths,
instructions a thread over q's elements a thread (q's elements over every thread launched: half of what a
thread moves): bf16 (2, 16, 4096, 72) 178.7 -> 74.3 (registers 62 -> 46); (1, 24, 4608, 128) 52.1 -> 48.4.

Pairs: non-interleaved (rotate_half) pairs (j, j + P), each half loaded as a contiguous run; interleaved
pairs (2j, 2j + 1), loaded as one contiguous (P, 2) tile and split in registers. P = cos.shape[-1]; the
channels from 2P on (partial rotary) are copied through by the out-of-place call and left alone in place.

    o1 = x1 cos - x2 sin,   o2 = x2 cos + x1 sin        (sin negated for the inverse rotation)

cos and sin (L, P) are read in their own dtype (unit last stride, any row stride) and stay in L1 / L2.
Arithmetic is float32. Memory traffic: q and k read once, written once; cos and sin gathered from cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genkernels.triton._common import cdiv, next_power_of_2, on_device, tl, triton, triton_unavailable

# Elements (ROWS * 2 * next_pow2(P)) a program rotates at most.
MAX_TILE = 4096
MAX_PROGRAMS = 2**31 - 1
# Rows (B * H * L) of q or k: row indices are 32-bit (a row's element offsets are 64-bit).
MAX_ROWS = 2**31 - 1
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def not_supported(q: Tensor, k: Tensor | None, cos: Tensor | None, sin: Tensor | None, interleaved: bool) -> str | None:
    """Why the triton backend cannot run this rope call, or None when it can.

    The op module has already checked shapes, dtypes and devices, and copies any tensor whose last stride
    is not 1; what remains is whether triton runs on q's device, q's dtype and the 1-D grid."""
    reason = triton_unavailable(q, "q")
    if reason is not None:
        return reason
    if q.dtype not in _FAST_DTYPES:
        return f"q has dtype {q.dtype}; supported: float32, float16, bfloat16"
    b, h, length, _ = q.shape
    q_rows = b * h * length
    k_rows = 0 if k is None else k.shape[0] * k.shape[1] * length
    pairs = q.shape[-1] // 2 if cos is None else cos.shape[-1]
    rows_block = _plan(pairs, q.shape[-1], max(q_rows, k_rows))[0]
    if max(q_rows, k_rows) > MAX_ROWS - rows_block:
        most = MAX_ROWS - rows_block
        return f"{max(q_rows, k_rows)} rows (B * H * L): the kernel indexes rows in 32 bits (at most {most})"
    progs = cdiv(q_rows, rows_block) + cdiv(k_rows, rows_block)
    if progs > MAX_PROGRAMS:
        return f"{progs} programs of {rows_block} rows: more than {MAX_PROGRAMS}"
    return None


def _pair_blocks(pairs: int) -> tuple[int, int]:
    """(HB, HB2): the pairs of a row as a power-of-two block and a smaller one after it where the two cover
    fewer lanes than next_pow2(pairs) (DiT-XL's P = 36: 32 + 4, where one block of 64 left 28 lanes masked),
    else (next_pow2(pairs), 0)."""
    full = next_power_of_2(pairs)
    low = 1 << (pairs.bit_length() - 1)
    if low == pairs:
        return pairs, 0
    tail = next_power_of_2(pairs - low)
    return (low, tail) if low + tail < full else (full, 0)


def _plan(pairs: int, dh: int, n_rows: int) -> tuple[int, int, int, int]:
    """(ROWS, HB, HB2, PB): rows per program (a power of two, at most next_pow2(n_rows)), the pair blocks
    (:func:`_pair_blocks`) and the pass-through block."""
    hb, hb2 = _pair_blocks(pairs)
    pb = next_power_of_2(dh - 2 * pairs) if dh > 2 * pairs else 1
    rows = 1 << (max(1, MAX_TILE // (2 * (hb + hb2) + pb)).bit_length() - 1)
    return min(rows, next_power_of_2(n_rows)), hb, hb2, pb


def rotate(
    q: Tensor,
    k: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
    inverse: bool,
    q_out: Tensor,
    k_out: Tensor | None,
) -> None:
    """Rotate q (and k) into q_out (and k_out) in one launch.

    q (B, H, L, Dh), k None or (B, Hk, L, Dh), q_out / k_out of the same shapes (q_out may be q, k_out k:
    in place); every one with a unit last stride, any other strides; float32, float16 or bfloat16 (the
    outputs in their input's dtype). cos, sin (L, P) with 2P <= Dh and a unit last stride, any float dtype.
    inverse: rotate by -angle (the backward). Channels 2P.. are copied to the outputs unless they are the
    inputs. Never synchronizes with the host."""
    b, hq, length, dh = q.shape
    pairs = cos.shape[-1]
    q_rows = b * hq * length
    k_rows = 0 if k is None else k.shape[0] * k.shape[1] * length
    rows_block, hb, hb2, pb = _plan(pairs, dh, max(q_rows, k_rows))
    q_progs = cdiv(q_rows, rows_block)
    progs = q_progs + cdiv(k_rows, rows_block)
    if progs == 0:
        return
    # In place (the outputs are the inputs, both or neither) the pass-through channels are already there. An
    # empty q (no heads) and its output share the null address, so k tells then.
    src, dst = (q, q_out) if q.numel() or k is None else (k, k_out)
    copy_rest = dh > 2 * pairs and dst.data_ptr() != src.data_ptr()
    kk = q if k is None else k
    ko = q_out if k_out is None else k_out
    # The row strides as multiples of the widest VEC in 8, 4, 2, 1 that divides them all (a size-1 dim's
    # stride is never used: 0), so that the compiler sees rows starting at multiples of VEC elements.
    strides = [s if n > 1 else 0 for t in (q, q_out, kk, ko) for n, s in zip(t.shape[:3], t.stride()[:3])]
    bits = 8
    for s in strides:
        bits |= s
    vec = bits & -bits  # the lowest set bit of them all (and of 8): the widest power of two up to 8 dividing each
    strides = [s // vec for s in strides]
    with on_device(q):
        _rope_kernel[(progs,)](
            q,
            q_out,
            kk,
            ko,
            cos,
            sin,
            q_rows,
            k_rows,
            q_progs,
            hq,
            kk.shape[1],
            length,
            *strides,
            -1.0 if inverse else 1.0,
            scos=cos.stride(0),
            ssin=sin.stride(0),
            P=pairs,
            DH=dh,
            INTERLEAVED=bool(interleaved),
            COPY_REST=copy_rest,
            ROWS=rows_block,
            HB=hb,
            HB2=hb2,
            PB=pb,
            VEC=vec,
            num_warps=4,
        )


if triton is not None:

    @triton.jit
    def _rope_pairs(
        x_ptr, o_ptr, cos_ptr, sin_ptr, xrow, orow, pos, row_ok, j, scos: tl.constexpr, ssin: tl.constexpr,
        P: tl.constexpr, sign, INTERLEAVED: tl.constexpr,
    ):  # fmt: skip
        """Rotate pairs j (a block of a row's P pairs; those >= P masked) of rows xrow into orow."""
        m2 = row_ok[:, None] & (j < P)[None, :]
        c = tl.load(cos_ptr + pos[:, None] * scos + j[None, :], mask=m2, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos[:, None] * ssin + j[None, :], mask=m2, other=0.0).to(tl.float32) * sign
        if INTERLEAVED:
            # One contiguous (len(j), 2) tile per row: channel 2j + t.
            t = tl.arange(0, 2)
            col = (2 * j)[None, :, None] + t[None, None, :]
            m3 = m2[:, :, None] & (t < 2)[None, None, :]
            x = tl.load(x_ptr + xrow[:, None, None] + col, mask=m3, other=0.0).to(tl.float32)
            x1, x2 = tl.split(x)
            o = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)
            tl.store(o_ptr + orow[:, None, None] + col, o.to(o_ptr.dtype.element_ty), mask=m3)
        else:
            off1 = j[None, :]
            x1 = tl.load(x_ptr + xrow[:, None] + off1, mask=m2, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + xrow[:, None] + (off1 + P), mask=m2, other=0.0).to(tl.float32)
            o1 = x1 * c - x2 * s
            o2 = x2 * c + x1 * s
            tl.store(o_ptr + orow[:, None] + off1, o1.to(o_ptr.dtype.element_ty), mask=m2)
            tl.store(o_ptr + orow[:, None] + (off1 + P), o2.to(o_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _rope_rows(
        x_ptr,
        o_ptr,
        cos_ptr,
        sin_ptr,
        block,
        n_rows,
        H,
        L,
        sxb,
        sxh,
        sxl,
        sob,
        soh,
        sol,
        scos: tl.constexpr,
        ssin: tl.constexpr,
        P: tl.constexpr,
        DH: tl.constexpr,
        sign,
        INTERLEAVED: tl.constexpr,
        COPY_REST: tl.constexpr,
        ROWS: tl.constexpr,
        HB: tl.constexpr,
        HB2: tl.constexpr,
        PB: tl.constexpr,
        VEC: tl.constexpr,
    ):
        """Rotate rows [block * ROWS, (block + 1) * ROWS) of one (B, H, L, Dh) tensor into its output."""
        # Row indices are 32-bit (the launcher's grid keeps B * H * L < 2^31): two 32-bit divisions a row,
        # each quotient's remainder by a multiply; the element offsets are 64-bit.
        rows = block * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        bh = rows // L
        pos = rows - bh * L
        batch = bh // H
        head = bh - batch * H
        xrow = (batch.to(tl.int64) * sxb + head.to(tl.int64) * sxh + pos.to(tl.int64) * sxl) * VEC
        orow = (batch.to(tl.int64) * sob + head.to(tl.int64) * soh + pos.to(tl.int64) * sol) * VEC
        _rope_pairs(x_ptr, o_ptr, cos_ptr, sin_ptr, xrow, orow, pos, row_ok, tl.arange(0, HB), scos, ssin, P,
                    sign, INTERLEAVED)  # fmt: skip
        if HB2 > 0:
            _rope_pairs(x_ptr, o_ptr, cos_ptr, sin_ptr, xrow, orow, pos, row_ok, HB + tl.arange(0, HB2), scos, ssin,
                        P, sign, INTERLEAVED)  # fmt: skip
        if COPY_REST:
            r = tl.arange(0, PB)
            mr = row_ok[:, None] & (r < DH - 2 * P)[None, :]
            rest = tl.load(x_ptr + xrow[:, None] + (2 * P + r)[None, :], mask=mr, other=0.0)
            tl.store(o_ptr + orow[:, None] + (2 * P + r)[None, :], rest.to(o_ptr.dtype.element_ty), mask=mr)

    @triton.jit
    def _rope_kernel(
        q_ptr,
        qo_ptr,
        k_ptr,
        ko_ptr,
        cos_ptr,
        sin_ptr,
        q_rows,
        k_rows,
        q_progs,
        HQ,
        HK,
        L,
        sqb,
        sqh,
        sql,
        sqob,
        sqoh,
        sqol,
        skb,
        skh,
        skl,
        skob,
        skoh,
        skol,
        sign,
        scos: tl.constexpr,
        ssin: tl.constexpr,
        P: tl.constexpr,
        DH: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        COPY_REST: tl.constexpr,
        ROWS: tl.constexpr,
        HB: tl.constexpr,
        HB2: tl.constexpr,
        PB: tl.constexpr,
        VEC: tl.constexpr,
    ):
        """ROWS rows of q (the first q_progs programs) or of k (the others); grid (q_progs + k_progs,).

        Memory traffic: each row read once and written once; cos and sin gathered from cache."""
        pid = tl.program_id(0)
        if pid < q_progs:
            _rope_rows(
                q_ptr, qo_ptr, cos_ptr, sin_ptr, pid, q_rows, HQ, L, sqb, sqh, sql, sqob, sqoh, sqol,
                scos, ssin, P, DH, sign, INTERLEAVED, COPY_REST, ROWS, HB, HB2, PB, VEC,
            )  # fmt: skip
        else:
            _rope_rows(
                k_ptr, ko_ptr, cos_ptr, sin_ptr, pid - q_progs, k_rows, HK, L, skb, skh, skl, skob, skoh, skol,
                scos, ssin, P, DH, sign, INTERLEAVED, COPY_REST, ROWS, HB, HB2, PB, VEC,
            )  # fmt: skip
