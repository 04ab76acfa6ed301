"""Generative models built on genkernels layers."""

from .diffusion import UNet, UNetConfig
from .vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussian", "UNet", "UNetConfig"]
