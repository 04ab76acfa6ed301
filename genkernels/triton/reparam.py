"""The reparameterization trick with its KL term (see genkernels.ops.reparam for the formula and the
interface) in Triton: forward and fused backward.

Every tensor is a canonical (B, R, K) view with unit stride along K: N = R * K elements per sample,
element (b, r, k) of mean (logvar, dmean, dlogvar) at b * stride_b + r * stride_r + k of its own
strides, and at e = b * N + j, j = r * K + k, in z, noise and dz (new or contiguous tensors). One
program handles one tile of BLOCK consecutive elements j of one sample (grid (B * T,), T = ceil(N /
BLOCK) tiles per sample), so that the per-sample values (dkl[b], the KL partial) are one scalar per
program, large tensors give many programs (the benchmark's (64, 16, 128, 128) makes 8,192 of 2,048
elements) and small ones one program per sample. Two address paths, a constexpr FLAT: when R == 1 or
every strided tensor has stride_r == K (contiguous tensors, the halves of contiguous NCHW moments) a
sample is one run and j is its own offset (wide loads, no division); otherwise (the halves of
channels_last moments, rows of 2C with C used) r and k come from j by one division per element.
Offsets past the sample are 64-bit; j, within a sample, is 32-bit (N < 2^31 - MAX_BLOCK, checked in
:func:`not_supported`).

eps is the noise tensor, or drawn in the kernel from the (seed, offset) Philox stream by the helpers
of genkernels.triton._philox: element e of z takes normal e of the stream, exactly
genkernels.ops.schedule.philox_normal(seed, offset, B * N)[e]. When N is a multiple of 4 every tile
starts a Philox group and draws one Philox block per four elements; otherwise each element draws its
own. The backward draws with the same tiles and the same path as the forward, so its eps is
bit-identical. A seed tensor (one int64 element on the device) is read by the kernel: no host sync.

Forward, per element in float32: lv = clamp(logvar, -30, 20) (NaN kept, as torch.clamp's), std =
exp(lv / 2), z = mean + std * eps (deterministic: z = mean), and each program writes its tile's KL
partial 0.5 * sum(mean^2 + exp(lv) - 1 - lv) into a float32 (B, T) tensor; the KL is its sum over T,
a fixed order (no atomics).
Memory traffic: mean, logvar (and noise) read once, z written once, 4 bytes per tile of partials.

Backward, per element in float32, with in = (-30 <= logvar <= 20):
dmean = dz + dkl[b] * mean, dlogvar = in ? 0.5 * dz * eps * std + 0.5 * dkl[b] * (exp(lv) - 1) : 0.
Memory traffic: dz, mean, logvar (and noise) read once where a wanted gradient needs them, dmean and
dlogvar written once; nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genkernels.triton._common import cdiv, next_power_of_2, on_device, tl, triton, triton_unavailable

# Elements per program (smaller samples get one program of next_pow2(N)).
MAX_BLOCK = 2048


def not_supported(mean: Tensor, logvar: Tensor, noise: Tensor | None) -> str | None:
    """Why the triton backend cannot run this reparameterize call, or None when it can.

    The op module has already checked dtypes, shapes and devices of the canonical (B, R, K) views;
    what remains is whether triton runs on mean's device, and the 32-bit index within a sample."""
    reason = triton_unavailable(mean, "mean")
    if reason is not None:
        return reason
    per_sample = mean.shape[1] * mean.shape[2]
    if per_sample > 2**31 - MAX_BLOCK:
        return f"{per_sample} elements per sample: the triton kernels index a sample with 32 bits"
    return None


