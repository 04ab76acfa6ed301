"""Drop-in nn.Modules on the fused ops, and drop-in functions in genkernels.nn.functional."""

from . import functional
from .attention import Attention
from .flow import ActNorm, AffineCoupling, InvConv1x1
from .group_norm import GroupNorm, GroupNormSiLU
from .modconv import EqualizedLinear, ModulatedConv2d
from .transformer import CausalSelfAttention, GeluMLP, KVCache, LayerNormModulate, RotaryEmbedding, SwiGLU

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "Attention",
    "CausalSelfAttention",
    "EqualizedLinear",
    "GeluMLP",
    "GroupNorm",
    "GroupNormSiLU",
    "InvConv1x1",
    "KVCache",
    "LayerNormModulate",
    "ModulatedConv2d",
    "RotaryEmbedding",
    "SwiGLU",
    "functional",
]
