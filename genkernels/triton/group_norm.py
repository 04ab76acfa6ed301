"""GroupNorm (+ optional fused SiLU), forward and backward, in Triton.

Shapes and layouts. x is (N, C, *spatial), contiguous or channels last (see
:mod:`genkernels._layout`); S is the product of the spatial sizes, G the number of groups and
Cg = C / G. Every kernel sees x as N images of C channels by S positions and works on tiles of
[BLOCK_C channels, BLOCK_S positions] that cover ``gpp`` whole consecutive groups of one image
(their SPAN = gpp * Cg channels): the channel axis is the contiguous one in channels last, the
position axis in NCHW, and a CHANNELS_LAST constexpr picks the address formula, so one kernel
serves both layouts with wide contiguous loads. Per-group sums of a tile are its per-channel
(row) sums folded by a [BLOCK_G, BLOCK_C] group-membership mask, which works for any Cg (10, 40,
5 ...). Positions are the last tile axis so that the long sums are tree reductions (and pairwise
sums in the interpreter), not sequential ones: their rounding error stays near fp32's.

Forward, with mean and var (biased) over each (n, group), in float32 whatever x's dtype:

    z = (x - mean) * rstd * w[c] + b[c],   rstd = 1 / sqrt(var + eps),   y = silu(z) if silu else z

Backward, with xhat = (x - mean) * rstd, dz = dy * silu'(z) (or dy), dxhat = dz * w:

    dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))
    dw[c] = sum_{n,s} dz * xhat,   db[c] = sum_{n,s} dz

Two paths, chosen by group size (:data:`SINGLE_PASS_MAX_ELEMENTS`):

- single pass: one program holds whole groups in registers; x is read once and y written once
  (backward: x, dy read once, dx written once).
- split: a group larger than that is cut along S into ``splits`` ranges handled by separate
  programs: a reduction kernel writes per-range partials, then an elementwise kernel combines
  them and writes the output, reading x (and dy) a second time. Groups are processed in batches
  small enough (about half the L2) that this second read hits L2 instead of DRAM.

Backward weight and bias gradients are reduced from per-(n, split, channel) partials by a last
small kernel (no atomics: results are deterministic). Nothing synchronizes with the host and all
sizes come from shapes, so every launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from genkernels._layout import ImageLayout, image_layout
from genkernels.triton._common import (
    cdiv,
    l2_cache_bytes,
    next_power_of_2,
    on_device,
    sm_count,
    tl,
    triton,
    triton_unavailable,
)

# Largest padded group tile, next_pow2(S) * next_pow2(Cg) elements, that the forward keeps in
# registers (single pass); the backward holds x and dy, so it allows half. Tests lower it to
# exercise the split path on small inputs.
SINGLE_PASS_MAX_ELEMENTS = 16384
# Bytes of the group batches of the split path (None: half the device's L2). The other half is
# left to the output stream and to whatever else the L2 holds. Tests lower it to get batches.
L2_BATCH_BYTES: int | None = None
# A tile covers whole groups; beyond this many channels in one group the tile no longer fits.
MAX_GROUP_CHANNELS = 8192

# Channels per tile row when packing groups. NCHW: 64 (long position runs matter, not the
# span); channels last: 128, so that spans can be both multiples of a 16-byte vector and close to
# a power of two (Cg = 10 -> 120 of 128 lanes, 16-byte aligned).
_MAX_SPAN_NCHW = 64
_MAX_SPAN_CHANNELS_LAST = 128
_VECTOR_BYTES = 16
_PACK_ELEMENTS_NCHW = 4096  # single pass, NCHW: pack tiny groups up to this tile size
_SPLIT_TILE_BYTES = 16384  # split path tile: 4096 fp32 or 8192 16-bit elements per load
_PROGRAMS_PER_SM = 4  # split path: aim for this many programs per SM in each launch
_PARTIAL_TILE = 2048  # elements per chunk when a program reads the partials of its groups
_WEIGHT_BLOCK_C = 64  # dweight/dbias kernel: channels per program
_WEIGHT_BLOCK_R = 64  # dweight/dbias kernel: partial rows per loop step


# Where a split-path launch's batch of groups starts: values that change from batch to batch
# (and from shape to shape) but never decide alignment, so they are not specialized on, and
# every batch of a call shares one compiled kernel. (c_lo, which does decide alignment, is.)
_BATCH_ARGS = ("n0", "g_lo", "g_hi", "per_image")


@dataclass(frozen=True)
class _Plan:
    """How one call is cut into programs (see the module docstring for the two paths)."""

    channels_last: bool
    single_pass: bool
    gpp: int  # groups per program: consecutive groups of one image
    block_s: int
    block_c: int  # next_pow2(gpp * Cg)
    block_g: int  # next_pow2(gpp)
    block_t: int  # split partials read per loop step
    num_warps: int
    splits: int  # programs along S per block of groups (1 in the single pass)
    tiles_per_split: int  # tiles of block_s positions per program
    batches: tuple[tuple[int, int, int, int], ...]  # (n0, images, g_lo, g_hi) per launch pair


def _pick_groups_per_program(groups: int, cg: int, max_span: int, vector: int, fits: Callable[[int], bool]) -> int:
    """Groups per program: among spans (gpp * Cg channels) up to ``max_span`` that satisfy
    ``fits``, prefer spans that are whole ``vector``s (aligned vector loads in channels last),
    then the fewest padded lanes (span / next_pow2(span)), then the widest; 1 if none is larger."""

    def key(gpp: int) -> tuple[bool, float, int]:
        span = gpp * cg
        return span % vector == 0, span / next_power_of_2(span), span

    best = 1
    for gpp in range(2, groups + 1):
        if gpp * cg > max_span or not fits(gpp):
            break
        if key(gpp) > key(best):
            best = gpp
    return best


def _batches(
    lay: ImageLayout, groups: int, gpp: int, group_bytes: int, budget: int, itemsize: int
) -> tuple[tuple[int, int, int, int], ...]:
    """Cut the N * G groups into batches of about ``budget`` bytes, as (n0, images, g_lo, g_hi).

    A batch is either whole images or a range of groups of one image. In channels last a
    group range shares cache lines with its neighbours unless its channel span is a multiple of
    128 B, so ranges are rounded to such spans (or to whole images when none exists)."""
    unit = gpp
    if lay.channels_last:
        align = next((u for u in range(1, groups + 1) if u * (lay.c // groups) * itemsize % 128 == 0), groups)
        unit = min(groups, math.lcm(align, gpp))
    per_batch = max(unit, budget // group_bytes // unit * unit)
    if per_batch >= groups:
        images = max(1, budget // (groups * group_bytes))
        return tuple((n0, min(images, lay.n - n0), 0, groups) for n0 in range(0, lay.n, images))
    return tuple((n, 1, g0, min(groups, g0 + per_batch)) for n in range(lay.n) for g0 in range(0, groups, per_batch))


def _plan(lay: ImageLayout, groups: int, itemsize: int, device: torch.device, backward: bool) -> _Plan:
    """Choose the path, tile sizes, splits and batches from the sizes alone (no autotuning:
    nothing here needs the GPU, and the same shapes always give the same launches)."""
    cg, s = lay.c // groups, lay.s
    block_s_all = next_power_of_2(s)
    if lay.channels_last:
        max_span, vector = _MAX_SPAN_CHANNELS_LAST, _VECTOR_BYTES // itemsize
    else:
        max_span, vector = _MAX_SPAN_NCHW, 1
    single_max = SINGLE_PASS_MAX_ELEMENTS // (2 if backward else 1)
    if block_s_all * next_power_of_2(cg) <= single_max:
        # In NCHW a group is already contiguous: packing only amortizes per-program work of tiny
        # groups. In channels last it also widens each contiguous row segment of a load.
        pack = single_max if lay.channels_last else min(single_max, _PACK_ELEMENTS_NCHW)
        gpp = _pick_groups_per_program(
            groups, cg, max_span, vector, lambda g: block_s_all * next_power_of_2(g * cg) <= pack
        )
        block_c = next_power_of_2(gpp * cg)
        return _Plan(
            channels_last=lay.channels_last,
            single_pass=True,
            gpp=gpp,
            block_s=block_s_all,
            block_c=block_c,
            block_g=next_power_of_2(gpp),
            block_t=1,
            num_warps=_num_warps(block_s_all * block_c),
            splits=1,
            tiles_per_split=1,
            batches=((0, lay.n, 0, groups),),
        )

    # The split path reads x (and dy) twice: once to reduce, once to write the output. Launching
    # both passes per batch of groups whose bytes fit in about half the L2 makes the second read
    # an L2 hit, so x comes from DRAM once (e.g. (1, 128, 512, 512) bf16: 64 MB, 3 batches on an
    # H100's 50 MB L2).
    tensors = 2 if backward else 1
    group_bytes = cg * s * itemsize * tensors
    budget = L2_BATCH_BYTES if L2_BATCH_BYTES is not None else l2_cache_bytes(device) // 2
    # Blocks of at most a quarter of a batch keep batches close to their budget.
    gpp = _pick_groups_per_program(groups, cg, max_span, vector, lambda g: g * group_bytes <= budget // 4)
    span = gpp * cg
    block_c = next_power_of_2(span)
    block_s = max(1, min(block_s_all, _SPLIT_TILE_BYTES // itemsize // block_c))
    batches = _batches(lay, groups, gpp, group_bytes, budget, itemsize)
    n0, images, g_lo, g_hi = batches[0]
    blocks = images * cdiv(g_hi - g_lo, gpp)
    tiles = cdiv(s, block_s)
    # Each program of the elementwise pass first reads the partials of its groups (8 bytes per
    # group and split forward, per channel and split backward); bound the splits so that this is
    # at most 1/8 of the bytes the program then streams: T * partials <= (block bytes / T) / 8.
    partial_bytes = 8 * (span if backward else gpp)
    bound = math.isqrt(s * span * itemsize * tensors // (8 * partial_bytes))
    splits = max(1, min(tiles, cdiv(_PROGRAMS_PER_SM * sm_count(device), blocks), bound))
    tiles_per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, tiles_per_split)  # no split is left without a tile
    rows = block_c if backward else next_power_of_2(gpp)
    block_t = min(next_power_of_2(splits), max(1, _PARTIAL_TILE // rows))
    return _Plan(
        channels_last=lay.channels_last,
        single_pass=False,
        gpp=gpp,
        block_s=block_s,
        block_c=block_c,
        block_g=next_power_of_2(gpp),
        block_t=block_t,
        num_warps=_num_warps(block_s * block_c),
        splits=splits,
        tiles_per_split=tiles_per_split,
        batches=batches,
    )


def _num_warps(tile_elements: int) -> int:
    # At most 32 elements per thread (16 in the largest backward tiles): enough bytes in flight
    # per program and no register spills (checked with ptxas for sm_90 at the size limits).
    return min(16, max(1, tile_elements // 512))


def _tiling(plan: _Plan, cg: int) -> dict:
    """Compile-time tile parameters of the kernels that read x."""
    return dict(
        CHANNELS_LAST=plan.channels_last,
        SPAN=plan.gpp * cg,
        BLOCK_S=plan.block_s,
        BLOCK_C=plan.block_c,
        BLOCK_G=plan.block_g,
        num_warps=plan.num_warps,
    )


def _affine(weight: Tensor | None, bias: Tensor | None, silu: bool) -> dict:
    """Compile-time parameters of the kernels that compute z = xhat * w + b (and silu)."""
    return dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu)


def not_supported(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float, silu: bool
) -> str | None:
    """Why the triton backend cannot run this group_norm call, or None when it can.

    The op module has already validated shapes, dtypes and layouts; what remains is whether
    triton can run on x's device, and the group size limit of the tiles."""
    reason = triton_unavailable(x)
    if reason is not None:
        return reason
    cg = x.shape[1] // groups
    if cg > MAX_GROUP_CHANNELS:
        return f"groups of {cg} channels: the triton backend supports up to {MAX_GROUP_CHANNELS} channels per group"
    return None


