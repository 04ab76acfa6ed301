"""Drop-in nn.Modules on the fused ops, and drop-in functions in genkernels.nn.functional."""

from . import functional
from .attention import Attention
from .group_norm import GroupNorm, GroupNormSiLU

__all__ = ["Attention", "GroupNorm", "GroupNormSiLU", "functional"]
