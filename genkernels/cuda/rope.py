"""CUDA launcher for rotary position embedding (csrc/rope.cu): a thin wrapper over ``genkernels._C``.

Implements the fused backend interface of :mod:`genkernels.ops.rope` (see its module docstring for the
formula), with the semantics of :mod:`genkernels.triton.rope`: q (B, H, L, Dh) and k (B, Hk, L, Dh) are
addressed through their (batch, head, position) strides with a unit last stride, so the transposed
(B, L, H, Dh) projections and slices of a fused qkv tensor are read where they lie; each output has its own
strides, or is its input (in place). q and k turn in one launch: one thread per work unit of a row (VEC pairs
of rotate_half, VEC channels of interleaved pairs, VEC pass-through channels copied out of place), VEC the
dtype's 16-byte width when every pointer and offset allows it, else 1. cos and sin are read in their own
dtype (float32, float16 or bfloat16; a float64 table is rounded to float32 here first, as the other backends
round it when they load it). Arithmetic is float32. Launches on torch's current stream without
synchronizing (CUDA-graph capturable).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    DTYPE_CODES,
    MAX_BLOCKS,
    device_guard,
    dtype_code,
    kernels_unavailable,
    require_extension,
    stream_handle,
)

# Threads per block (kRopeThreads); the scalar path has one pair (or one copied channel) a thread.
THREADS = 256

_SYMBOLS = ("rope_rotate",)
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ABSENT = (0, (0, 0, 0))


def not_supported(q: Tensor, k: Tensor | None, cos: Tensor | None, sin: Tensor | None, interleaved: bool) -> str | None:
    """Why the cuda backend cannot run this rope call (one line), or None when it can.

    The op module has checked shapes, dtypes and devices, and copies any tensor whose last stride is not 1;
    what remains is the device, the extension, q's dtype and the 1-D grid (one thread per channel at worst)."""
    reason = kernels_unavailable(q, "q", "rope", _SYMBOLS)
    if reason is not None:
        return reason
    if q.dtype not in _FAST_DTYPES:
        return f"q has dtype {q.dtype}; supported: float32, float16, bfloat16"
    rows = q.numel() + (0 if k is None else k.numel())
    if -(-rows // THREADS) > MAX_BLOCKS:
        return f"{rows} elements: more than 2^31 - 1 blocks of {THREADS}"
    return None


def _operand(t: Tensor | None) -> tuple[int, tuple[int, int, int]]:
    """(address, (batch, head, position) strides) as ``_C`` takes them; the stride of a size-1 dim is never
    used to address, so it goes as 0 (it must not cost the 16-byte vectors)."""
    if t is None:
        return _ABSENT
    strides = tuple(s if n > 1 else 0 for n, s in zip(t.shape[:3], t.stride()[:3]))
    return t.data_ptr(), strides


def _table(t: Tensor) -> Tensor:
    """t itself when the kernel reads its dtype, else rounded to float32 (a float64 table)."""
    return t if t.dtype in DTYPE_CODES else t.float()


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

    q (B, H, L, Dh), k None or (B, Hk, L, Dh), q_out / k_out of the same shapes (q_out may be q and k_out k,
    with the same strides: in place); every one with a unit last stride and any other strides (>= 0);
    float32, float16 or bfloat16 (the outputs in their input's dtype). cos, sin (L, P) with 1 <= P <= Dh / 2
    and a unit last stride, any float dtype. inverse: rotate by -angle (the backward). Channels 2P.. are
    copied to the outputs unless they are the inputs. Reads q and k once, writes the outputs once; never
    synchronizes with the host."""
    ext = require_extension()
    b, hq, length, dh = q.shape
    cos, sin = _table(cos), _table(sin)
    device = q.device
    with device_guard(device):
        ext.rope_rotate(
            _operand(q),
            _operand(q_out),
            _operand(k),
            _operand(k_out if k is not None else None),
            cos.data_ptr(),
            sin.data_ptr(),
            cos_stride=cos.stride(0) if cos.shape[0] > 1 else 0,
            sin_stride=sin.stride(0) if sin.shape[0] > 1 else 0,
            cos_dtype=dtype_code(cos),
            sin_dtype=dtype_code(sin),
            batch=b,
            heads_q=hq,
            heads_k=0 if k is None else k.shape[1],
            length=length,
            head_dim=dh,
            pairs=cos.shape[-1],
            dtype=dtype_code(q),
            device=device.index,
            interleaved=bool(interleaved),
            inverse=bool(inverse),
            stream=stream_handle(device),
        )
