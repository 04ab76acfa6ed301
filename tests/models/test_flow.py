"""The flow models (genkernels.models.flow): Glow's exact inverse and log-determinant, log p(x) and its
gradients, sampling, the config, argument checks; RealNVP2D fitting two moons. CPU, reference backend."""

import math

import pytest
import torch

from genkernels.models import Glow, GlowConfig, RealNVP2D
from genkernels.models.flow import gaussian_log_prob, squeeze2x2, unsqueeze2x2
from genkernels.nn import ActNorm, AffineCoupling
from genkernels.ops.coupling import SCALES
from tests.flow_checks import jacobian_logdet, perturb


def tiny(**overrides) -> Glow:
    """The tiny Glow, ActNorm-initialized on a batch, then perturbed, in eval mode."""
    model = Glow.from_config(GlowConfig.tiny(**overrides), backend="reference")
    model.log_prob(torch.rand(8, model.config.in_channels, *model.config.hw))
    return perturb(model, 0.05).eval()


def test_squeeze_is_space_to_depth():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    s = squeeze2x2(x)
    assert s.shape == (2, 12, 2, 3)
    assert s[1, 4 * 2 + 2 * 1 + 0, 1, 2] == x[1, 2, 3, 4]
    torch.testing.assert_close(unsqueeze2x2(s), x, rtol=0, atol=0)


@pytest.mark.parametrize("scale", SCALES)
def test_glow_round_trip_every_scale(scale):
    model = tiny(scale=scale)
    x = torch.rand(3, 1, 4, 4)
    zs, logdet = model(x)
    assert [tuple(z.shape) for z in zs] == [(3, 2, 2, 2), (3, 8, 1, 1)]
    assert model.latent_shapes(4, 4) == [(2, 2, 2), (8, 1, 1)]
    assert logdet.shape == (3,) and logdet.dtype == torch.float32
    x_back = model.inverse(zs)
    assert (x_back - x).abs().max() <= 1e-5 * x.abs().max()


def test_glow_round_trip_three_levels_rgb_channels_last():
    model = tiny(in_channels=3, levels=3, image_size=8)
    x = torch.rand(2, 3, 8, 8).to(memory_format=torch.channels_last)
    zs, _ = model(x)
    assert [tuple(z.shape[1:]) for z in zs] == model.latent_shapes(8, 8) == [(6, 4, 4), (12, 2, 2), (48, 1, 1)]
    assert (model.inverse(zs) - x).abs().max() <= 1e-5


@pytest.mark.parametrize("scale", ["sigmoid", "softclamp_atan"])
def test_glow_logdet_is_log_abs_det_jacobian(scale):
    model = tiny(scale=scale).double()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    _, logdet = model(x)
    assert logdet.dtype == torch.float64
    expected = jacobian_logdet(lambda v: torch.cat([z.flatten(1) for z in model(v)[0]], 1), x)
    torch.testing.assert_close(logdet, expected)


def test_log_prob_is_prior_plus_logdet():
    """With the zero-initialized priors (N(0, I) everywhere), log p(x) = log N(z; 0, I) + logdet."""
    model = Glow.from_config(GlowConfig.tiny(), backend="reference")
    x = torch.rand(4, 1, 4, 4)
    lp = model.log_prob(x)
    zs, logdet = model(x)
    z = torch.cat([z.flatten(1) for z in zs], 1)
    assert z.shape[1] == 16
    torch.testing.assert_close(lp, -0.5 * (z.square() + math.log(2 * math.pi)).sum(1) + logdet)
    bpd = model.bits_per_dim(x, n_bins=32)
    torch.testing.assert_close(bpd, (-lp + 16 * math.log(32)) / (16 * math.log(2)))


def test_gaussian_log_prob_matches_torch_distributions():
    z, mean, log_std = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), 0.3 * torch.randn(3, 2, 2, 2)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(z, mean, log_std), expected)


def test_log_prob_finite_and_gradient_reaches_every_parameter():
    model = tiny(scale="sigmoid").train()
    x = torch.rand(4, 1, 4, 4)
    lp = model.log_prob(x)
    assert lp.shape == (4,) and torch.isfinite(lp).all()
    model.bits_per_dim(x).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_actnorm_initializes_once_and_state_dict_round_trips():
    model = Glow.from_config(GlowConfig.tiny(), backend="reference")
    norms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert len(norms) == 4 and not any(bool(m.initialized) for m in norms)
    x = torch.rand(8, 1, 4, 4)
    model.log_prob(x)
    assert all(bool(m.initialized) for m in norms)
    # The first ActNorm's input is the squeezed batch: it comes out standardized per channel.
    y, _ = norms[0](squeeze2x2(x))
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    loaded = Glow.from_config(GlowConfig.tiny(), backend="reference")
    loaded.load_state_dict(model.state_dict())
    other = torch.rand(3, 1, 4, 4) * 2
    torch.testing.assert_close(loaded.log_prob(other), model.log_prob(other))  # training mode: no re-init


def test_sample_shapes_seed_and_image_size():
    model = tiny(in_channels=2)
    assert model.sample(3).shape == (3, 2, 4, 4)
    assert model.sample(2, image_size=8).shape == (2, 2, 8, 8)
    assert model.sample(1, image_size=(4, 8)).shape == (1, 2, 4, 8)
    torch.testing.assert_close(model.sample(2, seed=5), model.sample(2, seed=5), rtol=0, atol=0)
    assert not torch.equal(model.sample(2, seed=5), model.sample(2, seed=6))
    g = torch.Generator().manual_seed(5)
    torch.testing.assert_close(model.sample(2, generator=g), model.sample(2, seed=5), rtol=0, atol=0)
    assert not model.sample(2, temperature=0.5).requires_grad


