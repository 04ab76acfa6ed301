"""Memory layouts of (N, C, *spatial) tensors as the kernels see them.

Image kernels accept two dense layouts and address both through three strides:

- channels first (NCHW, the contiguous layout): element (n, c, s) at n*C*S + c*S + s;
- channels last (NHWC, ``torch.channels_last`` / ``channels_last_3d``, and the same
  idea for 3-D inputs): element (n, c, s) at n*S*C + s*C + c.

Here S is the product of the spatial sizes. Anything else is copied once into
the contiguous layout by :func:`dense_layout`.
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
