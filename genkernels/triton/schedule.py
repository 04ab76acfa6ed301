"""The fused sampler step (see genkernels.ops.schedule for the formula and the interface) in Triton.

Every tensor is seen as a flat (B, N) array in memory order: element (b, j) at b * N + j, for
contiguous and channels_last tensors alike (the batch dimension is outermost in both, and the op
module gives every input sample's layout). A guided model output is (2B, N): the uncond half at
b * N + j, the cond half at (B + b) * N + j. One program handles BLOCK consecutive elements of one
sample, so each per-sample coefficient is one scalar load per program.

Coefficients are Python floats (scalar kernel arguments) or float32 (B,) tensors; a constexpr
flag per coefficient says which. Terms of absent inputs (noise, x0_prev) are compiled out.

Noise drawn in the kernel is the Philox stream of csrc/include/genkernels/philox.cuh, drawn by the
helpers of genkernels.triton._philox (which describes it): the triton and cuda backends draw the same
numbers for the same (seed, offset), element e (its flat index) being lane e % 4 of group e // 4.
When N is a multiple of 4 every block starts a group, and a block runs one Philox per group of four
elements; otherwise each element runs its group's Philox and keeps its own lane. Either way a value
depends only on (seed, offset, e).

Guidance rescale needs std(out_c) and std(out) per sample before any output: a first kernel
reduces T chunks of each sample into partial sums and sums of squares (float32, of the values
minus the sample's first value, which keeps the variance free of cancellation for outputs with
a large mean); the step kernel then merges the T partials of its sample (a fixed order: the
result does not depend on timing) into the rescale factor phi * std_c / std_out + 1 - phi.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from genkernels.triton._common import cdiv, next_power_of_2, on_device, sm_count, tl, triton, triton_unavailable

# Elements per program of the step kernel (smaller samples get one program of next_pow2(N)).
MAX_BLOCK = 2048
# Statistics pass: elements per loop step, and the most chunks (partials) per sample.
STATS_BLOCK = 2048
MAX_STATS_CHUNKS = 256
_STATS_PROGRAMS_PER_SM = 4


def not_supported(sample, model_output, noise, x0_prev, coeffs, guidance_scale, guidance_rescale, clip_sample):
    """Why the triton backend cannot run this schedule_step call, or None when it can.

    The op module has already checked dtypes and shapes; what remains is whether triton runs on
    sample's device, and the 32-bit element index within a sample."""
    reason = triton_unavailable(sample, "sample")
    if reason is not None:
        return reason
    per_sample = sample.numel() // max(sample.shape[0], 1)
    if per_sample >= 2**31:
        return f"{per_sample} elements per sample: the triton kernel indexes a sample with 32 bits"
    return None


