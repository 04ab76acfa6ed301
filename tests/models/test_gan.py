"""ModulatedConv2d (fused, grouped, eager: one function), the StyleGAN2-style generator, the ResNet
discriminator, the truncation trick, the R1 penalty and the EMA, on CPU (reference backend)."""

from __future__ import annotations

import math

import pytest
import torch

import genkernels
from genkernels.models import Discriminator, GANConfig, Generator, gan
from genkernels.models._layers import with_torch_layers
from genkernels.nn import EqualizedLinear, ModulatedConv2d
from tests.criterion import assert_criterion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _reference():
    with genkernels.backend("reference"):
        yield


def _layer(**kwargs) -> ModulatedConv2d:
    """A layer with nonzero bias and noise strength (both start at zero) so every epilogue term counts."""
    layer = ModulatedConv2d(**kwargs)
    with torch.no_grad():
        layer.bias.normal_()
        if layer.use_noise:
            layer.noise_strength.fill_(0.7)
        layer.affine.bias.add_(torch.randn_like(layer.affine.bias) * 0.3)
    return layer


def _run(layer: ModulatedConv2d, x, w, noise_mode, *, grouped: bool, torch_layers: bool):
    """(out, grads of x, w and every parameter) of ``layer`` computed on one path."""
    layer.grouped, layer.torch_layers, layer.affine.torch_layers = grouped, torch_layers, torch_layers
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x, w, noise_mode)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    grads = {"x": x.grad, "w": w.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return out, grads


LAYERS = {
    "conv3x3": dict(in_channels=5, out_channels=7, kernel_size=3, w_dim=6, resolution=5),
    "conv3x3_up_clamp": dict(
        in_channels=3, out_channels=6, kernel_size=3, w_dim=4, up=True, resolution=10, conv_clamp=0.5
    ),
    "torgb": dict(
        in_channels=5, out_channels=3, kernel_size=1, w_dim=6, demodulate=False, act="linear", use_noise=False
    ),
    "no_demod_tanh": dict(
        in_channels=4, out_channels=5, kernel_size=3, w_dim=3, demodulate=False, act="tanh", resolution=5
    ),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("noise_mode", ["const", "none"])
def test_modulated_conv_paths_are_one_function(name, noise_mode):
    """The fused path (shared conv + epilogue) and the grouped path match the eager StyleGAN2 formulation:
    outputs and the gradients of x, w and every parameter, by the criterion against float64 eager truth."""
    spec = LAYERS[name]
    layer = _layer(**spec)
    x = torch.randn(3, spec["in_channels"], 5, 5) * 2
    w = torch.randn(3, spec["w_dim"])
    layer64 = _layer(**spec).double()
    layer64.load_state_dict(layer.state_dict())
    ref64, ref64_grads = _run(layer64, x.double(), w.double(), noise_mode, grouped=False, torch_layers=True)
    ref, ref_grads = _run(layer, x, w, noise_mode, grouped=False, torch_layers=True)
    for grouped in (False, True):
        out, grads = _run(layer, x, w, noise_mode, grouped=grouped, torch_layers=False)
        assert out.shape == ref64.shape and out.dtype == torch.float32
        assert_criterion(out, ref, ref64, f"{name} grouped={grouped}: out")
        assert grads.keys() == ref64_grads.keys()
        for key, g in grads.items():
            if ref64_grads[key] is None:  # noise_strength with noise_mode="none"
                assert g is None, key
                continue
            assert_criterion(g, ref_grads[key], ref64_grads[key], f"{name} grouped={grouped}: d{key}", True)


def test_modulated_conv_noise_modes():
    layer = _layer(in_channels=2, out_channels=3, kernel_size=3, w_dim=4, resolution=6)
    x, w = torch.randn(2, 2, 6, 6), torch.randn(2, 4)
    const = layer(x, w, "const")
    assert torch.equal(const, layer(x, w, "const"))
    torch.manual_seed(1)
    a = layer(x, w, "random")
    torch.manual_seed(1)
    assert torch.equal(a, layer(x, w, "random")) and not torch.equal(a, layer(x, w, "random"))
    with torch.no_grad():
        layer.noise_strength.zero_()
    assert torch.equal(layer(x, w, "none"), layer(x, w, "random"))
    with pytest.raises(ValueError, match="noise_mode must be one of"):
        layer(x, w, "fixed")
    with pytest.raises(ValueError, match="the output is 4x4 but noise_const is 6x6"):
        layer(x[:, :, :4, :4], w, "const")
    free = ModulatedConv2d(2, 3, 3, 4)  # no resolution: random noise only
    assert free(x, w).shape == (2, 3, 6, 6)
    with pytest.raises(ValueError, match="noise_mode='const' needs the layer's noise_const buffer"):
        free(x, w, "const")


def test_modulated_conv_parameters_and_errors():
    layer = ModulatedConv2d(4, 6, 3, 5, resolution=8)
    names = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert names == {
        "weight": (6, 4, 3, 3),
        "bias": (6,),
        "noise_strength": (),
        "affine.weight": (4, 5),
        "affine.bias": (4,),
    }
    assert layer.state_dict()["noise_const"].shape == (1, 1, 8, 8)
    assert torch.equal(layer.affine.bias, torch.ones(4)) and torch.equal(layer.bias, torch.zeros(6))
    assert set(dict(ModulatedConv2d(4, 3, 1, 5, use_noise=False).named_parameters())) == {
        "weight",
        "bias",
        "affine.weight",
        "affine.bias",
    }
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ModulatedConv2d(4, 6, 2, 5)
    with pytest.raises(ValueError, match="in_channels must be a positive int, got 0"):
        ModulatedConv2d(0, 6, 3, 5)
    with pytest.raises(ValueError, match="act must be one of"):
        ModulatedConv2d(4, 6, 3, 5, act="swish")
    with pytest.raises(ValueError, match="conv_clamp must be None or a finite number > 0"):
        ModulatedConv2d(4, 6, 3, 5, conv_clamp=-1.0)
    with pytest.raises(ValueError, match=r"x must be \(N, 4, H, W\), got \(2, 3, 8, 8\)"):
        layer(torch.randn(2, 3, 8, 8), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"w must be \(N, w_dim\) = \(2, 5\), got \(3, 5\)"):
        layer(torch.randn(2, 4, 8, 8), torch.randn(3, 5))


def test_equalized_linear_lr_mul():
    """Stored weight N(0, 1) / lr_mul and bias init / lr_mul; the map is x @ (W lr_mul / sqrt(in)).T + b lr_mul."""
    fc = EqualizedLinear(16, 4, bias_init=0.5, lr_mul=0.01)
    x = torch.randn(3, 16)
    want = x @ (fc.weight * 0.01 / 4).T + fc.bias * 0.01
    torch.testing.assert_close(fc(x), want)
    torch.testing.assert_close(fc.bias * 0.01, torch.full((4,), 0.5))
    lrelu = EqualizedLinear(16, 4, act="lrelu")
    assert torch.allclose(lrelu(x), torch.nn.functional.leaky_relu(x @ (lrelu.weight / 4).T, 0.2) * math.sqrt(2))


@pytest.mark.parametrize("shape", [(3, 16), (2, 4, 16), (2, 3, 4, 16)], ids=["2-D", "3-D", "4-D"])
def test_equalized_linear_leading_dims(shape):
    """The bias runs along the last dim for any leading dims, as F.linear's does: fused and eager layers agree,
    including a 3-D x whose middle dim equals out_features (a bias along dim 1 would be silently wrong there)."""
    fused = EqualizedLinear(16, 4, act="lrelu")
    torch.nn.init.normal_(fused.bias)
    eager = EqualizedLinear(16, 4, act="lrelu", torch_layers=True)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(fused(x), eager(x))
    want = torch.nn.functional.leaky_relu(x @ (fused.weight / 4).T + fused.bias, 0.2) * math.sqrt(2)
    torch.testing.assert_close(fused(x), want)


# --------------------------------------------------------------------------- generator and discriminator


@pytest.mark.parametrize("resolution", [8, 16, 32, 64, 128, 256])
def test_shapes_at_every_resolution(resolution):
    """Construction and a forward of both networks; at 128 and 256 with 1 channel per layer (tiny channel_base)."""
    base = 64 if resolution <= 32 else 256
    cfg = GANConfig.tiny(resolution, img_channels=3, channel_base=base, channel_max=4)
    G, D = Generator(cfg), Discriminator(cfg)
    assert cfg.num_ws == 2 * (int(math.log2(resolution)) - 1) + 1
    assert [b.res for b in G.synthesis.blocks] == cfg.resolutions
    assert len(D.blocks) == len(cfg.resolutions) - 1
    z = torch.randn(2, cfg.z_dim)
    ws = G.mapping(z)
    assert ws.shape == (2, cfg.num_ws, cfg.w_dim)
    with torch.no_grad():
        img = G(z)
        assert img.shape == (2, 3, resolution, resolution) and torch.isfinite(img).all()
        torch.testing.assert_close(G.synthesis(G.mapping(z), noise_mode="none"), G(z, noise_mode="none"))
        logits = D(img)
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


def test_config_presets_and_errors():
    sg2 = GANConfig.stylegan2()
    assert (sg2.resolution, sg2.z_dim, sg2.w_dim, sg2.mapping_layers, sg2.img_channels) == (256, 512, 512, 8, 3)
    assert [sg2.channels(r) for r in sg2.resolutions] == [512, 512, 512, 512, 512, 256, 128]
    digits = GANConfig.digits()
    assert digits.resolution == 16 and digits.img_channels == 1
    assert GANConfig.from_json(digits.to_json()) == digits
    for bad in (4, 12, 512, 16.0, "16", True):
        with pytest.raises(ValueError, match="resolution must be a power of 2 from 8 to 256"):
            GANConfig(resolution=bad)
    with pytest.raises(ValueError, match="ema_beta must be in"):
        GANConfig(ema_beta=1.0)
    with pytest.raises(ValueError, match="r1_gamma must be a finite number >= 0"):
        GANConfig(r1_gamma=-1.0)
    with pytest.raises(ValueError, match="unknown GANConfig keys"):
        GANConfig.from_dict({"resolution": 8, "depth": 3})
    G = Generator(GANConfig.tiny())
    with pytest.raises(ValueError, match=r"z must be \(N, z_dim\) = \(N, 8\)"):
        G(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"img must be \(N, 1, 8, 8\)"):
        Discriminator(GANConfig.tiny())(torch.randn(2, 1, 16, 16))


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Random nonzero biases and noise strengths, as after training (they start at zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("noise_strength"):
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_generator_paths_are_one_function():
    """Fused, grouped and eager generators with the same weights give the same images (float64)."""
    cfg = GANConfig.tiny(16, conv_clamp=2.0)
    G = _trained_like(Generator(cfg)).double().eval()
    with torch.no_grad():
        G.mapping.w_avg.normal_()
    grouped = Generator(cfg, grouped=True).double().eval()
    grouped.load_state_dict(G.state_dict())
    eager = with_torch_layers(G)
    z = torch.randn(3, cfg.z_dim, dtype=torch.float64)
    with torch.no_grad():
        want = eager(z, truncation_psi=0.7, noise_mode="const")
        torch.testing.assert_close(G(z, truncation_psi=0.7, noise_mode="const"), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(grouped(z, truncation_psi=0.7, noise_mode="const"), want, rtol=0, atol=1e-12)


def test_truncation():
    """psi = 0 maps every z to w_avg: identical images with the same (const) noise; the cutoff keeps later
    layers' w untruncated."""
    cfg = GANConfig.tiny(8)
    G = _trained_like(Generator(cfg)).eval()
    with torch.no_grad():
        G.mapping.w_avg.normal_()
        z = torch.randn(4, cfg.z_dim)
        images = G(z, truncation_psi=0.0, noise_mode="const")
        assert images.abs().max() > 0
        torch.testing.assert_close(images, images[:1].expand_as(images), rtol=0, atol=1e-6)
        assert not torch.allclose(G(z, noise_mode="const")[0], G(z, noise_mode="const")[1])
        ws = G.mapping(z, truncation_psi=0.5, truncation_cutoff=2)
        full = G.mapping(z)
        torch.testing.assert_close(ws[:, :2], G.mapping.w_avg.lerp(full[:, :2], 0.5))
        torch.testing.assert_close(ws[:, 2:], full[:, 2:])


def test_w_avg_tracks_w_in_training_only():
    cfg = GANConfig.tiny(8)
    G = Generator(cfg)
    z = torch.randn(5, cfg.z_dim)
    with torch.no_grad():
        G.eval()(z)
        assert torch.equal(G.mapping.w_avg, torch.zeros(cfg.w_dim))
        w = G.mapping(z)[:, 0].mean(0)
        G.train()(z)
    torch.testing.assert_close(G.mapping.w_avg, w * (1 - gan.W_AVG_BETA))


def test_minibatch_stddev():
    """Group g of the std layer: samples n with n mod (N / G) = g; G the largest divisor of N up to the group."""
    x = torch.randn(6, 3, 2, 2)
    out = gan.minibatch_stddev(x, 4)  # G = 3 (6 is not a multiple of 4)
    assert out.shape == (6, 4, 2, 2) and torch.equal(out[:, :3], x)
    for g in range(2):
        members = x[g::2]
        want = (members.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        torch.testing.assert_close(out[g::2, 3], want.expand(3, 2, 2))
    assert gan.minibatch_stddev(x[:1], 4)[:, 3].abs().max() < 1e-3  # one sample: a group of one
    assert gan.minibatch_stddev(x[:0], 4).shape == (0, 4, 2, 2)  # no samples: an empty batch, no error
    D = Discriminator(GANConfig.tiny(8))
    assert D(torch.randn(0, 1, 8, 8)).shape == (0, 1)


def test_losses():
    fake, real = torch.tensor([[0.5], [-1.0]]), torch.tensor([[2.0], [0.0]])
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(gan.generator_loss(fake), sp(-fake).mean())
    torch.testing.assert_close(gan.discriminator_loss(fake, real), sp(fake).mean() + sp(-real).mean())


def test_r1_penalty_through_the_fused_ops():
    """R1 and its gradient (a double backward through bias_act) are finite and match the eager discriminator's
    (float64), and ||grad||^2 matches a finite difference of D along the gradient."""
    cfg = GANConfig.tiny(8, mbstd_group=2)
    D = _trained_like(Discriminator(cfg)).double()
    eager = with_torch_layers(D)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    results = []
    for model in (D, eager):
        model.zero_grad(set_to_none=True)
        loss = gan.r1_loss(model, x, gamma=0.5, interval=4)
        loss.backward()
        # Biases get no gradient: with lrelu, grad_x D does not depend on them (piecewise linear).
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        assert torch.isfinite(loss) and loss > 0
        assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=0)
    for g, g_eager in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g, g_eager, rtol=1e-9, atol=1e-12)
    penalty, logits = gan.r1_penalty(D, x)
    assert penalty.shape == (4,) and penalty.dtype == torch.float32 and logits.shape == (4, 1)
    torch.testing.assert_close(results[0][0].float(), penalty.mean() * (0.5 / 2 * 4))


def test_update_ema():
    cfg = GANConfig.tiny(8)
    G = Generator(cfg)
    ema = gan.ema_copy(G)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        G.mapping.w_avg.fill_(3.0)
    gan.update_ema(ema, G, 0.9)
    for b, p_ema, p in zip(before, ema.parameters(), G.parameters()):
        torch.testing.assert_close(p_ema, 0.9 * b + 0.1 * p)
    assert torch.equal(ema.mapping.w_avg, G.mapping.w_avg)
    with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\], got 2.0"):
        gan.update_ema(ema, G, 2.0)
    other = Generator(GANConfig.tiny(16))  # one block more: its parameters differ
    with pytest.raises(ValueError, match="ema and model must have the same parameters"):
        gan.update_ema(ema, other, 0.9)
    with pytest.raises(ValueError, match="truncation_cutoff must be None or an int >= 0"):
        G.mapping(torch.randn(2, cfg.z_dim), truncation_psi=0.5, truncation_cutoff=-1)


def test_set_backend():
    G, D = Generator(GANConfig.tiny()), Discriminator(GANConfig.tiny())
    G.set_backend("reference")
    D.set_backend("reference")
    assert all(m.backend == "reference" for m in [*G.modules(), *D.modules()] if hasattr(m, "backend"))
    assert G.synthesis.blocks[0].conv0.backend == "reference" and D.fromrgb.backend == "reference"
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'tpu'"):
        G.set_backend("tpu")
