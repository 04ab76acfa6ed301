"""The VAE (AutoencoderKL): diffusers' weights, config and results; slicing, tiling, layouts, gradients.

Comparisons follow tests/criterion.py with out = our model (float32), ref = diffusers' AutoencoderKL
with the same weights (float32) and ref64 = diffusers in float64: an independent implementation is
the truth, and ours must be as close to it as diffusers itself is in float32.
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch

import genkernels
from genkernels.models import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from genkernels.models._layers import TorchAttention, TorchGroupNormSiLU
from genkernels.models.vae import with_torch_layers
from tests.criterion import assert_criterion

# diffusers is the independent truth of the parity tests; where it is not installed (the GPU machines'
# image has none) those skip and the tests of our model alone still run.
try:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
except ImportError:
    DiffusersAutoencoderKL = DiagonalGaussianDistribution = None
needs_diffusers = pytest.mark.skipif(DiffusersAutoencoderKL is None, reason="diffusers is not installed")

# Two shapes of the network: the tiny preset (2 levels, mid attention, both 1x1 convs), and 3 levels with
# two blocks per level, one input and two output channels, no mid attention and no quant convs.
CONFIGS = {
    "tiny": AutoencoderKLConfig.tiny(),
    "deep": AutoencoderKLConfig.tiny(
        in_channels=1,
        out_channels=2,
        block_out_channels=(4, 8, 8),
        layers_per_block=2,
        latent_channels=3,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


def _randomize_norms(vae: torch.nn.Module) -> None:
    """Norms' weights and biases drawn too (not 1 and 0), so a dropped affine would show."""
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)


def _ours(name: str, seed: int = 0) -> AutoencoderKL:
    """Our model for ``CONFIGS[name]`` with random weights, on the reference backend; no diffusers needed."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(CONFIGS[name], backend="reference").eval()
    _randomize_norms(vae)
    return vae


def _diffusers_vae(config: AutoencoderKLConfig, seed: int = 0) -> "DiffusersAutoencoderKL":
    """diffusers' model for ``config``, random weights; norms' weights and biases drawn too (not 1 and 0)."""
    torch.manual_seed(seed)
    vae = DiffusersAutoencoderKL.from_config(config.to_dict()).eval()
    _randomize_norms(vae)
    return vae


def _pair(name: str) -> tuple[AutoencoderKL, "DiffusersAutoencoderKL", "DiffusersAutoencoderKL"]:
    """(ours with diffusers' weights, diffusers float32, diffusers float64)."""
    theirs = _diffusers_vae(CONFIGS[name])
    ours = AutoencoderKL.from_config(theirs.config, backend="reference").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs, copy.deepcopy(theirs).double()


def _image(config: AutoencoderKLConfig, batch: int, size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.in_channels, *size, generator=g)


def _latent(config: AutoencoderKLConfig, batch: int, size: tuple[int, int], seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.latent_channels, *size, generator=g)


@needs_diffusers
def test_state_dict_keys_and_config_match_diffusers():
    for config in CONFIGS.values():
        theirs = _diffusers_vae(config)
        ours = AutoencoderKL.from_config(theirs.config)
        assert ours.config == config
        shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        # Our config builds the same diffusers model back; JSON round trip; diffusers' "_" keys are ignored.
        assert DiffusersAutoencoderKL.from_config(ours.config.to_dict()).config == theirs.config
        assert AutoencoderKLConfig.from_json(config.to_json()) == config
        assert AutoencoderKLConfig.from_dict({**config.to_dict(), "_class_name": "AutoencoderKL"}) == config
    # The SD preset is the SD 1.x / 2.x VAE: same keys and shapes as diffusers' (both built on meta).
    with torch.device("meta"):
        ours, theirs = (
            AutoencoderKL(AutoencoderKLConfig.sd()),
            DiffusersAutoencoderKL(**AutoencoderKLConfig.sd().to_dict()),
        )
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert 83e6 < sum(p.numel() for p in ours.parameters()) < 84e6
    # Defaults are diffusers' defaults; keyword overrides; a single block type applies to every level.
    signature = inspect.signature(DiffusersAutoencoderKL.__init__).parameters
    assert AutoencoderKLConfig().to_dict() == {k: p.default for k, p in signature.items() if k != "self"}
    model = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=2)
    assert model.config.down_block_types == ("DownEncoderBlock2D",) * 2 and model.config.latent_channels == 2