def _num_warps(block: int) -> int:
    return min(8, max(1, block // 256))


def _is_flat(k: int, *views: Tensor | None) -> bool:
    """Whether every sample of every view is one run of R * K elements (the FLAT address path)."""
    return all(v is None or v.shape[1] == 1 or v.stride(1) == k for v in views)


def _noise_args(mean: Tensor, noise: Tensor | None, seed: int | Tensor | None, offset: int) -> dict:
    """The eps source as kernel arguments: NOISE 1 reads the noise tensor, 2 draws Philox (seed given)."""
    philox = noise is None and seed is not None
    from_tensor = philox and isinstance(seed, Tensor)
    return {
        "noise_ptr": noise if noise is not None else mean,
        "seed_ptr": seed if from_tensor else mean,
        "seed": seed if (philox and not from_tensor) else 0,
        "offset_lo": (offset & 0xFFFFFFFF) if philox else 0,
        "offset_hi": (offset >> 32) if philox else 0,
        "NOISE": 2 if philox else int(noise is not None),
        "SEED_FROM_TENSOR": from_tensor,
    }


def forward(
    mean: Tensor,
    logvar: Tensor,
    noise: Tensor | None,
    seed: int | Tensor | None,
    offset: int,
    deterministic: bool,
    want_kl: bool,
) -> tuple[Tensor, Tensor | None]:
    """z = mean + exp(clamp(logvar, -30, 20) / 2) * eps and kl[b] = 0.5 * sum (mean^2 + exp(lv) - 1 - lv).

    mean, logvar: canonical (B, R, K) views (unit stride along K, any batch and row strides), float32,
    float16 or bfloat16, B * R * K > 0. noise: None or (B, R, K) contiguous in mean's dtype; else eps
    is element (b * R + r) * K + k of the Philox stream of (seed, offset); seed: a Python int or a
    one-element int64 tensor on mean's device (read by the kernel). deterministic: z = mean (noise and
    seed unused). Returns z, a new contiguous (B, R, K) tensor in mean's dtype, and kl, float32 (B,)
    when want_kl (else None). One pass: reads mean, logvar (and noise) once and writes z once; the
    per-tile partials of the KL are summed by torch in a fixed order. Never synchronizes with the host.
    """
    b, r, k = mean.shape
    n = r * k
    block = min(MAX_BLOCK, next_power_of_2(n))
    tiles = cdiv(n, block)
    z = torch.empty((b, r, k), device=mean.device, dtype=mean.dtype)
    partials = torch.empty((b, tiles), device=mean.device, dtype=torch.float32) if want_kl else z
    eps = _noise_args(mean, None if deterministic else noise, None if deterministic else seed, offset)
    with on_device(mean):
        _forward_kernel[(b * tiles,)](
            mean,
            logvar,
            z,
            partials,
            n,
            k,
            tiles,
            mean.stride(0),
            mean.stride(1),
            logvar.stride(0),
            logvar.stride(1),
            **eps,
            FLAT=_is_flat(k, mean, logvar),
            GROUPED_NOISE=eps["NOISE"] == 2 and n % 4 == 0,
            WANT_KL=want_kl,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    if not want_kl:
        return z, None
    return z, (partials.view(b) if tiles == 1 else partials.sum(dim=1))


def backward(
    dz: Tensor | None,
    dkl: Tensor | None,
    mean: Tensor,
    logvar: Tensor,
    noise: Tensor | None,
    seed: int | Tensor | None,
    offset: int,
    deterministic: bool,
    dmean: Tensor | None,
    dlogvar: Tensor | None,
) -> None:
    """Writes dmean = dz + dkl[b] * mean and dlogvar = in ? 0.5 dz eps std + 0.5 dkl[b] (exp(lv) - 1) : 0.

    in = (-30 <= logvar <= 20), lv = clamp(logvar, -30, 20), std = exp(lv / 2), all float32.
    dz: None (zero) or (B, R, K) contiguous in mean's dtype; dkl: None (zero) or float32 (B,)
    contiguous. mean, logvar, noise, seed, offset, deterministic: as in :func:`forward` (eps re-drawn
    in the kernel, bit-identical to the forward's, when noise is None; no eps term when deterministic).
    dmean, dlogvar: None (not wanted) or (B, R, K) views with unit stride along K in mean's dtype
    (possibly the two halves of one tensor), each written completely, once. One pass: reads dz, mean,
    logvar (and noise) where a wanted gradient needs them. Never synchronizes with the host.
    """
    if dmean is None and dlogvar is None:
        return
    b, r, k = mean.shape
    n = r * k
    block = min(MAX_BLOCK, next_power_of_2(n))
    tiles = cdiv(n, block)
    # eps is needed only for dz's term of dlogvar.
    needs_eps = dlogvar is not None and dz is not None and not deterministic
    eps = _noise_args(mean, noise if needs_eps else None, seed if needs_eps else None, offset)
    out = dmean if dmean is not None else dlogvar
    with on_device(mean):
        _backward_kernel[(b * tiles,)](
            dz if dz is not None else mean,
            dkl if dkl is not None else mean,
            mean,
            logvar,
            dmean if dmean is not None else out,
            dlogvar if dlogvar is not None else out,
            n,
            k,
            tiles,
            mean.stride(0),
            mean.stride(1),
            logvar.stride(0),
            logvar.stride(1),
            out.stride(0) if dmean is None else dmean.stride(0),
            out.stride(1) if dmean is None else dmean.stride(1),
            out.stride(0) if dlogvar is None else dlogvar.stride(0),
            out.stride(1) if dlogvar is None else dlogvar.stride(1),
            **eps,
            FLAT=_is_flat(k, mean, logvar, dmean, dlogvar),
            GROUPED_NOISE=eps["NOISE"] == 2 and n % 4 == 0,
            HAS_DZ=dz is not None,
            HAS_DKL=dkl is not None,
            WANT_DMEAN=dmean is not None,
            WANT_DLOGVAR=dlogvar is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
        )


if triton is not None:
    from genkernels.triton._math import _exp
    from genkernels.triton._philox import _philox_normal, _philox_normal_groups

    @triton.jit
    def _clamp_logvar(logvar):
        """clamp(logvar, -30, 20) with NaN kept, as torch.clamp does (tl.minimum / tl.maximum drop a NaN
        operand: a NaN logvar would give a finite z and KL)."""
        return tl.where(logvar < -30.0, -30.0, tl.where(logvar > 20.0, 20.0, logvar))

    @triton.jit
    def _offsets(b, j, K, stride_b, stride_r, FLAT: tl.constexpr):
        """64-bit offsets of elements j of sample b in a view with strides (stride_b, stride_r, 1)."""
        if FLAT:
            return b.to(tl.int64) * stride_b + j
        else:
            r = j // K
            return b.to(tl.int64) * stride_b + r.to(tl.int64) * stride_r + (j - r * K)

    @triton.jit
    def _eps(
        noise_ptr,
        seed_ptr,
        seed,
        offset_lo,
        offset_hi,
        e0,
        e,
        mask,
        NOISE: tl.constexpr,
        SEED_FROM_TENSOR: tl.constexpr,
        GROUPED_NOISE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """eps of the flat elements e = e0 + arange(BLOCK): the noise tensor (NOISE 1) or the Philox
        stream (NOISE 2; grouped when e0 is a multiple of 4)."""
        if NOISE == 1:
            return tl.load(noise_ptr + e, mask=mask, other=0.0).to(tl.float32)
        else:
            if SEED_FROM_TENSOR:
                key = tl.load(seed_ptr)
            else:
                key = seed
            if GROUPED_NOISE:
                return _philox_normal_groups(key, offset_lo, offset_hi, e0, BLOCK)
            else:
                return _philox_normal(key, offset_lo, offset_hi, e)

    @triton.jit(do_not_specialize=("seed", "offset_lo", "offset_hi"))
    def _forward_kernel(
        mean_ptr,
        logvar_ptr,
        z_ptr,
        partial_ptr,
        N,
        K,
        tiles,
        mean_sb,
        mean_sr,
        logvar_sb,
        logvar_sr,
        noise_ptr,
        seed_ptr,
        seed,
        offset_lo,
        offset_hi,
        NOISE: tl.constexpr,  # 0: none (deterministic), 1: the noise tensor, 2: Philox in the kernel
        SEED_FROM_TENSOR: tl.constexpr,
        FLAT: tl.constexpr,
        GROUPED_NOISE: tl.constexpr,  # N % 4 == 0: every tile starts a Philox group (BLOCK >= 4)
        WANT_KL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """z and the KL partial of one tile of BLOCK elements of one sample; grid (B * T,).

        Memory traffic: mean, logvar (when used) and noise read once; z written once; one float32
        partial per program."""
        pid = tl.program_id(0)
        b = pid // tiles
        t = pid - b * tiles
        j = t * BLOCK + tl.arange(0, BLOCK)
        mask = j < N
        e0 = b.to(tl.int64) * N + t * BLOCK
        e = e0 + tl.arange(0, BLOCK)
        mean = tl.load(mean_ptr + _offsets(b, j, K, mean_sb, mean_sr, FLAT), mask=mask, other=0.0).to(tl.float32)
        z = mean
        if NOISE != 0 or WANT_KL:
            logvar = tl.load(logvar_ptr + _offsets(b, j, K, logvar_sb, logvar_sr, FLAT), mask=mask, other=0.0)
            lv = _clamp_logvar(logvar.to(tl.float32))
            if NOISE != 0:
                eps = _eps(
                    noise_ptr,
                    seed_ptr,
                    seed,
                    offset_lo,
                    offset_hi,
                    e0,
                    e,
                    mask,
                    NOISE,
                    SEED_FROM_TENSOR,
                    GROUPED_NOISE,
                    BLOCK,
                )
                z = mean + _exp(0.5 * lv) * eps
            if WANT_KL:
                kl = tl.where(mask, mean * mean + _exp(lv) - 1.0 - lv, 0.0)
                tl.store(partial_ptr + pid, 0.5 * tl.sum(kl, axis=0))
        tl.store(z_ptr + e, z.to(z_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=("seed", "offset_lo", "offset_hi"))
    def _backward_kernel(
        dz_ptr,
        dkl_ptr,
        mean_ptr,
        logvar_ptr,
        dmean_ptr,
        dlogvar_ptr,
        N,
        K,
        tiles,
        mean_sb,
        mean_sr,
        logvar_sb,
        logvar_sr,
        dmean_sb,
        dmean_sr,
        dlogvar_sb,
        dlogvar_sr,
        noise_ptr,
        seed_ptr,
        seed,
        offset_lo,
        offset_hi,
        NOISE: tl.constexpr,  # 0: no eps term, 1: the noise tensor, 2: Philox in the kernel
        SEED_FROM_TENSOR: tl.constexpr,
        FLAT: tl.constexpr,
        GROUPED_NOISE: tl.constexpr,
        HAS_DZ: tl.constexpr,
        HAS_DKL: tl.constexpr,
        WANT_DMEAN: tl.constexpr,
        WANT_DLOGVAR: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """dmean and dlogvar of one tile of BLOCK elements of one sample; grid (B * T,).

        Memory traffic: dz, mean, logvar and noise read once, each only when a wanted gradient needs
        it; dmean and dlogvar written once; dkl[b] one scalar load per program."""
        pid = tl.program_id(0)
        b = pid // tiles
        t = pid - b * tiles
        j = t * BLOCK + tl.arange(0, BLOCK)
        mask = j < N
        e0 = b.to(tl.int64) * N + t * BLOCK
        e = e0 + tl.arange(0, BLOCK)
        if HAS_DZ:
            dz = tl.load(dz_ptr + e, mask=mask, other=0.0).to(tl.float32)
        if HAS_DKL:
            dkl = tl.load(dkl_ptr + b)
        if WANT_DMEAN:
            dmean = tl.zeros([BLOCK], dtype=tl.float32)
            if HAS_DZ:
                dmean += dz
            if HAS_DKL:
                mean_at = mean_ptr + _offsets(b, j, K, mean_sb, mean_sr, FLAT)
                dmean += dkl * tl.load(mean_at, mask=mask, other=0.0).to(tl.float32)
            dmean_at = dmean_ptr + _offsets(b, j, K, dmean_sb, dmean_sr, FLAT)
            tl.store(dmean_at, dmean.to(dmean_ptr.dtype.element_ty), mask=mask)
        if WANT_DLOGVAR:
            logvar_at = logvar_ptr + _offsets(b, j, K, logvar_sb, logvar_sr, FLAT)
            logvar = tl.load(logvar_at, mask=mask, other=0.0).to(tl.float32)
            lv = _clamp_logvar(logvar)
            dlogvar = tl.zeros([BLOCK], dtype=tl.float32)
            if NOISE != 0:
                eps = _eps(
                    noise_ptr,
                    seed_ptr,
                    seed,
                    offset_lo,
                    offset_hi,
                    e0,
                    e,
                    mask,
                    NOISE,
                    SEED_FROM_TENSOR,
                    GROUPED_NOISE,
                    BLOCK,
                )
                dlogvar += 0.5 * dz * eps * _exp(0.5 * lv)
            if HAS_DKL:
                dlogvar += 0.5 * dkl * (_exp(lv) - 1.0)
            # torch.clamp's gradient: passed at the bounds, zero outside them (and for NaN).
            dlogvar = tl.where((logvar >= -30.0) & (logvar <= 20.0), dlogvar, 0.0)
            dlogvar_at = dlogvar_ptr + _offsets(b, j, K, dlogvar_sb, dlogvar_sr, FLAT)
            tl.store(dlogvar_at, dlogvar.to(dlogvar_ptr.dtype.element_ty), mask=mask)
