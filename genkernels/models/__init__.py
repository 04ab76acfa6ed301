"""Generative models built on genkernels layers."""

from .diffusion import UNet, UNetConfig
from .flow import Glow, GlowConfig, RealNVP2D
from .gan import Discriminator, GANConfig, Generator
from .vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiagonalGaussian",
    "Discriminator",
    "GANConfig",
    "Generator",
    "Glow",
    "GlowConfig",
    "RealNVP2D",
    "UNet",
    "UNetConfig",
]
