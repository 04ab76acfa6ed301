"""Edge cases of the VAE and GAN models that real callers hit: image sizes the VAE cannot reconstruct,
tile settings whose tiles do not line up, posterior sampling given both a generator and a seed, and the
truncation trick's psi."""

from __future__ import annotations

import math

import pytest
import torch

import genkernels
from genkernels.models import AutoencoderKL, AutoencoderKLConfig, GANConfig, Generator


@pytest.fixture(autouse=True)
def _reference():
    with genkernels.backend("reference"):
        yield


def test_vae_refuses_image_sizes_not_divisible_by_the_downscale():
    """A 15 x 15 image used to encode to a 7 x 7 latent and come back 14 x 14 from forward() (documented:
    the latent is H / 2 ** (levels - 1), the reconstruction (B, C, H, W)); tiled, a 9 x 13 image crashed
    inside a convolution. Both now raise a ValueError naming the sizes."""
    model = AutoencoderKL(AutoencoderKLConfig.tiny()).eval()
    for size in [(15, 15), (16, 13), (9, 13)]:
        x = torch.randn(1, 3, *size)
        for tiled in (False, True):
            if tiled:
                model.enable_tiling(8)
            with pytest.raises(ValueError, match=r"H and W divisible by 2 \*\* \(levels - 1\) = 2, got H="):
                model(x)
            model.disable_tiling()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 6, 10)).sample.shape == (1, 3, 6, 10)


@pytest.mark.parametrize("tile, overlap", [(10, 0.25), (13, 0.25), (16, 0.3)])
def test_vae_tiling_refuses_tiles_that_do_not_line_up(tile, overlap):
    """With 3 levels (latent 4x smaller), tiles of 10 pixels used to decode an 8 x 8 latent to 60 x 60 and
    encode a 32 x 32 image to 9 x 9; an overlap of 0.3 on 16-pixel tiles was as wrong. enable_tiling now
    raises, and leaves the previous tiling as it was."""
    config = AutoencoderKLConfig.tiny(block_out_channels=(8, 8, 16))
    model = AutoencoderKL(config).eval()
    model.enable_tiling(16)
    with pytest.raises(ValueError, match="do not tile evenly"):
        model.enable_tiling(tile, overlap)
    assert (model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor) == (16, 4, 0.25)
    with torch.no_grad():
        assert model.decode(torch.randn(1, 4, 8, 8)).sample.shape == (1, 3, 32, 32)
        assert model.encode(torch.randn(1, 3, 32, 32)).latent_dist.mean.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_vae_posterior_sample_generator_outranks_seed(backend, device):
    """DiagonalGaussian.sample: noise, else generator, else seed. Given both a generator and a seed, the
    generator decides eps (the triton backend used to take the seed)."""
    model = AutoencoderKL(AutoencoderKLConfig.tiny(), backend=backend).eval().to(device)
    with torch.no_grad():
        posterior = model.encode(torch.randn(2, 3, 8, 8, device=device)).latent_dist
        both = posterior.sample(generator=torch.Generator().manual_seed(3), seed=11)
        assert torch.equal(both, posterior.sample(generator=torch.Generator().manual_seed(3)))
        assert not torch.equal(both, posterior.sample(seed=11))


def test_truncation_psi_must_be_a_finite_number():
    """psi = NaN used to be accepted and give NaN images; None or a string failed inside torch.lerp."""
    generator = Generator(GANConfig.tiny()).eval()
    z = torch.randn(2, generator.config.z_dim)
    for psi in [math.nan, math.inf, None, "0.5"]:
        with pytest.raises(ValueError, match="truncation_psi must be a finite number, got"):
            generator(z, truncation_psi=psi)
    ws, ws_half = generator.mapping(z), generator.mapping(z, truncation_psi=0.5)
    w_avg = generator.mapping.w_avg.double()
    torch.testing.assert_close(ws_half.double(), w_avg + 0.5 * (ws.double() - w_avg))