def group_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm of x over ``groups`` groups, affine, then SiLU when ``silu``.

    x: (N, C, *spatial) fp32/fp16/bf16, contiguous or channels last, numel > 0. weight, bias:
    None or (C,) in x's dtype or float32 (copied once when not contiguous). Returns (y, mean,
    rstd): y like x (dtype, shape, layout); mean and rstd float32 (N, groups), statistics in float32.
    """
    lay = image_layout(x)
    plan = _plan(lay, groups, x.element_size(), x.device, backward=False)
    n, c, s = lay.n, lay.c, lay.s
    cg = c // groups
    y = torch.empty_like(x)
    mean = torch.empty((n, groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty((n, groups), device=x.device, dtype=torch.float32)
    # The kernels index weight and bias as contiguous (C,): a strided view (weight[::2]) is copied once.
    w = weight.contiguous() if weight is not None else x  # x: never read, HAS_WEIGHT is False
    b = bias.contiguous() if bias is not None else x
    tiling, affine = _tiling(plan, cg), _affine(weight, bias, silu)
    with on_device(x):
        if plan.single_pass:
            per_image = cdiv(groups, plan.gpp)
            block = (c, s, groups, cg, plan.gpp, per_image)
            _fwd_single_pass_kernel[(n * per_image,)](x, y, w, b, mean, rstd, *block, eps, **affine, **tiling)
            return y, mean, rstd
        splits, tps = plan.splits, plan.tiles_per_split
        part_mean = torch.empty((n * groups * splits,), device=x.device, dtype=torch.float32)
        part_m2 = torch.empty_like(part_mean)
        for n0, images, g_lo, g_hi in plan.batches:
            per_image = cdiv(g_hi - g_lo, plan.gpp)
            grid = (images * per_image, splits)
            block = (c, s, groups, cg, plan.gpp, n0, g_lo, g_hi, g_lo * cg, g_hi * cg, per_image, splits, tps)
            _fwd_partial_stats_kernel[grid](x, part_mean, part_m2, *block, **tiling)
            _fwd_apply_kernel[grid](
                x, y, w, b, part_mean, part_m2, mean, rstd, *block, eps, BLOCK_T=plan.block_t, **affine, **tiling
            )
    return y, mean, rstd


def group_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    groups: int,
    silu: bool,
    needs_dx: bool,
    needs_dweight: bool,
    needs_dbias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`group_norm_forward` with respect to x, weight and bias.

    dy: like x (same shape, dtype and layout). mean, rstd: the forward's float32 (N, groups).
    Returns (dx, dweight, dbias), each None unless its ``needs_*`` flag is set: dx like x,
    dweight / dbias (C,) in weight's / bias's dtype (x's when that is None), summed in float32.
    """
    lay = image_layout(x)
    plan = _plan(lay, groups, x.element_size(), x.device, backward=True)
    n, c, s = lay.n, lay.c, lay.s
    cg = c // groups
    needs_sums = needs_dweight or needs_dbias
    dx = torch.empty_like(x) if needs_dx else None
    dweight = dbias = None
    if needs_dweight:
        dweight = torch.empty(c, device=x.device, dtype=(weight if weight is not None else x).dtype)
    if needs_dbias:
        dbias = torch.empty(c, device=x.device, dtype=(bias if bias is not None else x).dtype)
    if not (needs_dx or needs_sums):
        return None, None, None
    # The kernels index weight and bias as contiguous (C,): a strided view (weight[::2]) is copied once.
    w = weight.contiguous() if weight is not None else x  # x: never read, HAS_WEIGHT is False
    b = bias.contiguous() if bias is not None else x
    splits, tps = plan.splits, plan.tiles_per_split
    # Per (n, split, c) sums of dz and dz * xhat, float32.
    sum_dz = torch.empty((n * splits * c,), device=x.device, dtype=torch.float32)
    sum_dz_xhat = torch.empty_like(sum_dz)
    dx_arg = dx if dx is not None else x  # never written: NEEDS_DX is False
    tiling, affine = _tiling(plan, cg), _affine(weight, bias, silu)
    with on_device(x):
        if plan.single_pass:
            per_image = cdiv(groups, plan.gpp)
            block = (c, s, groups, cg, plan.gpp, per_image)
            _bwd_single_pass_kernel[(n * per_image,)](
                dy,
                x,
                w,
                b,
                mean,
                rstd,
                dx_arg,
                sum_dz,
                sum_dz_xhat,
                *block,
                NEEDS_DX=needs_dx,
                NEEDS_SUMS=needs_sums,
                **affine,
                **tiling,
            )
        else:
            for n0, images, g_lo, g_hi in plan.batches:
                per_image = cdiv(g_hi - g_lo, plan.gpp)
                grid = (images * per_image, splits)
                block = (c, s, groups, cg, plan.gpp, n0, g_lo, g_hi, g_lo * cg, g_hi * cg, per_image, splits, tps)
                sums = (sum_dz, sum_dz_xhat)
                _bwd_partial_sums_kernel[grid](dy, x, w, b, mean, rstd, *sums, *block, **affine, **tiling)
                if needs_dx:
                    _bwd_dx_kernel[grid](
                        dy, x, w, b, mean, rstd, *sums, dx, *block, BLOCK_T=plan.block_t, **affine, **tiling
                    )
        if needs_sums:
            grid = (cdiv(c, _WEIGHT_BLOCK_C),)
            outputs = (dweight if dweight is not None else sum_dz, dbias if dbias is not None else sum_dz)
            _bwd_weight_bias_kernel[grid](
                sum_dz,
                sum_dz_xhat,
                *outputs,
                n * splits,
                c,
                NEEDS_DWEIGHT=needs_dweight,
                NEEDS_DBIAS=needs_dbias,
                BLOCK_R=_WEIGHT_BLOCK_R,
                BLOCK_C=_WEIGHT_BLOCK_C,
                num_warps=_num_warps(_WEIGHT_BLOCK_R * _WEIGHT_BLOCK_C),
            )
    return dx, dweight, dbias


