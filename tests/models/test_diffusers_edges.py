"""Diffusers parity edges of AutoencoderKL beyond tests/models/test_vae.py: diffusers' positional call
signature, and posterior samples drawn from a generator in float64."""

from __future__ import annotations

import copy

import pytest
import torch

from genkernels.models import AutoencoderKL, AutoencoderKLConfig
from tests.criterion import assert_criterion

try:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
except ImportError:
    DiffusersAutoencoderKL = None
pytestmark = [
    pytest.mark.skipif(DiffusersAutoencoderKL is None, reason="diffusers is not installed"),
    pytest.mark.usefixtures("one_thread"),
]


def _pair():
    """(ours with diffusers' weights, diffusers) for the tiny config, norms' affines drawn too."""
    theirs = DiffusersAutoencoderKL.from_config(AutoencoderKLConfig.tiny().to_dict()).eval()
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    ours = AutoencoderKL.from_config(theirs.config, backend="reference").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def test_forward_takes_diffusers_positional_arguments():
    """diffusers' forward is (sample, sample_posterior, return_dict, generator): vae(x, False, False) returns a
    1-tuple there; ours refused a third positional argument (TypeError)."""
    ours, theirs = _pair()
    theirs64 = copy.deepcopy(theirs).double()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = ours(x, False, False)
        assert isinstance(out, tuple) and len(out) == 1
        ref, ref64 = theirs(x, False, False)[0], theirs64(x.double(), False, False)[0]
        assert_criterion(out[0], ref, ref64, "forward(x, False, False)")
        drawn = ours(x, True, True, torch.Generator().manual_seed(3)).sample
        want = theirs(x, True, True, torch.Generator().manual_seed(3)).sample
        # diffusers' float32 draw on that generator, decoded by diffusers in float64.
        post64 = theirs64.encode(x.double()).latent_dist
        eps = torch.randn(post64.mean.shape, generator=torch.Generator().manual_seed(3)).double()
        want64 = theirs64.decode(post64.mean + post64.std * eps).sample
        assert_criterion(drawn, want, want64, "forward(x, True, True, generator)")
        assert torch.equal(ours(x, True, seed=5).sample, ours(x, True, seed=5).sample)  # seed stays a keyword


def test_float64_posterior_sample_from_a_generator_is_diffusers():
    """diffusers draws eps with randn in the moments' dtype; in float64 that is another stream than float32's,
    so a float64 model sampled from a generator gave a different z (and image) than diffusers' float64 model."""
    ours, theirs = _pair()
    ours, theirs = ours.double(), theirs.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        post, ref = ours.encode(x).latent_dist, theirs.encode(x).latent_dist
        for layout in (torch.contiguous_format, torch.channels_last):
            z = post.sample(generator=torch.Generator().manual_seed(5))
            want = ref.sample(generator=torch.Generator().manual_seed(5))
            assert_criterion(z, want, want, "float64 sample")
            z2, kl = post.sample_with_kl(generator=torch.Generator().manual_seed(5))
            assert_criterion(z2, want, want, "float64 sample_with_kl")
            assert_criterion(kl, ref.kl(), ref.kl(), "kl", relative_floor=True)
            post = type(post)(post.moments.to(memory_format=layout), backend="reference")
        images = ours(x, True, generator=torch.Generator().manual_seed(7)).sample
        want = theirs(x, True, generator=torch.Generator().manual_seed(7)).sample
        assert_criterion(images, want, want, "float64 sampled forward")
