"""Drop-in nn.Modules on the fused ops."""

from .group_norm import GroupNorm, GroupNormSiLU

__all__ = ["GroupNorm", "GroupNormSiLU"]
