"""CUDA launcher for fused attention (forward only): a thin wrapper over ``genkernels._C``.

The kernel (csrc/attention.cu, FlashAttention-2 on the tensor cores with mma.sync m16n8k16)
takes device addresses, sizes, element strides, a dtype code and a stream; this module allocates
out (in q's memory order) and lse with torch on q's device and launches on torch's current stream
without synchronizing (CUDA-graph capturable).

Inputs run in place through their batch, head and row strides (a transposed view of a
(B, L, H, D) tensor, k and v expanded along B, ...); the last dim must be contiguous (the op
guarantees it). Supported: float16 and bfloat16, head dim a multiple of 8 up to 128, 16-byte
aligned tensors and strides, compute capability 8.0 or newer. There is no CUDA backward:
calls that need gradients are reported unsupported, so the dispatcher picks the triton backend.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._layout import heads_like
from ._common import DTYPE_CODES, address, cuda_unavailable, device_guard, require_extension, stream_handle

MAX_HEAD_DIM = 128
MAX_LENGTH = 1 << 30  # Lq, Lkv: keeps the kernel's row and key index sums in 32 bits
_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _capability_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (
            f"GPU sm_{major}{minor}: the cuda attention kernel needs compute capability 8.0 or newer "
            "(mma.sync m16n8k16, cp.async)"
        )
    return None


def _strides(t: Tensor) -> tuple[int, int, int]:
    """The batch, head and row strides in elements; 0 for a dim of size 1, whose stride is never used."""
    return tuple(t.stride(i) if t.shape[i] > 1 else 0 for i in range(3))


def not_supported(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None,
    needs_grad: bool,
) -> str | None:
    """Why the cuda backend cannot run this attention call (one line), or None when it can.

    The op has validated shapes, devices and dtypes and made stride(-1) == 1; what remains is
    what this kernel handles: the extension and GPU, forward only, float16/bfloat16, head dim
    a multiple of 8 up to 128, 16-byte aligned addresses and strides (not asked of empty inputs,
    which the op answers without a launch).
    """
    if q.device.type != "cuda":
        return f"q is on {q.device.type}: the cuda backend needs CUDA tensors"
    reason = cuda_unavailable(q)
    if reason is not None:
        return reason
    reason = _capability_reason(q.device.index)
    if reason is not None:
        return reason
    if needs_grad:
        return "no CUDA backward yet: training calls use the triton backend"
    if q.dtype == torch.float32:
        return "float32: use the triton or reference backend (the cuda kernel takes float16 and bfloat16)"
    if q.dtype not in _DTYPES:
        return f"q is {q.dtype}: the cuda backend supports float16 and bfloat16"
    head_dim = q.shape[-1]
    if head_dim % 8 != 0:
        return f"head dim {head_dim} is not a multiple of 8 (the cuda kernel moves 16-byte rows)"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim}: the cuda backend supports head dims up to {MAX_HEAD_DIM}"
    if max(q.shape[2], k.shape[2]) > MAX_LENGTH:
        return f"sequence length {max(q.shape[2], k.shape[2])}: the cuda backend supports up to 2^30"
    if min(q.numel(), k.numel()) == 0:  # the op launches nothing: addresses and strides are never used
        return None
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.data_ptr() % 16 != 0:
            return f"{name} is not 16-byte aligned (storage offset {t.storage_offset()}): the cuda kernel needs it"
        strides = _strides(t)
        if any(s % 8 != 0 for s in strides):
            return (
                f"{name} has batch/head/row strides {t.stride()[:3]} (elements): the cuda kernel needs multiples "
                "of 8 (16 bytes)"
            )
    return None


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None,
    keep_residual: bool = False,
) -> tuple[Tensor, Tensor, None]:
    """out = softmax(scale * q k^T over the allowed keys) v and lse = log sum exp of the same scores.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lkv, D), Hq % Hkv == 0, query head h reading kv head
    h // (Hq // Hkv); float16 or bfloat16. Key j is allowed for query i unless
    key_padding_mask[b, j] (contiguous bool (B, Lkv), True = padding) or, when causal,
    j > i + Lkv - Lq. Returns out, (B, Hq, Lq, D) in q's dtype and in q's memory order
    (genkernels._layout.heads_like: a (B, Lq, Hq, D) tensor seen as (B, Hq, Lq, D) where q's heads
    are inner to its positions, so that merging the heads back is a view; else contiguous), zero
    rows where no key is allowed; lse, contiguous float32 (B, Hq, Lq), natural log, -inf for those
    rows; and None (no residual of out is kept: this backend runs no backward, so keep_residual
    must be False).
    Scores, softmax statistics and the output accumulate in float32.
    """
    if keep_residual:
        raise ValueError("keep_residual=True: the cuda backend runs no backward (its not_supported refuses such calls)")
    ext = require_extension()
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_kv = k.shape[1], k.shape[2]
    # Dense in either order, so out's strides are multiples of D, hence of 8 (not_supported): the
    # 16-byte stores the kernel needs.
    out = heads_like(q)
    lse = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=q.device)
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    with device_guard(q.device):
        ext.attention_forward(
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            address(mask),
            out.data_ptr(),
            lse.data_ptr(),
            batch,
            heads_q,
            heads_kv,
            len_q,
            len_kv,
            head_dim,
            _strides(q),
            _strides(k),
            _strides(v),
            _strides(out),
            DTYPE_CODES[q.dtype],
            q.device.index,
            float(scale),
            bool(causal),
            stream_handle(q.device),
        )
    return out, lse, None
