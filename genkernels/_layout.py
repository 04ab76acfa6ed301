"""Memory layouts of (N, C, *spatial) tensors as the kernels see them.

Image kernels accept two dense layouts and address both through three strides:

- channels first (NCHW, the contiguous layout): element (n, c, s) at n*C*S + c*S + s;
- channels last (NHWC, ``torch.channels_last`` / ``channels_last_3d``, and the same
  idea for 3-D inputs): element (n, c, s) at n*S*C + s*C + c.

Here S is the product of the spatial sizes. Anything else is copied once into
the contiguous layout by :func:`dense_layout`.

Attention tensors are (B, H, L, D) and come in two memory orders: heads outer (contiguous) or heads inner,
a (B, L, H, D) tensor viewed through ``.transpose(1, 2)``, as a linear layer's output split in heads is.
:func:`heads_like` allocates an output in its input's order, so that merging the heads back,
``out.transpose(1, 2).reshape(B, L, H * D)``, is a view and not a copy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class ImageLayout(NamedTuple):
    """Sizes and element strides of a dense (N, C, S) view of an (N, C, *) tensor."""

    n: int
    c: int
    s: int
    stride_n: int
    stride_c: int
    stride_s: int

    @property
    def channels_last(self) -> bool:
        """Positions are not the contiguous axis (False where the two layouts coincide, e.g. S == 1)."""
        return self.stride_s != 1


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x (N, C, *) is dense with channels innermost and is not also contiguous."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    perm = (0, *range(2, x.dim()), 1)
    return x.permute(perm).is_contiguous()


def dense_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is contiguous or channels last, else a contiguous copy (one pass)."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()


def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    """A side input as kernels index it, a dense array (t itself when contiguous), or None.

    The registered ops call it too: a traced call passes its tensors with their own strides (a transposed mask,
    a float32 bias[::2], an expanded vector), where the eager path would have copied them."""
    return None if t is None else t.contiguous()


def match_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in the same dense layout as ``like`` (copied only when it differs)."""
    if is_channels_last(like):
        if is_channels_last(t):
            return t
        perm = (0, *range(2, t.dim()), 1)
        inv = (0, t.dim() - 1, *range(1, t.dim() - 1))
        return t.permute(perm).contiguous().permute(inv)
    return t.contiguous()


def image_layout(x: torch.Tensor) -> ImageLayout:
    """The (N, C, S) sizes and strides of a tensor returned by :func:`dense_layout`."""
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    if is_channels_last(x):
        return ImageLayout(n, c, s, s * c, 1, c)
    return ImageLayout(n, c, s, c * s, s, 1)


def heads_inner(t: torch.Tensor) -> bool:
    """True when t (B, H, L, D) has its heads inner to its positions (t.stride(1) < t.stride(2)): a (B, L, H, D)
    tensor viewed as (B, H, L, D). False where the order does not show (H == 1 or L == 1)."""
    return t.dim() == 4 and t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) < t.stride(2)


def heads_like(
    t: torch.Tensor, shape: tuple[int, ...] | torch.Size | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A new (B, H, L, D) tensor (``shape``, default t's) in t's memory order: (B, L, H, D) memory viewed as
    (B, H, L, D) where :func:`heads_inner` holds for t, else contiguous. Its strides are dense either way."""
    b, h, length, d = t.shape if shape is None else shape
    dtype = t.dtype if dtype is None else dtype
    if heads_inner(t):
        return torch.empty((b, length, h, d), dtype=dtype, device=t.device).transpose(1, 2)
    return torch.empty((b, h, length, d), dtype=dtype, device=t.device)
