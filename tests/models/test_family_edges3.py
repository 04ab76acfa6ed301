"""VAE and flow family edges: the samplers' grid options (seed, ncol, scale) checked before any sampling, the
training configs' counts and rates, and what the models compute (logdets against autograd Jacobians, the
VAE against diffusers). CPU, reference backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genkernels import _training, data, train_flow, train_vae
from genkernels.models import AutoencoderKL, AutoencoderKLConfig, Glow, GlowConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def grey():
    """12 random 8x8 grey images on the 17 digit levels."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 17, (12, 1, 8, 8), generator=gen).float() / 8 - 1
    return data.ImageDataset(images, torch.zeros(12, dtype=torch.long), ["a"])


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    config = AutoencoderKLConfig.tiny(in_channels=1, out_channels=1, sample_size=8)
    return AutoencoderKL(config, backend="reference").eval()


@pytest.fixture(scope="module")
def glow():
    torch.manual_seed(0)
    return Glow.from_config(GlowConfig.tiny(), backend="reference").eval()


class _Counting:
    """Counts calls of a model method, to tell that a sampler refused its options before sampling."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = 0
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def _sample(family, vae, glow, grey, out, **options):
    seed = options.pop("seed", 0)
    if family == "vae":
        return train_vae.sample_vae(vae, grey, 3, seed, out, **options)
    return train_flow.sample_flow(glow, 3, 1.0, seed, out, **options)


BAD_OPTIONS = [
    ("ncol", 2.5, r"ncol must be a positive int, got 2\.5"),
    ("ncol", True, "ncol must be a positive int, got True"),
    ("ncol", 0, "ncol must be a positive int, got 0"),
    ("scale", 2.5, r"scale must be a positive int, got 2\.5"),
    ("scale", True, "scale must be a positive int, got True"),
    ("seed", -1, r"seed must be an integer in \[0, 2\^63\), got -1"),
    ("seed", 1.5, r"seed must be an integer in \[0, 2\^63\), got 1\.5"),
    ("seed", True, r"seed must be an integer in \[0, 2\^63\), got True"),
    ("seed", 2**63, r"seed must be an integer in \[0, 2\^63\), got 9223372036854775808"),
]


@pytest.mark.parametrize("name, value, match", BAD_OPTIONS)
@pytest.mark.parametrize("family", ["vae", "flow"])
def test_samplers_refuse_bad_grid_options_before_sampling(
    family, name, value, match, vae, glow, grey, tmp_path, monkeypatch
):
    """Before: a float ncol or scale failed inside NumPy after sampling (TypeError 'float object cannot be
    interpreted as an integer'), True was taken as 1, and sample_vae took a negative seed (wrapped by torch) and
    failed in torch on a float or bool one."""
    calls = (
        _Counting(monkeypatch, AutoencoderKL, "decode") if family == "vae" else _Counting(monkeypatch, Glow, "sample")
    )
    out = tmp_path / "grid.png"
    with pytest.raises(ValueError, match=match):
        _sample(family, vae, glow, grey, out, **{name: value})
    assert calls.calls == 0 and not out.exists()


@pytest.mark.parametrize("family", ["vae", "flow"])
def test_samplers_take_numpy_options(family, vae, glow, grey, tmp_path):
    a = _sample(family, vae, glow, grey, tmp_path / "a.png", seed=3, ncol=2, scale=2)
    b = _sample(family, vae, glow, grey, tmp_path / "b.png", seed=np.uint32(3), ncol=np.int64(2), scale=np.int8(2))
    cell, rows = (8 * 2 + 1, 6) if family == "vae" else (4 * 2 + 1, 2)  # vae: 2 input, 2 reconstruction, 2 prior rows
    assert a.size == b.size == (2 * cell + 1, rows * cell + 1)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_grid_options_defaults():
    assert _training.grid_options(np.int64(5), None, None, 7) == (5, 7, None)
    assert _training.grid_options(0, 3, 4, 7) == (0, 3, 4)


@pytest.mark.parametrize("num", [2.5, True, 0, 13])
def test_sample_vae_num_must_be_an_int_in_range(num, vae, grey, tmp_path):
    """2.5 failed in torch's slicing (TypeError); True was taken as 1."""
    with pytest.raises(ValueError, match=r"num must be an int in \[1, 12\]"):
        train_vae.sample_vae(vae, grey, num, 0, tmp_path / "g.png")


@pytest.mark.parametrize("name, value", [("num", 2.5), ("num", True), ("n_bins", 16.5), ("n_bins", True)])
def test_sample_flow_num_and_n_bins_must_be_ints(name, value, glow, tmp_path):
    """n_bins 16.5 quantized to off-grid levels with no error; num 2.5 failed as Glow.sample's n."""
    kwargs = {"num": 3, "n_bins": 17, name: value}
    with pytest.raises(ValueError, match=f"{name} must be"):
        train_flow.sample_flow(glow, kwargs["num"], 1.0, 0, tmp_path / "g.png", n_bins=kwargs["n_bins"])


CONFIG_CASES = [
    ("steps", 2.5, r"steps must be an int >= 1, got 2\.5"),
    ("steps", True, "steps must be an int >= 1, got True"),
    ("batch_size", 4.5, r"batch_size must be an int >= 1, got 4\.5"),
    ("batch_size", True, "batch_size must be an int >= 1, got True"),
    ("save_every", 1.5, r"save_every must be an int >= 0, got 1\.5"),
    ("lr", True, "lr must be a positive number, got True"),
    ("lr", "1e-3", "lr must be a positive number, got '1e-3'"),
    ("grad_clip", math.nan, "grad_clip must be a finite number >= 0, got nan"),
    ("grad_clip", -1.0, r"grad_clip must be a finite number >= 0, got -1\.0"),
    ("weight_decay", math.nan, "weight_decay must be a finite number >= 0, got nan"),
    ("weight_decay", -0.1, r"weight_decay must be a finite number >= 0, got -0\.1"),
]


@pytest.mark.parametrize("name, value, match", CONFIG_CASES)
@pytest.mark.parametrize("family", ["vae", "flow"])
def test_train_configs_refuse_non_integer_counts_and_bad_rates(family, name, value, match):
    """Before: steps or batch_size 2.5 failed in range() when training started, True trained with 1, save_every
    1.5 wrote checkpoints every 3 steps, lr True trained at lr 1, a NaN or negative grad_clip trained without
    clipping and a bad weight_decay failed inside AdamW after the model was built."""
    config = train_vae.VAETrainConfig if family == "vae" else train_flow.FlowTrainConfig
    with pytest.raises(ValueError, match=match):
        config(**{name: value})


@pytest.mark.parametrize("name, value", [("eval_every", 0.5), ("n_bins", 16.5)])
def test_flow_config_refuses_non_integer_eval_every_and_n_bins(name, value):
    """eval_every 0.5 evaluated at every step; n_bins 16.5 failed in the model at the first step."""
    with pytest.raises(ValueError, match=f"{name} must be"):
        train_flow.FlowTrainConfig(**{name: value})


def test_vae_config_refuses_a_bool_beta():
    with pytest.raises(ValueError, match="beta must be a number >= 0, got True"):
        train_vae.VAETrainConfig(beta=True)


def test_train_configs_take_numpy_numbers():
    config = train_flow.FlowTrainConfig(
        steps=np.int64(3), batch_size=np.int32(4), lr=np.float32(0.5), grad_clip=np.float64(0.0), n_bins=np.int16(17)
    )
    assert (config.steps, config.batch_size, config.n_bins) == (3, 4, 17)
    assert all(type(v) in (int, float) for v in (config.steps, config.batch_size, config.lr, config.grad_clip))


def test_samplers_refuse_images_a_png_cannot_hold_before_sampling(tmp_path, monkeypatch):
    """2-channel images, and a VAE whose reconstructions have other channels than its inputs, failed in
    save_grid or torch.stack only after every image was sampled."""
    torch.manual_seed(0)
    calls = _Counting(monkeypatch, Glow, "sample")
    glow2 = Glow.from_config(GlowConfig.tiny(in_channels=2), backend="reference").eval()
    with pytest.raises(ValueError, match="the images have 2 channels; a PNG grid takes 1"):
        train_flow.sample_flow(glow2, 2, 1.0, 0, tmp_path / "g.png")
    assert calls.calls == 0
    decodes = _Counting(monkeypatch, AutoencoderKL, "decode")
    images = torch.rand(4, 2, 4, 4) * 2 - 1
    two = data.ImageDataset(images, torch.zeros(4, dtype=torch.long), ["a"])
    config = AutoencoderKLConfig.tiny(in_channels=2, out_channels=2, sample_size=4)
    with pytest.raises(ValueError, match="the images have 2 channels"):
        train_vae.sample_vae(AutoencoderKL(config, backend="reference"), two, 2, 0, tmp_path / "g.png")
    two_to_one = AutoencoderKL(AutoencoderKLConfig.tiny(in_channels=2, out_channels=1), backend="reference")
    with pytest.raises(ValueError, match="the model must output as many channels as it takes, got 2 -> 1"):
        train_vae.sample_vae(two_to_one, two, 2, 0, tmp_path / "g.png")
    assert decodes.calls == 0 and not (tmp_path / "g.png").exists()


def test_flow_inverse_does_not_call_the_syncing_matrix_inverse(glow, monkeypatch):
    """InvConv1x1.inverse called torch.linalg.inv, which on a CUDA device reads its error code on the host: a
    device sync at every step of Glow.sample and Glow.inverse, and no CUDA graph capture of either."""
    from genkernels.nn import InvConv1x1

    x = torch.rand(2, 1, 4, 4)
    zs, _ = glow(x)
    layer = InvConv1x1(6, lu=False)
    y = torch.randn(3, 6, 2, 2, dtype=torch.float64)

    def refused(*args, **kwargs):
        raise AssertionError("torch.linalg.inv synchronizes a CUDA device with the host")

    monkeypatch.setattr(torch.linalg, "inv", refused)
    torch.testing.assert_close(glow.inverse(zs), x, rtol=0, atol=1e-5)
    assert torch.isfinite(glow.sample(2, 0.7, seed=0)).all()
    w = layer.weight_matrix().double()
    torch.testing.assert_close(layer(layer.inverse(y)[0])[0], y)
    torch.testing.assert_close(layer.inverse(y)[0], torch.einsum("ij,nj...->ni...", torch.inverse(w), y))


@pytest.mark.parametrize("family", ["vae", "flow"])
def test_train_configs_refuse_an_unknown_backend(family):
    """An unknown backend was refused only when training started: after the model was built and the output
    folder made."""
    config = train_vae.VAETrainConfig if family == "vae" else train_flow.FlowTrainConfig
    with pytest.raises(ValueError, match="backend must be one of .*got 'bogus'"):
        config(backend="bogus")
    assert config(backend="reference").backend == "reference"


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("scaling_factor", math.nan, "scaling_factor must be a finite nonzero number, got nan"),
        ("scaling_factor", math.inf, "scaling_factor must be a finite nonzero number, got inf"),
        ("scaling_factor", True, "scaling_factor must be a finite nonzero number, got True"),
        ("scaling_factor", 0.0, r"scaling_factor must be a finite nonzero number, got 0\.0"),
        ("shift_factor", math.nan, "shift_factor must be None or a finite number, got nan"),
        ("shift_factor", "0.1", "shift_factor must be None or a finite number, got '0.1'"),
    ],
)
def test_vae_config_refuses_latent_factors_a_pipeline_cannot_use(field, value, match):
    """NaN, inf and True were taken by float(): a pipeline scaling latents by them got NaN or unscaled latents."""
    with pytest.raises(ValueError, match=match):
        AutoencoderKLConfig.tiny(**{field: value})
    config = AutoencoderKLConfig.tiny(scaling_factor=np.float32(0.5), shift_factor=np.float64(0.25))
    assert (config.scaling_factor, config.shift_factor) == (0.5, 0.25)
    assert type(config.scaling_factor) is float and type(config.shift_factor) is float
