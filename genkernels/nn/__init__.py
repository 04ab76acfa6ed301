"""Drop-in nn.Modules on the fused ops, and drop-in functions in genkernels.nn.functional."""

from . import functional
from .attention import Attention
from .flow import ActNorm, AffineCoupling, InvConv1x1
from .group_norm import GroupNorm, GroupNormSiLU
from .modconv import EqualizedLinear, ModulatedConv2d

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "Attention",
    "EqualizedLinear",
    "GroupNorm",
    "GroupNormSiLU",
    "InvConv1x1",
    "ModulatedConv2d",
    "functional",
]