def test_temperature_zero_is_the_prior_mean_path():
    model = tiny()
    x0 = model.sample(3, temperature=0.0, seed=1)
    torch.testing.assert_close(x0, model.sample(3, temperature=0.0, seed=2), rtol=0, atol=0)
    torch.testing.assert_close(x0[0], x0[2], rtol=0, atol=0)
    with torch.no_grad():
        zs, _ = model(x0)
        torch.testing.assert_close(zs[-1], model.top_mean.view(1, -1, 1, 1).expand_as(zs[-1]), atol=1e-5, rtol=0)
        h = squeeze2x2(x0)
        for step in model.levels[0].steps:
            h, _ = step(h)
        kept = h[:, : h.shape[1] // 2]
        mean, _ = model.levels[0].split_prior(kept)
        torch.testing.assert_close(zs[0], mean, atol=1e-5, rtol=0)


def test_config_presets_and_json():
    cfg = GlowConfig.digits()
    assert (cfg.in_channels, cfg.image_size, cfg.levels) == (1, 8, 2)
    assert GlowConfig.from_json(cfg.to_json()) == cfg
    rect = GlowConfig.tiny(image_size=(4, 8))
    assert GlowConfig.from_json(rect.to_json()) == rect and rect.hw == (4, 8)
    a = Glow.from_config(GlowConfig.tiny())
    b = Glow.from_config(GlowConfig.tiny().to_dict())
    c = Glow(1, 2, 2, 8, image_size=4)
    assert a.config == b.config == c.config
    assert a.state_dict().keys() == c.state_dict().keys()
    with pytest.raises(ValueError, match="unknown GlowConfig keys"):
        GlowConfig.from_dict({"levels": 2, "depth": 3})


def test_set_backend():
    model = Glow.from_config(GlowConfig.tiny())
    assert model.set_backend("reference") is model
    pinned = [m.backend for m in model.modules() if isinstance(m, (ActNorm, AffineCoupling))]
    assert len(pinned) == 8 and set(pinned) == {"reference"}
    model.set_backend(None)
    assert {m.backend for m in model.modules() if isinstance(m, (ActNorm, AffineCoupling))} == {None}
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_backend("fastest")


def test_bad_arguments():
    with pytest.raises(ValueError, match="levels must be a positive int"):
        Glow(1, 0, 2, 8)
    with pytest.raises(ValueError, match="scale must be one of"):
        Glow(1, 2, 2, 8, scale="relu")
    with pytest.raises(ValueError, match="image_size must be divisible by 2 \\*\\* levels = 4"):
        GlowConfig.tiny(image_size=6)
    with pytest.raises(ValueError, match="clamp must be"):
        GlowConfig(clamp=-1.0)
    model = Glow.from_config(GlowConfig.tiny(), backend="reference")
    with pytest.raises(ValueError, match=r"x must be \(N, 1, H, W\), got shape \(2, 3, 4, 4\)"):
        model.log_prob(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="multiples of 2 \\*\\* levels = 4, got H=6"):
        model(torch.rand(2, 1, 6, 4))
    zs, _ = model(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="zs must be a list of 2 latents"):
        model.inverse(zs[:1])
    with pytest.raises(ValueError, match=r"zs\[0\] must have shape \(2, 2, 2, 2\)"):
        model.inverse([zs[0][:, :1], zs[1]])
    with pytest.raises(ValueError, match="n must be a positive int"):
        model.sample(0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        model.sample(2, temperature=-1.0)
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        model.bits_per_dim(torch.rand(2, 1, 4, 4), n_bins=0)
    with pytest.raises(ValueError, match=r"x must be \(N, 2\) points"):
        RealNVP2D(8, 2).log_prob(torch.randn(4, 3))


def test_realnvp2d_round_trip_and_logdet():
    model = perturb(RealNVP2D(hidden=8, layers=3, backend="reference"), 0.3).double().eval()
    x = torch.randn(4, 2, dtype=torch.float64)
    z, logdet = model(x)
    torch.testing.assert_close(model.inverse(z), x)
    torch.testing.assert_close(logdet, jacobian_logdet(lambda v: model(v)[0], x))
    z32, _ = model.float()(x.float())
    assert (model.inverse(z32) - x.float()).abs().max() <= 1e-5 * x.abs().max()


def test_realnvp2d_fits_two_moons():
    """Maximum likelihood on make_moons: the NLL falls well below a Gaussian's and samples land on the moons."""
    datasets = pytest.importorskip("sklearn.datasets")
    data = torch.tensor(datasets.make_moons(512, noise=0.05, random_state=0)[0], dtype=torch.float32)
    model = RealNVP2D(hidden=32, layers=6, backend="reference")
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(200):
        loss = -model.log_prob(data).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    nll = -model.log_prob(data).mean().item()
    assert first > 1.8 and nll < 1.2, (first, nll)  # 1.8: about a Gaussian's NLL on the moons
    samples = model.sample(500, seed=0)
    assert samples.shape == (500, 2)
    nearest = torch.cdist(samples, data).min(dim=1).values
    assert (nearest < 0.15).float().mean() > 0.7