@needs_diffusers
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_matches_diffusers(name):
    ours, theirs, theirs64 = _pair(name)
    x = _image(ours.config, 2, (16, 12))
    with torch.no_grad():
        post = ours.encode(x).latent_dist
        ref, ref64 = theirs.encode(x).latent_dist, theirs64.encode(x.double()).latent_dist
        assert isinstance(post, DiagonalGaussian) and ours.encode(x, return_dict=False)[0].mean.shape == post.mean.shape
        ds = ours.config.downscale
        assert post.mean.shape == (2, ours.config.latent_channels, 16 // ds, 12 // ds)
        for attr in ("mean", "logvar", "std", "var"):
            assert_criterion(getattr(post, attr), getattr(ref, attr), getattr(ref64, attr), attr)
        assert_criterion(post.mode(), ref.mode(), ref64.mode(), "mode")
        assert_criterion(post.kl(), ref.kl(), ref64.kl(), "kl", relative_floor=True)
        # A sample drawn from a generator is diffusers' sample for the same generator state: eps = randn on it.
        draws = [d.sample(generator=torch.Generator().manual_seed(5)) for d in (post, ref)]
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(5)).double()
        assert_criterion(draws[0], draws[1], ref64.mean + ref64.std * eps, "sample")


@needs_diffusers
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_and_forward_match_diffusers(name):
    ours, theirs, theirs64 = _pair(name)
    z = _latent(ours.config, 2, (4, 6))
    x = _image(ours.config, 2, (8, 12))
    with torch.no_grad():
        out = ours.decode(z).sample
        assert out.shape == (2, ours.config.out_channels, 4 * ours.config.downscale, 6 * ours.config.downscale)
        assert torch.equal(ours.decode(z, return_dict=False)[0], out)
        assert_criterion(out, theirs.decode(z).sample, theirs64.decode(z.double()).sample, "decode")
        assert_criterion(ours(x).sample, theirs(x).sample, theirs64(x.double()).sample, "forward")
        # Sampling the posterior with a generator draws diffusers' noise (float32 randn on the generator).
        drawn = [m(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample for m in (ours, theirs)]
        post64 = theirs64.encode(x.double()).latent_dist
        eps = torch.randn(post64.mean.shape, generator=torch.Generator().manual_seed(3)).double()
        assert_criterion(drawn[0], drawn[1], theirs64.decode(post64.mean + post64.std * eps).sample, "sampled forward")
        # seed: reproducible, and a sample differs from the mode.
        assert torch.equal(ours(x, True, seed=7).sample, ours(x, True, seed=7).sample)
        assert (ours(x, True, seed=7).sample - ours(x).sample).abs().max() > 1e-3


@needs_diffusers
def test_sliced_encode_and_decode_match_diffusers():
    ours, theirs, theirs64 = _pair("tiny")
    for model in (ours, theirs, theirs64):
        model.enable_slicing()
    z, x = _latent(ours.config, 3, (4, 4)), _image(ours.config, 3, (8, 8))
    with torch.no_grad():
        out = ours.decode(z).sample
        assert_criterion(out, theirs.decode(z).sample, theirs64.decode(z.double()).sample, "sliced decode")
        post = ours.encode(x).latent_dist
        ref, ref64 = theirs.encode(x).latent_dist, theirs64.encode(x.double()).latent_dist
        assert_criterion(post.mean, ref.mean, ref64.mean, "sliced encode")
        ours.disable_slicing()
        torch.testing.assert_close(ours.decode(z).sample, out, rtol=1e-5, atol=1e-5)


def _tiled(model, sample_tile: int, latent_tile: int):
    """Tiling on, with tiles of the given sizes (diffusers' enable_tiling takes none: set its attributes)."""
    if isinstance(model, AutoencoderKL):
        model.enable_tiling(tile_sample_min_size=sample_tile)
        assert model.tile_latent_min_size == latent_tile
    else:
        model.enable_tiling()
        model.tile_sample_min_size, model.tile_latent_min_size = sample_tile, latent_tile
    return model


@needs_diffusers
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiled_decode_and_encode_match_diffusers(name):
    """A latent several tiles wide and not a whole number of steps: each decoded tile blended with its
    neighbours above and to the left, as diffusers' tiled_decode does (and tiled encoding likewise)."""
    ours, theirs, theirs64 = _pair(name)
    factor = ours.config.downscale
    latent_tile = 4
    z = _latent(ours.config, 1, (11, 7))
    x = _image(ours.config, 1, (factor * 9, factor * 7))
    with torch.no_grad():
        untiled = ours.decode(z).sample
        untiled_moments = ours.encode(x).latent_dist.moments
        for model in (ours, theirs, theirs64):
            _tiled(model, latent_tile * factor, latent_tile)
        out = ours.decode(z).sample
        assert out.shape == untiled.shape
        assert_criterion(out, theirs.decode(z).sample, theirs64.decode(z.double()).sample, "tiled decode")
        assert (out - untiled).abs().max() > 1e-3  # tiling did happen
        post = ours.encode(x).latent_dist
        ref, ref64 = theirs.encode(x).latent_dist, theirs64.encode(x.double()).latent_dist
        assert post.moments.shape == untiled_moments.shape
        assert_criterion(post.moments, ref.parameters, ref64.parameters, "tiled encode")
        assert (post.moments - untiled_moments).abs().max() > 1e-3
        # A latent no larger than a tile decodes untiled.
        small = z[:, :, :latent_tile, :latent_tile]
        ours.disable_tiling()
        want = ours.decode(small).sample
        ours.enable_tiling(tile_sample_min_size=latent_tile * factor)
        assert torch.equal(ours.decode(small).sample, want)


def test_torch_layers_model_is_the_same_function():
    ours = _ours("tiny")
    ours = ours.double()
    twin = with_torch_layers(ours)
    assert twin.torch_layers and twin.encoder.conv_in.weight is ours.encoder.conv_in.weight  # shared, not copied
    kinds = {type(m) for m in twin.modules()}
    assert TorchGroupNormSiLU in kinds and torch.nn.GroupNorm in kinds
    assert any(isinstance(m, TorchAttention) for m in twin.modules())
    assert not any(
        isinstance(m, (genkernels.nn.GroupNorm, genkernels.nn.Attention)) and not isinstance(m, TorchAttention)
        for m in twin.modules()
    )
    built = AutoencoderKL(ours.config, torch_layers=True).double()
    built.load_state_dict(ours.state_dict(), strict=True)
    x = _image(ours.config, 2, (8, 8)).double()
    with torch.no_grad():
        want = ours(x).sample
        for model in (twin, built):
            torch.testing.assert_close(model(x).sample, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_channels_last_gives_the_same_result(name):
    ours = _ours(name)
    x = _image(ours.config, 2, (8, 8))
    z = _latent(ours.config, 2, (4, 4))
    with torch.no_grad():
        cl = ours.encode(x.to(memory_format=torch.channels_last)).latent_dist
        post = ours.encode(x).latent_dist
        torch.testing.assert_close(cl.moments, post.moments, rtol=1e-5, atol=1e-5)
        # (In-kernel noise follows memory order, so the layouts differ there: compare on given noise.)
        noise = torch.randn_like(post.mean)
        torch.testing.assert_close(cl.sample(noise=noise), post.sample(noise=noise), rtol=1e-5, atol=1e-5)
        assert cl.sample(seed=3).is_contiguous(memory_format=torch.channels_last)
        out = ours.decode(z.to(memory_format=torch.channels_last)).sample
        torch.testing.assert_close(out, ours.decode(z).sample, rtol=1e-5, atol=1e-5)


@needs_diffusers
def test_gradients_match_diffusers():
    """A training step's loss: L1 reconstruction through a posterior sample plus the KL; gradients of every
    parameter finite, nonzero and as close to diffusers' float64 ones as diffusers' float32 ones are."""
    ours, theirs, theirs64 = _pair("tiny")
    x = _image(ours.config, 2, (8, 8))
    noise = _latent(ours.config, 2, (4, 4), seed=9)

    def loss(model, x, sample):
        post = model.encode(x).latent_dist
        z, kl = sample(post)
        return (model.decode(z).sample - x).abs().mean() + 1e-2 * kl.mean()

    loss(ours, x, lambda p: p.sample_with_kl(noise=noise)).backward()
    loss(theirs, x, lambda p: (p.mean + p.std * noise, p.kl())).backward()
    loss(theirs64, x.double(), lambda p: (p.mean + p.std * noise.double(), p.kl())).backward()
    grads64 = dict(theirs64.named_parameters())
    for key, p in theirs.named_parameters():
        mine = ours.get_parameter(key).grad
        assert mine is not None and torch.isfinite(mine).all() and mine.abs().max() > 0, key
        assert_criterion(mine, p.grad, grads64[key].grad, key, relative_floor=True)
    # In-kernel noise from a seed: the backward runs too.
    ours.zero_grad()
    loss(ours, x, lambda p: p.sample_with_kl(seed=1, offset=4)).backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


@needs_diffusers
def test_posterior():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 5, 3, generator=g) * 3
    moments[0, 5, 0, 0] = 40.0  # logvar beyond the clamp
    post, ref = DiagonalGaussian(moments, backend="reference"), DiagonalGaussianDistribution(moments)
    ref64 = DiagonalGaussianDistribution(moments.double())
    for attr in ("mean", "logvar", "std", "var"):
        assert_criterion(getattr(post, attr), getattr(ref, attr), getattr(ref64, attr), attr, relative_floor=True)
    kl = post.kl()
    assert kl.shape == (3,) and kl.dtype == torch.float32
    assert_criterion(kl, ref.kl(), ref64.kl(), "kl", relative_floor=True)
    z, kl2 = post.sample_with_kl(seed=11, offset=2)
    torch.testing.assert_close(kl2, kl)
    assert torch.equal(post.sample(seed=11, offset=2), z)
    assert not torch.equal(post.sample(seed=11, offset=3), z)
    noise = torch.randn(3, 4, 5, 3, generator=g)
    assert_criterion(post.sample(noise=noise), ref.mean + ref.std * noise, ref64.mean + ref64.std * noise.double())
    assert post.mode().data_ptr() == moments.data_ptr()  # a view, no copy
    det = DiagonalGaussian(moments, deterministic=True)
    assert torch.equal(det.sample(seed=1), post.mean) and det.std.abs().max() == 0 and det.kl().abs().max() == 0
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussian(torch.randn(2, 3, 4, 4))


def test_posterior_kl_to_another_and_nll():
    """kl(other) and nll(sample) (diffusers' DiagonalGaussianDistribution API) against torch.distributions in
    float64, summed over every non-batch dim (nll: or over the dims given)."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(2, 6, 4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    post, other = DiagonalGaussian(a, backend="reference"), DiagonalGaussian(b, backend="reference")
    p = torch.distributions.Normal(post.mean, post.std)
    q = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(post.kl(other), torch.distributions.kl_divergence(p, q).sum((1, 2, 3)))
    torch.testing.assert_close(post.kl(None), post.kl())
    sample = torch.randn(2, 3, 4, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(post.nll(sample), -p.log_prob(sample).sum((1, 2, 3)))
    torch.testing.assert_close(post.nll(sample, dims=(1, 2)), -p.log_prob(sample).sum((1, 2)))
    det = DiagonalGaussian(a, deterministic=True)
    assert det.kl(other).abs().max() == 0 and det.nll(sample).abs().max() == 0
    with pytest.raises(ValueError, match=r"other must be None or a DiagonalGaussian of shape \(2, 3, 4, 3\)"):
        post.kl(DiagonalGaussian(b[:, :4]))
    with pytest.raises(ValueError, match="sample must have the posterior's shape"):
        post.nll(sample[:, :2])


def test_set_backend_pins_every_op():
    model = AutoencoderKL(AutoencoderKLConfig.tiny())
    model.set_backend("reference")
    layers = (genkernels.nn.GroupNorm, genkernels.nn.Attention)
    pinned = [m.backend for m in model.modules() if isinstance(m, layers)]
    assert len(pinned) > 10 and set(pinned) == {"reference"}
    assert model.encode(torch.randn(1, 3, 8, 8)).latent_dist.backend == "reference"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_same_result_on_every_backend(backend, device):
    """Same weights: decode, encode and a seeded posterior sample on ``backend`` (float32) vs the reference
    in float64, within the criterion."""
    ours = _ours("tiny")
    ours = ours.to(device)
    x = _image(ours.config, 1, (8, 8)).to(device)
    for name, args in (
        ("group_norm", (x.new_empty(1, 16, 4, 4), 4, None, None, 1e-6, "silu")),
        ("attention", (x.new_empty(1, 1, 16, 16),) * 3),
        ("reparameterize", (x.new_empty(1, 4, 4, 4), x.new_empty(1, 4, 4, 4))),
    ):
        reason = genkernels.explain(name, *args)[backend]
        if reason is not None:
            pytest.skip(f"{backend} cannot run {name} here: {reason}")
    with torch.no_grad():
        outs = [m(x, True, seed=4).sample for m in (ours, copy.deepcopy(ours).set_backend(backend))]
        ref64 = copy.deepcopy(ours).double()(x.double(), True, seed=4).sample
    assert_criterion(outs[1], outs[0], ref64)


def test_bad_configs_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="act_fn must be 'silu'.*got 'gelu'"):
        AutoencoderKLConfig(act_fn="gelu")
    with pytest.raises(ValueError, match="block type 'AttnDownEncoderBlock2D' is not supported"):
        AutoencoderKLConfig(
            block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
        )
    with pytest.raises(ValueError, match="up_block_types must name one block type per level"):
        AutoencoderKLConfig(block_out_channels=(8, 16, 32), norm_num_groups=4, up_block_types=("UpDecoderBlock2D",) * 2)
    with pytest.raises(ValueError, match="norm_num_groups=32 must divide every level's channels"):
        AutoencoderKLConfig(block_out_channels=(48,))
    with pytest.raises(ValueError, match="latent_channels must be a positive int, got 0"):
        AutoencoderKLConfig(latent_channels=0)
    with pytest.raises(ValueError, match=r"unknown AutoencoderKLConfig keys \['bogus'\]"):
        AutoencoderKLConfig.from_dict({"bogus": 1, "_class_name": "AutoencoderKL"})
    with pytest.raises(ValueError, match="unknown AutoencoderKLConfig keys"):
        AutoencoderKL.from_config(json.loads('{"norm_type": "spatial"}'))
    model = AutoencoderKL(AutoencoderKLConfig.tiny(), backend="reference")
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        model.encode(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"z must be \(B, 4, h, w\)"):
        model.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="tile_sample_min_size must be an int >= 2"):
        model.enable_tiling(tile_sample_min_size=1)
    with pytest.raises(ValueError, match="tile_overlap_factor must be in"):
        model.enable_tiling(tile_overlap_factor=1.0)
