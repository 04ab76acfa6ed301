"""Drop-in replacements for torch.nn.GroupNorm (same constructor arguments and state_dict keys)."""

from __future__ import annotations

import torch

from .._checks import check_backend
from ..ops.group_norm import group_norm


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm on the fused genkernels op.

    Same constructor (num_groups, num_channels, eps=1e-5, affine=True, device, dtype),
    parameters and state_dict keys (``weight``, ``bias``) as torch.nn.GroupNorm, so a
    torch state_dict loads unchanged. Input (N, C, *), contiguous or channels_last.
    ``backend`` pins a backend for this module ("reference", "triton", "cuda"; None: auto).
    """

    activation: str | None = None

    def __init__(self, *args, backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, *) -> (N, C, *) in x's dtype and layout: (x - mean) / sqrt(var + eps) * weight + bias, mean
        and var over each group of C / num_groups channels (then SiLU in :class:`GroupNormSiLU`). C must be
        num_channels (a ValueError otherwise, with or without affine parameters)."""
        if x.dim() >= 2 and x.shape[1] != self.num_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels (dim 1) but this layer has num_channels={self.num_channels}, got "
                f"shape {tuple(x.shape)}"
            )
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        extra = "" if self.backend is None else f", backend={self.backend!r}"
        return super().extra_repr() + extra

    @classmethod
    def from_torch(cls, module: torch.nn.GroupNorm, backend: str | None = None) -> GroupNorm:
        """A genkernels module sharing ``module``'s parameters (no copy)."""
        backend = check_backend(backend)
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new.backend = backend
        return new


class GroupNormSiLU(GroupNorm):
    """GroupNorm followed by SiLU in one fused op: silu(group_norm(x)).

    Constructor and state_dict keys as torch.nn.GroupNorm; replaces the pair
    ``nn.GroupNorm(...)`` + ``nn.SiLU()`` found in diffusion UNet and VAE ResNet blocks.
    """

    activation = "silu"
