"""Helpers the op tests share: a tensor in a named memory layout, and skipping a backend that
cannot run the inputs at hand."""

from __future__ import annotations

import pytest
import torch

import genkernels


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x with the same values in ``layout``: "contiguous" (x itself), "channels_last" (channels
    innermost, for 3-D and more) or "strided" (fits neither canonical order: a view of a padded copy)."""
    if layout == "channels_last" and x.dim() >= 3:
        perm = (0, *range(2, x.dim()), 1)
        inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
        return x.permute(perm).contiguous().permute(inv)
    if layout == "strided":
        return torch.cat([x, torch.zeros_like(x)], dim=-1)[..., : x.shape[-1]]
    return x


def skip_unsupported(backend: str, op: str, *args, **kwargs) -> None:
    """Skips the calling test when ``genkernels.explain(op, *args, **kwargs)`` says ``backend`` cannot run."""
    reason = genkernels.explain(op, *args, **kwargs)[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
