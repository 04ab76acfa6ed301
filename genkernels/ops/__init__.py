"""The fused ops. Each takes ``backend=`` ("auto", "reference", "triton", "cuda"); see genkernels.backend."""

from .attention import attention, attention_reference
from .group_norm import group_norm, group_norm_reference

__all__ = ["attention", "attention_reference", "group_norm", "group_norm_reference"]
