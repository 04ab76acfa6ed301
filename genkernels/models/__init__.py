"""Generative models built on genkernels layers."""

from .diffusion import DiT, DiTConfig, UNet, UNetConfig
from .flow import Glow, GlowConfig, RealNVP2D
from .gan import Discriminator, GANConfig, Generator
from .transformer import ImageGPT, ImageGPTConfig
from .vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiT",
    "DiTConfig",
    "DiagonalGaussian",
    "Discriminator",
    "GANConfig",
    "Generator",
    "Glow",
    "GlowConfig",
    "ImageGPT",
    "ImageGPTConfig",
    "RealNVP2D",
    "UNet",
    "UNetConfig",
]
