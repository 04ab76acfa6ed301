"""Edge cases of the GAN models found by an adversarial review: empty batches (the w_avg EMA, the grouped
modulated convolution), sampling a generator left in training mode, truncation psi tensors, the R1
regularizer's arguments and integer inputs (on CPU, reference backend)."""

from __future__ import annotations

import copy

import pytest
import torch

import genkernels
from genkernels.models import GANConfig, Generator, gan
from genkernels.nn import ModulatedConv2d
from genkernels.train_gan import sample_gan


@pytest.fixture(autouse=True)
def _reference():
    with genkernels.backend("reference"):
        yield


def test_w_avg_ignores_an_empty_batch():
    """A training-mode call on no samples leaves w_avg as it was: the mean of no w is NaN, and lerping it in
    made w_avg (and every truncated image after it) NaN without an error."""
    cfg = GANConfig.tiny(8)
    G = Generator(cfg).train()
    with torch.no_grad():
        G.mapping.w_avg.normal_()
        before = G.mapping.w_avg.clone()
        assert G(torch.randn(0, cfg.z_dim)).shape == (0, 1, 8, 8)
    assert torch.equal(G.mapping.w_avg, before)


def test_sample_gan_leaves_a_training_generator_as_it_was(tmp_path):
    """sample_gan on a generator in training mode (train_gan's result.generator) gives the images of eval
    mode and changes nothing: it used to update w_avg with the samples' w before truncating towards it."""
    cfg = GANConfig.tiny(8)
    G = Generator(cfg).train()
    with torch.no_grad():
        G.mapping.w_avg.normal_()
    evaluated = copy.deepcopy(G).eval()
    before = G.mapping.w_avg.clone()
    got = sample_gan(G, 4, 0, tmp_path / "a.png", truncation=0.5).images
    want = sample_gan(evaluated, 4, 0, tmp_path / "b.png", truncation=0.5).images
    assert G.training and torch.equal(G.mapping.w_avg, before)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("up", [False, True])
def test_grouped_modulated_conv_empty_batch(up):
    """grouped=True on a batch of 0 returns (0, O, H_out, W_out), as the shared-convolution path does (a
    grouped convolution with groups = N = 0 raised), with gradients."""
    layer = ModulatedConv2d(3, 4, 3, 5, grouped=True, up=up, resolution=12 if up else 6)
    x = torch.randn(0, 3, 6, 6, requires_grad=True)
    out = layer(x, torch.randn(0, 5), "const")
    assert out.shape == ((0, 4, 12, 12) if up else (0, 4, 6, 6))
    out.sum().backward()
    assert x.grad.shape == x.shape
    G = Generator(GANConfig.tiny(8), grouped=True)
    assert G(torch.randn(0, 8)).shape == (0, 1, 8, 8)


def test_truncation_psi_tensors():
    """A one-element psi tensor truncates as the number does; a psi tensor of several values is refused with
    the argument's name (a (w_dim,) one broadcast along w's features, anything else failed on bool())."""
    cfg = GANConfig.tiny(8)
    G = Generator(cfg).eval()
    z = torch.randn(3, cfg.z_dim)
    with torch.no_grad():
        G.mapping.w_avg.normal_()
        want = G.mapping(z, truncation_psi=0.5)
        for psi in (torch.tensor(0.5), torch.tensor([0.5])):
            torch.testing.assert_close(G.mapping(z, truncation_psi=psi), want)
        for psi in (torch.full((3,), 0.5), torch.full((cfg.w_dim,), 0.5), torch.full((3, 1, 1), 0.5)):
            with pytest.raises(ValueError, match="truncation_psi must be a finite number or a one-element tensor"):
                G.mapping(z, truncation_psi=psi)


@pytest.mark.parametrize(
    "gamma, interval, match",
    [
        (float("nan"), 1, "gamma must be a finite number >= 0"),
        (-1.0, 1, "gamma must be a finite number >= 0"),
        (1.0, 0, "interval must be a positive int"),
        (1.0, 2.5, "interval must be a positive int"),
    ],
)
def test_r1_loss_arguments(gamma, interval, match):
    """A NaN or negative gamma, or an interval below 1, silently made the regularizer NaN, an anti-regularizer
    or zero; they are refused. Valid numbers (NumPy's too) still give gamma / 2 * mean penalty * interval."""
    D = gan.Discriminator(GANConfig.tiny(8))
    real = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=match):
        gan.r1_loss(D, real, gamma, interval)
    penalty, _ = gan.r1_penalty(D, real)
    torch.testing.assert_close(gan.r1_loss(D, real, 0.5, 4), penalty.mean() * 1.0)


def test_integer_inputs_are_refused_by_name():
    """Integer z and x name the argument (they failed deep inside with torch's messages)."""
    cfg = GANConfig.tiny(8)
    with pytest.raises(TypeError, match="z must be a floating-point tensor, got torch.int64"):
        Generator(cfg)(torch.ones(2, cfg.z_dim, dtype=torch.int64))
    layer = ModulatedConv2d(3, 4, 3, 5)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        layer(torch.ones(2, 3, 6, 6, dtype=torch.int64), torch.randn(2, 5))