def _num_warps(block: int) -> int:
    return min(8, max(1, block // 256))


def _stats(model_output: Tensor, b: int, n: int, guidance_scale: float) -> tuple[Tensor, int]:
    """Per-(sample, chunk) shifted sums of out_c and out: a float32 (B, T, 4) tensor, and T."""
    tiles = cdiv(n, STATS_BLOCK)
    chunks = max(1, min(tiles, MAX_STATS_CHUNKS, cdiv(_STATS_PROGRAMS_PER_SM * sm_count(model_output.device), b)))
    tiles_per_chunk = cdiv(tiles, chunks)
    chunks = cdiv(tiles, tiles_per_chunk)
    partials = torch.empty((b, chunks, 4), device=model_output.device, dtype=torch.float32)
    block = min(STATS_BLOCK, next_power_of_2(n))
    _guidance_stats_kernel[(b * chunks,)](
        model_output, partials, guidance_scale, b, n, chunks, tiles_per_chunk, BLOCK=block, num_warps=_num_warps(block)
    )
    return partials, chunks


def schedule_step(
    sample: Tensor,
    model_output: Tensor | None,
    noise: Tensor | None,
    x0_prev: Tensor | None,
    coeffs,
    guidance_scale: float | None,
    guidance_rescale: float,
    clip_sample: float | None,
    seed: int | Tensor | None,
    offset: int,
    return_x0: bool,
) -> tuple[Tensor, Tensor | None]:
    """prev (and x0) of one fused step; arguments and results as in genkernels.ops.schedule's interface.

    sample and every other tensor share one dense layout (contiguous or channels_last), numel > 0.
    Reads sample, model_output (both halves when guided; twice with guidance rescale), noise and
    x0_prev once each; writes prev, and x0 when return_x0, once.
    """
    b = sample.shape[0]
    n = sample.numel() // b
    prev = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if return_x0 else prev  # never written unless WANT_X0
    guided = guidance_scale is not None
    rescale = guided and guidance_rescale > 0
    philox = noise is None and seed is not None
    seed_from_tensor = isinstance(seed, Tensor)
    names = [f.name for f in dataclasses.fields(coeffs)]  # px, po, ex, e0, cx, c0, ce, cn, cp: the kernel's order
    values = list(coeffs.values())
    flags = {f"{name.upper()}_T": isinstance(v, Tensor) for name, v in zip(names, values)}
    values = [v if isinstance(v, Tensor) else float(v) for v in values]
    block = min(MAX_BLOCK, next_power_of_2(n))
    tiles = cdiv(n, block)
    offset_lo, offset_hi = offset & 0xFFFFFFFF, offset >> 32
    with on_device(sample):
        partials, chunks = _stats(model_output, b, n, guidance_scale) if rescale else (prev, 1)
        _step_kernel[(b * tiles,)](
            sample,
            model_output if model_output is not None else sample,
            noise if noise is not None else sample,
            x0_prev if x0_prev is not None else sample,
            prev,
            x0,
            partials,
            *values,
            0.0 if guidance_scale is None else guidance_scale,
            guidance_rescale,
            0.0 if clip_sample is None else clip_sample,
            seed if seed_from_tensor else sample,
            seed if (philox and not seed_from_tensor) else 0,
            offset_lo,
            offset_hi,
            b,
            n,
            tiles,
            chunks,
            HAS_OUT=model_output is not None,
            GUIDED=guided,
            RESCALE=rescale,
            CLIP=clip_sample is not None,
            NOISE=2 if philox else int(noise is not None),
            SEED_FROM_TENSOR=philox and seed_from_tensor,
            GROUPED_NOISE=philox and n % 4 == 0,
            HAS_X0_PREV=x0_prev is not None,
            WANT_X0=return_x0,
            BLOCK=block,
            BLOCK_T=next_power_of_2(chunks),
            num_warps=_num_warps(block),
            **flags,
        )
    return prev, (x0 if return_x0 else None)


if triton is not None:
    from genkernels.triton._philox import _philox_normal, _philox_normal_groups

    @triton.jit
    def _coeff(c, b, IS_TENSOR: tl.constexpr):
        """A coefficient of sample b: one load from a (B,) tensor, or the scalar argument itself."""
        if IS_TENSOR:
            return tl.load(c + b)
        else:
            return c

    @triton.jit
    def _guidance_stats_kernel(mo_ptr, partial_ptr, g, B, N, T, TPP, BLOCK: tl.constexpr):
        """Partial sums over chunk t of sample b of (c - c[0]), its square, (o - o[0]) and its square,
        with c the cond half and o = u + g (c - u); grid (B * T,), partials (B, T, 4) float32.

        Memory traffic: both halves of the model output read once; 16 bytes written per program."""
        pid = tl.program_id(0)
        b = pid // T
        t = pid % T
        base_u = b.to(tl.int64) * N
        base_c = (B + b).to(tl.int64) * N
        u0 = tl.load(mo_ptr + base_u).to(tl.float32)
        c0 = tl.load(mo_ptr + base_c).to(tl.float32)
        o0 = u0 + g * (c0 - u0)
        sum_c = tl.zeros([BLOCK], dtype=tl.float32)
        sq_c = tl.zeros([BLOCK], dtype=tl.float32)
        sum_o = tl.zeros([BLOCK], dtype=tl.float32)
        sq_o = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(TPP):
            j = (t * TPP + i) * BLOCK + tl.arange(0, BLOCK)
            mask = j < N
            u = tl.load(mo_ptr + base_u + j, mask=mask, other=0.0).to(tl.float32)
            c = tl.load(mo_ptr + base_c + j, mask=mask, other=0.0).to(tl.float32)
            dc = tl.where(mask, c - c0, 0.0)
            do = tl.where(mask, (u + g * (c - u)) - o0, 0.0)
            sum_c += dc
            sq_c += dc * dc
            sum_o += do
            sq_o += do * do
        out = partial_ptr + pid * 4
        tl.store(out, tl.sum(sum_c, axis=0))
        tl.store(out + 1, tl.sum(sq_c, axis=0))
        tl.store(out + 2, tl.sum(sum_o, axis=0))
        tl.store(out + 3, tl.sum(sq_o, axis=0))

    @triton.jit
    def _rescale_factor(partial_ptr, b, N, T, phi, BLOCK_T: tl.constexpr):
        """phi * std(out_c) / std(out) + 1 - phi for sample b, from its T partials (the N - 1 cancels)."""
        t = tl.arange(0, BLOCK_T)
        mask = t < T
        row = partial_ptr + (b * T + t) * 4
        sum_c = tl.sum(tl.load(row, mask=mask, other=0.0), axis=0)
        sq_c = tl.sum(tl.load(row + 1, mask=mask, other=0.0), axis=0)
        sum_o = tl.sum(tl.load(row + 2, mask=mask, other=0.0), axis=0)
        sq_o = tl.sum(tl.load(row + 3, mask=mask, other=0.0), axis=0)
        m2_c = sq_c - sum_c * sum_c / N
        m2_o = sq_o - sum_o * sum_o / N
        return phi * tl.sqrt(m2_c / m2_o) + (1.0 - phi)

    @triton.jit(do_not_specialize=("seed", "offset_lo", "offset_hi"))
    def _step_kernel(
        x_ptr,
        mo_ptr,
        noise_ptr,
        x0_prev_ptr,
        prev_ptr,
        x0_ptr,
        partial_ptr,
        px,
        po,
        ex,
        e0,
        cx,
        c0,
        ce,
        cn,
        cp,
        g,
        phi,
        clip,
        seed_ptr,
        seed,
        offset_lo,
        offset_hi,
        B,
        N,
        tiles,
        T,
        PX_T: tl.constexpr,
        PO_T: tl.constexpr,
        EX_T: tl.constexpr,
        E0_T: tl.constexpr,
        CX_T: tl.constexpr,
        C0_T: tl.constexpr,
        CE_T: tl.constexpr,
        CN_T: tl.constexpr,
        CP_T: tl.constexpr,
        HAS_OUT: tl.constexpr,
        GUIDED: tl.constexpr,
        RESCALE: tl.constexpr,
        CLIP: tl.constexpr,
        NOISE: tl.constexpr,  # 0: none, 1: the noise tensor, 2: Philox in the kernel
        SEED_FROM_TENSOR: tl.constexpr,
        GROUPED_NOISE: tl.constexpr,  # N % 4 == 0: every block starts a Philox group (BLOCK >= 4)
        HAS_X0_PREV: tl.constexpr,
        WANT_X0: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """One fused step over BLOCK elements of one sample; grid (B * tiles,).

        Memory traffic: x, the model output (both halves), noise and x0_prev read once; prev (and
        x0) written once; with rescale, the sample's T partials (16 bytes each) read once."""
        pid = tl.program_id(0)
        b = pid // tiles
        j = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
        mask = j < N
        base = b.to(tl.int64) * N
        x = tl.load(x_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
        x0 = _coeff(px, b, PX_T) * x
        if HAS_OUT:
            out = tl.load(mo_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
            if GUIDED:
                # (b + B): a tensor even when B == 1 is specialized to a constant
                cond_base = (b + B).to(tl.int64) * N
                cond = tl.load(mo_ptr + cond_base + j, mask=mask, other=0.0).to(tl.float32)
                out = out + g * (cond - out)
                if RESCALE:
                    out = out * _rescale_factor(partial_ptr, b, N, T, phi, BLOCK_T)
            x0 = x0 + _coeff(po, b, PO_T) * out
        if CLIP:
            # NaN stays NaN, as in torch.clamp (the default min / max would return the bound)
            # (the enum inline: a local variable holding it does not compile)
            x0 = tl.minimum(
                tl.maximum(x0, -clip, propagate_nan=tl.PropagateNan.ALL), clip, propagate_nan=tl.PropagateNan.ALL
            )
        eps = _coeff(ex, b, EX_T) * x + _coeff(e0, b, E0_T) * x0
        prev = _coeff(cx, b, CX_T) * x + _coeff(c0, b, C0_T) * x0 + _coeff(ce, b, CE_T) * eps
        if NOISE == 1:
            prev += _coeff(cn, b, CN_T) * tl.load(noise_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
        elif NOISE == 2:
            if SEED_FROM_TENSOR:
                key = tl.load(seed_ptr)
            else:
                key = seed
            if GROUPED_NOISE:
                z = _philox_normal_groups(key, offset_lo, offset_hi, base + (pid % tiles) * BLOCK, BLOCK)
            else:
                z = _philox_normal(key, offset_lo, offset_hi, base + j)
            prev += _coeff(cn, b, CN_T) * z
        if HAS_X0_PREV:
            prev += _coeff(cp, b, CP_T) * tl.load(x0_prev_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
        tl.store(prev_ptr + base + j, prev.to(prev_ptr.dtype.element_ty), mask=mask)
        if WANT_X0:
            tl.store(x0_ptr + base + j, x0.to(x0_ptr.dtype.element_ty), mask=mask)
