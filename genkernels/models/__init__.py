"""Generative models built on genkernels layers."""

from .diffusion import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