if triton is not None:  # the kernels exist only where triton imports; not_supported says why not

    @triton.jit
    def _block(
        pid_b,
        n0,
        g_lo,
        g_hi,
        c_lo,
        c_hi,
        per_image,
        cg,
        gpp,
        SPAN: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """The image and groups of program ``pid_b`` of a batch of groups [g_lo, g_hi) (channels
        [c_lo, c_hi)) of images n0...: image n, channels c [BLOCK_C] (SPAN of them valid,
        col_mask), groups g [BLOCK_G] (group_mask), and the membership mask [BLOCK_G, BLOCK_C]
        of channel column k in group row j."""
        n = (n0 + pid_b // per_image).to(tl.int64)
        block = pid_b % per_image
        k = tl.arange(0, BLOCK_C)
        # c_lo and SPAN (not g_lo * cg, gpp * cg) tell the compiler how channel runs are aligned,
        # so that channels-last loads are vectorized.
        c = c_lo + block * SPAN + k
        col_mask = (k < SPAN) & (c < c_hi)
        j = tl.arange(0, BLOCK_G)
        g = g_lo + block * gpp + j
        group_mask = (j < gpp) & (g < g_hi)
        member = (j[:, None] == (k // cg)[None, :]) & col_mask[None, :]
        return n, c, col_mask, g, group_mask, member

    @triton.jit
    def _offsets(n, c, s, C, S, CHANNELS_LAST: tl.constexpr):
        """Element offsets [BLOCK_C, BLOCK_S] of image n, positions s, channels c; int64."""
        if CHANNELS_LAST:
            return n * S * C + s.to(tl.int64)[None, :] * C + c[:, None]
        else:
            return n * S * C + c.to(tl.int64)[:, None] * S + s[None, :]

    @triton.jit
    def _group_count(S, cg):
        """Elements of a group, Cg * S, as float32: converted before multiplying, since the int32 product of two
        int32 arguments wraps for groups of 2^31 elements or more."""
        return S * 1.0 * cg

    @triton.jit
    def _group_sum(v, member):
        """Per-group sums [BLOCK_G] of per-channel values v [BLOCK_C]."""
        return tl.sum(tl.where(member, v[None, :], 0.0), axis=1)

    @triton.jit
    def _to_channels(v, member):
        """Per-group values v [BLOCK_G] broadcast to their channels [BLOCK_C] (0 off-group)."""
        return tl.sum(tl.where(member, v[:, None], 0.0), axis=0)

    @triton.jit
    def _load_affine(w_ptr, b_ptr, c, col_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
        """weight and bias of channels c as float32 (1 and 0 where absent)."""
        if HAS_WEIGHT:
            w = tl.load(w_ptr + c, mask=col_mask, other=0.0).to(tl.float32)
        else:
            w = tl.where(col_mask, 1.0, 0.0)
        if HAS_BIAS:
            b = tl.load(b_ptr + c, mask=col_mask, other=0.0).to(tl.float32)
        else:
            b = tl.where(col_mask, 0.0, 0.0)
        return w, b

    @triton.jit
    def _group_shift(x_ptr, n, g, group_mask, cg, C, S, CHANNELS_LAST: tl.constexpr):
        """x at the first channel and position of each group [BLOCK_G], a value every program of
        the group can read. The split path keeps its partial means relative to it, so that data
        far from 0 (fp16 near 1e4) keeps its low bits in the partials and in the
        n_t * (mean_t - mean)^2 terms of Chan's formula."""
        if CHANNELS_LAST:
            offs = n * S * C + g * cg
        else:
            offs = n * S * C + (g * cg).to(tl.int64) * S
        return tl.load(x_ptr + offs, mask=group_mask, other=0.0).to(tl.float32)

    @triton.jit
    def _tile_moments(x, mask, shift_c, member, count):
        """Per-group mean - shift and M2 = sum (x - mean)^2 [BLOCK_G] of the masked tile x
        [BLOCK_C, BLOCK_S] with ``count`` elements per group (> 0), and x - mean, from registers.

        The mean is corrected by a second pass (mean += mean_g(x - mean)), which removes the
        rounding error of the first sum; M2 is then summed around the corrected mean."""
        d = tl.where(mask, x - shift_c[:, None], 0.0)
        rough = _group_sum(tl.sum(d, axis=1), member) / count
        d = tl.where(mask, d - _to_channels(rough, member)[:, None], 0.0)
        correction = _group_sum(tl.sum(d, axis=1), member) / count
        d = tl.where(mask, d - _to_channels(correction, member)[:, None], 0.0)
        m2 = _group_sum(tl.sum(d * d, axis=1), member)
        return rough + correction, m2, d

    @triton.jit
    def _affine_act(centered, rstd_c, w, b, SILU: tl.constexpr):
        """silu?((x - mean) * rstd * w + b) from centered = x - mean [BLOCK_C, BLOCK_S]."""
        z = centered * (rstd_c * w)[:, None] + b[:, None]
        if SILU:
            z = z * tl.sigmoid(z)
        return z

    @triton.jit
    def _xhat_dz(x, dy, mask, mean_c, rstd_c, w, b, SILU: tl.constexpr):
        """xhat and dz = dy * silu'(z) (or dy) of a tile, z = xhat * w + b recomputed; 0 off mask."""
        xhat = tl.where(mask, (x - mean_c[:, None]) * rstd_c[:, None], 0.0)
        if SILU:
            z = xhat * w[:, None] + b[:, None]
            sig = tl.sigmoid(z)
            dz = dy * sig * (1.0 + z * (1.0 - sig))
        else:
            dz = dy
        return xhat, dz

    @triton.jit
    def _group_means_dxhat(sum_dz, sum_dz_xhat, w, member, count):
        """mean_g(dxhat) and mean_g(dxhat * xhat) of each channel's group [BLOCK_C], dxhat = dz * w,
        from the per-channel sums of dz and dz * xhat over the whole group; ``count`` = Cg * S."""
        mean_dxhat = _to_channels(_group_sum(w * sum_dz, member) / count, member)
        mean_dxhat_xhat = _to_channels(_group_sum(w * sum_dz_xhat, member) / count, member)
        return mean_dxhat, mean_dxhat_xhat

    @triton.jit
    def _dx(xhat, dz, mean_dxhat, mean_dxhat_xhat, rstd_c, w):
        """dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)) of a tile."""
        return rstd_c[:, None] * (dz * w[:, None] - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None])

    @triton.jit
    def _fwd_single_pass_kernel(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        mean_ptr,
        rstd_ptr,
        C,
        S,
        G,
        cg,
        gpp,
        per_image,
        eps,
        CHANNELS_LAST: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        SPAN: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """Forward of whole groups held in registers; grid (N * per_image,).

        Memory traffic: x read once, y written once, 8 bytes of mean/rstd per group."""
        n, c, col_mask, g, group_mask, member = _block(
            tl.program_id(0), 0, 0, G, 0, C, per_image, cg, gpp, SPAN, BLOCK_C, BLOCK_G
        )
        s = tl.arange(0, BLOCK_S)
        mask = col_mask[:, None] & (s < S)[None, :]
        offs = _offsets(n, c, s, C, S, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        count = _group_count(S, cg)
        mean, m2, centered = _tile_moments(x, mask, tl.zeros([BLOCK_C], dtype=tl.float32), member, count)
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        tl.store(mean_ptr + n * G + g, mean, mask=group_mask)
        tl.store(rstd_ptr + n * G + g, rstd, mask=group_mask)
        w, b = _load_affine(w_ptr, b_ptr, c, col_mask, HAS_WEIGHT, HAS_BIAS)
        y = _affine_act(centered, _to_channels(rstd, member), w, b, SILU)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _fwd_partial_stats_kernel(
        x_ptr,
        part_mean_ptr,
        part_m2_ptr,
        C,
        S,
        G,
        cg,
        gpp,
        n0,
        g_lo,
        g_hi,
        c_lo,
        c_hi,
        per_image,
        T,
        TPP,
        CHANNELS_LAST: tl.constexpr,
        SPAN: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """Split path, pass 1: mean - shift and M2 of each group over positions split t (TPP
        tiles of BLOCK_S) into part_*[(n * G + g) * T + t]; grid (images * per_image, T).

        Tiles are combined with Chan's parallel formula, so no sum of squares ever cancels.
        Memory traffic: x read once; 8 bytes written per group and split."""
        pid_b, t = tl.program_id(0), tl.program_id(1)
        n, c, col_mask, g, group_mask, member = _block(
            pid_b, n0, g_lo, g_hi, c_lo, c_hi, per_image, cg, gpp, SPAN, BLOCK_C, BLOCK_G
        )
        shift_c = _to_channels(_group_shift(x_ptr, n, g, group_mask, cg, C, S, CHANNELS_LAST), member)
        acc_n = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc_mean = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc_m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
        for i in range(TPP):
            s0 = (t * TPP + i) * BLOCK_S
            s = s0 + tl.arange(0, BLOCK_S)
            mask = col_mask[:, None] & (s < S)[None, :]
            x = tl.load(x_ptr + _offsets(n, c, s, C, S, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
            # The last split may run past S: an empty tile has count 0 and changes nothing.
            count = (tl.maximum(tl.minimum(S - s0, BLOCK_S), 0) * cg).to(tl.float32)
            tile_mean, tile_m2, _ = _tile_moments(x, mask, shift_c, member, tl.maximum(count, 1.0))
            total = acc_n + count
            delta = tile_mean - acc_mean
            frac = count / tl.maximum(total, 1.0)
            acc_mean += delta * frac
            acc_m2 += tile_m2 + delta * delta * acc_n * frac
            acc_n = total
        part = (n * G + g) * T + t
        tl.store(part_mean_ptr + part, acc_mean, mask=group_mask)
        tl.store(part_m2_ptr + part, acc_m2, mask=group_mask)

    @triton.jit
    def _combine_partials(
        part_mean_ptr,
        part_m2_ptr,
        part_row,
        group_mask,
        S,
        cg,
        T,
        rows_per_split,
        BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """Group mean - shift and M2 [BLOCK_G] from the T partials at part_row [BLOCK_G] + t,
        by the k-way form of Chan's formula: mean = sum n_t mean_t / n, M2 = sum M2_t +
        n_t (mean_t - mean)^2 (all means relative to the group's shift)."""
        acc = tl.zeros([BLOCK_G], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            m = group_mask[:, None] & (t < T)[None, :]
            count = tl.minimum(S - t * rows_per_split, rows_per_split).to(tl.float32) * cg
            pm = tl.load(part_mean_ptr + part_row[:, None] + t[None, :], mask=m, other=0.0)
            acc += tl.sum(tl.where(m, pm * count[None, :], 0.0), axis=1)
        mean = acc / _group_count(S, cg)
        m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            m = group_mask[:, None] & (t < T)[None, :]
            count = tl.minimum(S - t * rows_per_split, rows_per_split).to(tl.float32) * cg
            pm = tl.load(part_mean_ptr + part_row[:, None] + t[None, :], mask=m, other=0.0)
            pm2 = tl.load(part_m2_ptr + part_row[:, None] + t[None, :], mask=m, other=0.0)
            delta = pm - mean[:, None]
            m2 += tl.sum(tl.where(m, pm2 + count[None, :] * delta * delta, 0.0), axis=1)
        return mean, m2

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _fwd_apply_kernel(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        part_mean_ptr,
        part_m2_ptr,
        mean_ptr,
        rstd_ptr,
        C,
        S,
        G,
        cg,
        gpp,
        n0,
        g_lo,
        g_hi,
        c_lo,
        c_hi,
        per_image,
        T,
        TPP,
        eps,
        CHANNELS_LAST: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        SPAN: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """Split path, pass 2: combine the partials of the program's groups, then normalize the
        same positions pass 1 read; grid (images * per_image, T). Split 0 stores mean and rstd.

        Memory traffic: x read once (from L2 when the batch fits it), y written once, the
        partials of the program's groups read once (bounded to 1/8 of x by the plan)."""
        pid_b, t = tl.program_id(0), tl.program_id(1)
        n, c, col_mask, g, group_mask, member = _block(
            pid_b, n0, g_lo, g_hi, c_lo, c_hi, per_image, cg, gpp, SPAN, BLOCK_C, BLOCK_G
        )
        shift_g = _group_shift(x_ptr, n, g, group_mask, cg, C, S, CHANNELS_LAST)
        shift_c = _to_channels(shift_g, member)
        rel_mean, m2 = _combine_partials(
            part_mean_ptr, part_m2_ptr, (n * G + g) * T, group_mask, S, cg, T, TPP * BLOCK_S, BLOCK_G, BLOCK_T
        )
        rstd = 1.0 / tl.sqrt(m2 / _group_count(S, cg) + eps)
        if t == 0:
            tl.store(mean_ptr + n * G + g, shift_g + rel_mean, mask=group_mask)
            tl.store(rstd_ptr + n * G + g, rstd, mask=group_mask)
        rel_mean_c = _to_channels(rel_mean, member)
        rstd_c = _to_channels(rstd, member)
        w, b = _load_affine(w_ptr, b_ptr, c, col_mask, HAS_WEIGHT, HAS_BIAS)
        for i in range(TPP):
            s = (t * TPP + i) * BLOCK_S + tl.arange(0, BLOCK_S)
            mask = col_mask[:, None] & (s < S)[None, :]
            offs = _offsets(n, c, s, C, S, CHANNELS_LAST)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = _affine_act((x - shift_c[:, None]) - rel_mean_c[:, None], rstd_c, w, b, SILU)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_single_pass_kernel(
        dy_ptr,
        x_ptr,
        w_ptr,
        b_ptr,
        mean_ptr,
        rstd_ptr,
        dx_ptr,
        sum_dz_ptr,
        sum_dz_xhat_ptr,
        C,
        S,
        G,
        cg,
        gpp,
        per_image,
        NEEDS_DX: tl.constexpr,
        NEEDS_SUMS: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        SPAN: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """Backward of whole groups held in registers; grid (N * per_image,). Writes dx and, for
        dweight / dbias, the per-(n, c) sums of dz and dz * xhat.

        Memory traffic: x and dy read once, dx written once, 8 bytes per (n, c) written."""
        n, c, col_mask, g, group_mask, member = _block(
            tl.program_id(0), 0, 0, G, 0, C, per_image, cg, gpp, SPAN, BLOCK_C, BLOCK_G
        )
        s = tl.arange(0, BLOCK_S)
        mask = col_mask[:, None] & (s < S)[None, :]
        offs = _offsets(n, c, s, C, S, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean_c = _to_channels(tl.load(mean_ptr + n * G + g, mask=group_mask, other=0.0), member)
        rstd_c = _to_channels(tl.load(rstd_ptr + n * G + g, mask=group_mask, other=0.0), member)
        w, b = _load_affine(w_ptr, b_ptr, c, col_mask, HAS_WEIGHT, HAS_BIAS)
        xhat, dz = _xhat_dz(x, dy, mask, mean_c, rstd_c, w, b, SILU)
        sum_dz = tl.sum(dz, axis=1)
        sum_dz_xhat = tl.sum(dz * xhat, axis=1)
        if NEEDS_SUMS:
            tl.store(sum_dz_ptr + n * C + c, sum_dz, mask=col_mask)
            tl.store(sum_dz_xhat_ptr + n * C + c, sum_dz_xhat, mask=col_mask)
        if NEEDS_DX:
            mean_dxhat, mean_dxhat_xhat = _group_means_dxhat(sum_dz, sum_dz_xhat, w, member, _group_count(S, cg))
            dx = _dx(xhat, dz, mean_dxhat, mean_dxhat_xhat, rstd_c, w)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _bwd_partial_sums_kernel(
        dy_ptr,
        x_ptr,
        w_ptr,
        b_ptr,
        mean_ptr,
        rstd_ptr,
        sum_dz_ptr,
        sum_dz_xhat_ptr,
        C,
        S,
        G,
        cg,
        gpp,
        n0,
        g_lo,
        g_hi,
        c_lo,
        c_hi,
        per_image,
        T,
        TPP,
        CHANNELS_LAST: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        SPAN: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """Split path, pass 1: per-channel sums of dz and dz * xhat over positions split t into
        sum_*[(n * T + t) * C + c]; grid (images * per_image, T).

        Memory traffic: x and dy read once; 8 bytes written per channel and split."""
        pid_b, t = tl.program_id(0), tl.program_id(1)
        n, c, col_mask, g, group_mask, member = _block(
            pid_b, n0, g_lo, g_hi, c_lo, c_hi, per_image, cg, gpp, SPAN, BLOCK_C, BLOCK_G
        )
        mean_c = _to_channels(tl.load(mean_ptr + n * G + g, mask=group_mask, other=0.0), member)
        rstd_c = _to_channels(tl.load(rstd_ptr + n * G + g, mask=group_mask, other=0.0), member)
        w, b = _load_affine(w_ptr, b_ptr, c, col_mask, HAS_WEIGHT, HAS_BIAS)
        sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_dz_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(TPP):
            s = (t * TPP + i) * BLOCK_S + tl.arange(0, BLOCK_S)
            mask = col_mask[:, None] & (s < S)[None, :]
            offs = _offsets(n, c, s, C, S, CHANNELS_LAST)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat, dz = _xhat_dz(x, dy, mask, mean_c, rstd_c, w, b, SILU)
            sum_dz += tl.sum(dz, axis=1)
            sum_dz_xhat += tl.sum(dz * xhat, axis=1)
        part = (n * T + t) * C + c
        tl.store(sum_dz_ptr + part, sum_dz, mask=col_mask)
        tl.store(sum_dz_xhat_ptr + part, sum_dz_xhat, mask=col_mask)

    @triton.jit(do_not_specialize=_BATCH_ARGS)
    def _bwd_dx_kernel(
        dy_ptr,
        x_ptr,
        w_ptr,
        b_ptr,
        mean_ptr,
        rstd_ptr,
        sum_dz_ptr,
        sum_dz_xhat_ptr,
        dx_ptr,
        C,
        S,
        G,
        cg,
        gpp,
        n0,
        g_lo,
        g_hi,
        c_lo,
        c_hi,
        per_image,
        T,
        TPP,
        CHANNELS_LAST: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        SPAN: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """Split path, pass 2: total the T partial sums of the program's channels, then dx over
        the positions pass 1 read; grid (images * per_image, T).

        Memory traffic: x and dy read once (from L2 when the batch fits it), dx written once,
        the partials of the program's channels read once (bounded to 1/8 of x, dy by the plan)."""
        pid_b, t = tl.program_id(0), tl.program_id(1)
        n, c, col_mask, g, group_mask, member = _block(
            pid_b, n0, g_lo, g_hi, c_lo, c_hi, per_image, cg, gpp, SPAN, BLOCK_C, BLOCK_G
        )
        sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_dz_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            m = col_mask[:, None] & (tt < T)[None, :]
            part = (n * T + tt)[None, :] * C + c[:, None]
            sum_dz += tl.sum(tl.load(sum_dz_ptr + part, mask=m, other=0.0), axis=1)
            sum_dz_xhat += tl.sum(tl.load(sum_dz_xhat_ptr + part, mask=m, other=0.0), axis=1)
        mean_c = _to_channels(tl.load(mean_ptr + n * G + g, mask=group_mask, other=0.0), member)
        rstd_c = _to_channels(tl.load(rstd_ptr + n * G + g, mask=group_mask, other=0.0), member)
        w, b = _load_affine(w_ptr, b_ptr, c, col_mask, HAS_WEIGHT, HAS_BIAS)
        mean_dxhat, mean_dxhat_xhat = _group_means_dxhat(sum_dz, sum_dz_xhat, w, member, _group_count(S, cg))
        for i in range(TPP):
            s = (t * TPP + i) * BLOCK_S + tl.arange(0, BLOCK_S)
            mask = col_mask[:, None] & (s < S)[None, :]
            offs = _offsets(n, c, s, C, S, CHANNELS_LAST)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat, dz = _xhat_dz(x, dy, mask, mean_c, rstd_c, w, b, SILU)
            dx = _dx(xhat, dz, mean_dxhat, mean_dxhat_xhat, rstd_c, w)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_weight_bias_kernel(
        sum_dz_ptr,
        sum_dz_xhat_ptr,
        dweight_ptr,
        dbias_ptr,
        R,
        C,
        NEEDS_DWEIGHT: tl.constexpr,
        NEEDS_DBIAS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """dweight[c] = sum_r sum_dz_xhat[r, c], dbias[c] = sum_r sum_dz[r, c] over the R = N * T
        rows of partials, in float32, stored in the outputs' dtype; grid (cdiv(C, BLOCK_C),).

        Memory traffic: the partials read once, C values of each output written once."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = c < C
        acc_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_dz_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = col_mask[:, None] & (r < R)[None, :]
            offs = r.to(tl.int64)[None, :] * C + c[:, None]
            if NEEDS_DBIAS:
                acc_dz += tl.sum(tl.load(sum_dz_ptr + offs, mask=m, other=0.0), axis=1)
            if NEEDS_DWEIGHT:
                acc_dz_xhat += tl.sum(tl.load(sum_dz_xhat_ptr + offs, mask=m, other=0.0), axis=1)
        if NEEDS_DWEIGHT:
            tl.store(dweight_ptr + c, acc_dz_xhat.to(dweight_ptr.dtype.element_ty), mask=col_mask)
        if NEEDS_DBIAS:
            tl.store(dbias_ptr + c, acc_dz.to(dbias_ptr.dtype.element_ty), mask=col_mask)
