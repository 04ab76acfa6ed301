"""Edge cases of the VAE / flow / GAN ops and layers that real callers hit: which noise source wins in
reparameterize when several are given, and AffineCoupling's default (2-D convolutional) conditioner on
inputs that are not images."""

from __future__ import annotations

import pytest
import torch

import genkernels
from genkernels.nn import AffineCoupling
from genkernels.ops import reparameterize
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported

FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reparameterize_generator_outranks_seed(backend, device):
    """The documented order of noise sources is noise, generator, seed: with a generator and a seed, the
    generator draws eps on every backend (a fast backend used to take the seed and ignore the generator)."""
    mean = torch.randn(2, 3, 4, 5, device=device)
    logvar = torch.randn(2, 3, 4, 5, device=device)
    skip_unsupported(backend, "reparameterize", mean=mean, logvar=logvar)

    def draw(**kwargs):
        return reparameterize(mean, logvar, backend=backend, return_kl=False, **kwargs)

    both = draw(generator=torch.Generator(device).manual_seed(1), seed=5)
    other_generator = draw(generator=torch.Generator(device).manual_seed(2), seed=5)
    assert torch.equal(both, draw(generator=torch.Generator(device).manual_seed(1)))
    assert not torch.equal(both, other_generator)
    assert not torch.equal(both, draw(seed=5))
    if backend == "reference":  # diffusers' draw: eps = randn on the generator
        eps = torch.randn(mean.shape, generator=torch.Generator(device).manual_seed(1), device=device)
        truth = mean.double() + torch.exp(0.5 * logvar.double()) * eps.double()
        ref = mean + torch.exp(0.5 * logvar) * eps
        assert_criterion(both, ref, truth, "z")


@pytest.mark.parametrize("scale", ["additive", "sigmoid"])
def test_coupling_default_conditioner_refuses_non_image_input(scale):
    """The default conditioner is a stack of Conv2d, which reads a 3-D tensor as one unbatched image: an
    (N, C, L) input with N == C / 2 (additive) used to run, mixing the samples. It must raise instead."""
    layer = AffineCoupling(4, 8, scale=scale, backend="reference")
    for shape in [(2, 4, 5), (3, 4), (2, 4, 3, 3, 2)]:
        x = torch.randn(shape)
        with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\) for the default conditioner"):
            layer(x)
        with pytest.raises(ValueError, match=r"y must be \(N, C, H, W\) for the default conditioner"):
            layer.inverse(x)


def test_coupling_user_conditioner_still_takes_any_shape():
    """With a conditioner of the user's, (N, C, L) inputs run, each sample on its own."""
    net = torch.nn.Conv1d(2, 4, 3, padding=1)
    layer = AffineCoupling(4, scale="exp", conditioner=net, backend="reference")
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    layer.double()
    with genkernels.backend("reference"):
        y, logdet = layer(x)
        y1, logdet1 = layer(x[1:2])
    torch.testing.assert_close(y[1:2], y1)
    torch.testing.assert_close(logdet[1:2], logdet1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reparameterize_reference_generator_draws_in_the_input_dtype(dtype):
    """The reference draws eps as diffusers' posterior does: torch.randn on the generator in mean's dtype. It drew
    float32 randn, which on the CPU is another stream than fp16's, bf16's or float64's: other numbers."""
    mean, logvar = torch.randn(2, 3, 4, 5).to(dtype), torch.randn(2, 3, 4, 5).to(dtype)
    z = reparameterize(mean, logvar, generator=torch.Generator().manual_seed(4), backend="reference", return_kl=False)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
    ref = mean + torch.exp(0.5 * logvar) * eps
    truth = mean.double() + torch.exp(0.5 * logvar.double()) * eps.double()
    assert_criterion(z, ref, truth, "z")
