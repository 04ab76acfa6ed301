"""The fused ops. Each takes ``backend=`` ("auto", "reference", "triton", "cuda"); see genkernels.backend."""

from .group_norm import group_norm, group_norm_reference

__all__ = ["group_norm", "group_norm_reference"]
