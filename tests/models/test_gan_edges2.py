"""More edge cases of the GAN family: how often training moves w_avg, and the generator's call options
(on CPU, reference backend)."""

from __future__ import annotations

import pytest
import torch

import genkernels
from genkernels import train_gan
from genkernels.models import GANConfig, Generator, gan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _reference():
    with genkernels.backend("reference"):
        yield


def test_training_moves_w_avg_once_per_step(monkeypatch):
    """w_avg takes one EMA step per training step, in the D phase, as StyleGAN3's loss does (update_emas only
    when D's fakes are made): the G phase's call moved it a second time, a decay of 0.995^2 per step."""
    moves = []
    forward = gan.MappingNetwork.forward

    def spy(self, *args, **kwargs):
        before = self.w_avg.clone()
        ws = forward(self, *args, **kwargs)
        if not torch.equal(before, self.w_avg):
            moves.append((torch.is_grad_enabled(), ws[:, 0].detach().mean(0), before))
        return ws

    monkeypatch.setattr(gan.MappingNetwork, "forward", spy)
    data = train_gan.load_dataset("digits", 8)
    config = train_gan.GANTrainConfig(steps=3, batch_size=4, model="tiny", r1_interval=2, device="cpu")
    result = train_gan.train_gan(data, config, progress=False)
    assert len(moves) == 3  # one per step
    assert not any(grad for grad, _, _ in moves)  # the D phase makes its fakes without gradients
    for _, w_mean, before in moves:  # w_avg <- lerp(mean w, w_avg, beta), once
        assert w_mean.abs().max() > 0
    last_mean, last_before = moves[-1][1], moves[-1][2]
    want = last_mean.lerp(last_before, gan.W_AVG_BETA)
    torch.testing.assert_close(result.generator.mapping.w_avg, want, rtol=0, atol=0)
    torch.testing.assert_close(result.generator_ema.mapping.w_avg, want, rtol=0, atol=0)


def test_update_w_avg_option():
    """update_w_avg=False leaves w_avg as it is in training mode; True moves it in eval mode too; None follows
    the module's mode. The images are the same either way."""
    cfg = GANConfig.tiny(8)
    G = Generator(cfg)
    z = torch.randn(3, cfg.z_dim)
    with torch.no_grad():
        G.train()
        want = G(z, noise_mode="const", update_w_avg=False)
        assert torch.equal(G.mapping.w_avg, torch.zeros(cfg.w_dim))
        G.eval()
        torch.testing.assert_close(G(z, noise_mode="const", update_w_avg=True), want, rtol=0, atol=0)
        w = G.mapping(z, update_w_avg=False)[:, 0].mean(0)
        torch.testing.assert_close(G.mapping.w_avg, w * (1 - gan.W_AVG_BETA))
        G.mapping.w_avg.zero_()
        G(z)
        assert torch.equal(G.mapping.w_avg, torch.zeros(cfg.w_dim))
        for bad in (1, "yes", torch.tensor(True)):
            with pytest.raises(TypeError, match=r"update_w_avg must be None, True or False, got"):
                G(z, update_w_avg=bad)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3"])
def test_sample_gan_seed_is_checked_by_name(seed, tmp_path):
    """A seed outside [0, 2^63) or not an int is refused naming it, before any work, as the training configs
    and the CLI do: -1 was taken (as 2^64 - 1), the others failed inside torch.Generator.manual_seed with
    messages that did not name the argument."""
    G = Generator(GANConfig.tiny(8)).eval()
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^63\), got"):
        train_gan.sample_gan(G, 2, seed, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("group_size", [0, -2, 1.5])
def test_minibatch_stddev_group_size_is_checked_by_name(group_size):
    """A group size below 1 failed with "max() arg is an empty sequence" (0, -2) or a TypeError (1.5)."""
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        gan.minibatch_stddev(torch.randn(4, 3, 4, 4), group_size)


@pytest.mark.parametrize("kwargs", [{"scale": 0}, {"scale": 1.5}, {"scale": True}, {"ncol": 2.0}, {"ncol": True}])
def test_sample_gan_grid_options_are_checked_before_sampling(kwargs, tmp_path):
    """ncol and scale are positive ints, refused by name before the generator runs: a float failed inside NumPy
    after the sampling ("'float' object cannot be interpreted as an integer"), True was taken as 1."""
    G = Generator(GANConfig.tiny(8)).eval()
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got"):
        train_gan.sample_gan(G, 2, 0, tmp_path / "a.png", **kwargs)
    assert not (tmp_path / "a.png").exists()


def test_mapping_network_checks_z_by_name():
    """The mapping network called alone (as StyleGAN code does, G.mapping then G.synthesis) names z and the shape
    it takes; a wrong width failed in a matmul ("mat1 and mat2 shapes cannot be multiplied")."""
    G = Generator(GANConfig.tiny(8))
    with pytest.raises(ValueError, match=r"z must be \(N, z_dim\) = \(N, 8\), got \(2, 7\)"):
        G.mapping(torch.randn(2, 7))
    with pytest.raises(TypeError, match="z must be a floating-point tensor, got torch.int64"):
        G.mapping(torch.ones(2, 8, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w_avg_stays_float32_in_a_half_precision_mapping(dtype):
    """A half-precision w_avg stopped moving: 0.005 of the step from w_avg to the batch's mean w is below
    bfloat16's rounding. The buffer stays float32 through .to(dtype) and takes the float32 EMA step."""
    torch.manual_seed(0)
    mapping = gan.MappingNetwork(GANConfig(resolution=8, z_dim=16, w_dim=16, mapping_layers=2))
    mapping.w_avg.fill_(1.0)
    mapping.to(dtype).train()
    assert mapping.w_avg.dtype == torch.float32
    assert next(mapping.parameters()).dtype == dtype
    z = torch.randn(8, 16, dtype=dtype)
    ws = mapping(z)
    expected = mapping(z, update_w_avg=False)[:, 0].float().mean(0).lerp(torch.ones(16), gan.W_AVG_BETA)
    assert ws.dtype == dtype
    assert mapping.w_avg.dtype == torch.float32
    torch.testing.assert_close(mapping.w_avg, expected, rtol=0, atol=0)
    assert (mapping.w_avg != 1.0).all()  # it moved (in bfloat16, 1 + 0.005 * (w - 1) rounds back to 1 for small w)
    mapping.float()
    torch.testing.assert_close(mapping.w_avg, expected, rtol=0, atol=0)  # and keeps its value when converted back
