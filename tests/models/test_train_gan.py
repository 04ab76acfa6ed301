"""Training and sampling the GAN on CPU: both losses and lazy R1 run, the generator changes, gradients stay
finite, checkpoints round-trip; `genkernels train/sample gan` end to end and their errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from genkernels import data, train_gan
from genkernels.cli import main
from genkernels.models import GANConfig, Generator
from tests._cli import assert_load_errors, assert_same_grid_twice, assert_same_weights, assert_usage_error, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits8():
    return train_gan.load_dataset("digits", 8)


@pytest.fixture(scope="module")
def run(digits8, tmp_path_factory):
    """4 steps of the tiny model with R1 every 2 steps (steps 0 and 2), checkpoint written."""
    out = tmp_path_factory.mktemp("gan")
    config = train_gan.GANTrainConfig(steps=4, batch_size=8, model="tiny", r1_interval=2, seed=3, device="cpu")
    return out / train_gan.CHECKPOINT_NAME, train_gan.train_gan(digits8, config, out, progress=False)


def test_load_dataset():
    d = train_gan.load_dataset("digits")
    assert d.image_shape == (1, 16, 16) and len(d) == 1797
    assert d.images.min() >= -1 and d.images.max() <= 1
    with pytest.raises(ValueError, match="resolution must be a power of 2"):
        train_gan.load_dataset("digits", 24)
    with pytest.raises(ValueError, match="channels applies to an image folder"):
        train_gan.load_dataset("digits", 16, 3)


def test_training_runs_both_losses_and_r1(run, digits8):
    _, result = run
    assert len(result.d_losses) == len(result.g_losses) == 4
    assert [s for s, _ in result.r1] == [0, 2]
    values = result.d_losses + result.g_losses + [v for _, v in result.r1]
    assert all(math.isfinite(v) for v in values) and all(v > 0 for v in values)
    for net in (result.generator, result.discriminator):
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    # The generator moved away from its initialization (the same seed rebuilds it).
    torch.manual_seed(3)
    initial = Generator(result.generator.config).eval()
    z = torch.randn(4, result.generator.config.z_dim)
    with torch.no_grad():
        before, after = initial(z, noise_mode="const"), result.generator(z, noise_mode="const")
        ema = result.generator_ema(z, noise_mode="const")
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4
    assert (ema - before).abs().max() > 0 and not torch.equal(ema, after)  # G_ema lags behind G
    assert result.generator.mapping.w_avg.abs().max() > 0


def test_checkpoint_round_trip(run, tmp_path):
    path, result = run
    G, meta = train_gan.load_gan(path)
    assert not G.training and meta == result.metadata
    assert meta["model"] == "gan" and meta["step"] == 4 and meta["image_shape"] == [1, 8, 8]
    assert GANConfig.from_dict(meta["config"]) == result.generator.config
    assert meta["config"]["r1_interval"] == 2
    assert_same_weights(G, result.generator_ema)
    raw, _ = train_gan.load_gan(path, ema=False)
    assert_same_weights(raw, result.generator)
    assert_load_errors(train_gan.load_gan, path, "gan", "vae", tmp_path)


def test_sample_gan(run, tmp_path):
    path, _ = run
    G, _ = train_gan.load_gan(path)
    out = tmp_path / "grid.png"
    result = train_gan.sample_gan(G, 6, 1, out, truncation=0.5, ncol=4)
    assert result.images.shape == (6, 1, 8, 8)
    cell = 8 * 8 + 1
    assert result.size == (4 * cell + 1, 2 * cell + 1)
    with Image.open(out) as im:
        assert im.size == result.size and im.mode == "L"
        pixels = np.asarray(im)
    np.testing.assert_array_equal(pixels[1 : 1 + 64 : 8, 1 : 1 + 64 : 8], data.to_uint8(result.images)[0, ..., 0])
    with torch.no_grad():
        z = torch.randn(6, G.config.z_dim, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(result.images, G(z, truncation_psi=0.5, noise_mode="const"))
    with pytest.raises(ValueError, match="num must be a positive int"):
        train_gan.sample_gan(G, 0, 1, out)


def test_config_errors(digits8):
    with pytest.raises(ValueError, match="model must be one of"):
        train_gan.GANTrainConfig(model="huge")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        train_gan.GANTrainConfig(lr=0)
    with pytest.raises(ValueError, match="r1_gamma must be a finite number >= 0"):
        train_gan.model_config_for(digits8, "tiny", r1_gamma=-1.0)


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    argv = ["--steps", "2", "--model", "tiny", "--batch-size", "8", "--image-size", "8", "--r1-interval", "2"]
    return train_run(tmp_path_factory, "gan", *argv, "--r1-gamma", "0.5", "--ema-beta", "0.5")


def test_cli_train_writes_a_checkpoint(ckpt):
    meta = train_gan.read_gan_metadata(ckpt)
    assert meta["step"] == 2 and meta["data"] == {"data": "digits"} and meta["image_shape"] == [1, 8, 8]
    assert meta["config"]["r1_gamma"] == 0.5 and meta["config"]["ema_beta"] == 0.5


def test_cli_sample_writes_a_png(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "gan", "--ckpt", str(ckpt), "--num", "9", "--out", str(out)]) == 0
    assert "wrote 9 samples (truncation 1) to" in capsys.readouterr().out
    with Image.open(out) as im:  # 3 x 3 grid of 8x8 images upscaled 8x
        assert im.size == (3 * 65 + 1, 3 * 65 + 1) and im.mode == "L"
    argv = ["sample", "gan", "--ckpt", str(ckpt), "--num", "5", "--ncol", "5", "--scale", "2", "--seed", "4"]
    assert_same_grid_twice([*argv, "--truncation", "0.7", "--raw-weights"], tmp_path, (5 * 17 + 1, 17 + 1))


def test_cli_truncation_zero_gives_one_image(ckpt, tmp_path):
    out = tmp_path / "mean.png"
    argv = ["sample", "gan", "--ckpt", str(ckpt), "--num", "4", "--ncol", "4", "--scale", "1", "--truncation", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    with Image.open(out) as im:
        cells = [np.asarray(im)[1:9, 1 + 9 * i : 9 + 9 * i] for i in range(4)]
    for cell in cells[1:]:
        assert np.abs(cell.astype(int) - cells[0]).max() <= 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "gan", "--out", "x", "--beta", "0.1"], "it applies to `genkernels train vae`"),
        (["train", "gan", "--out", "x", "--objective", "eps"], "not an option of `genkernels train gan`"),
        (["train", "vae", "--out", "x", "--r1-gamma", "1"], "it applies to `genkernels train gan`"),
        (["sample", "gan", "--ckpt", "c", "--temperature", "0.5"], "applies to `genkernels sample flow`"),
        (["sample", "flow", "--ckpt", "c", "--truncation", "0.5"], "applies to `genkernels sample gan`"),
        (["train", "gan", "--out", "x", "--r1-gamma", "-1"], "argument --r1-gamma: expected a number >= 0"),
        (["train", "gan", "--out", "x", "--ema-beta", "1"], "argument --ema-beta: expected a number in [0, 1)"),
        (["sample", "gan"], "the following arguments are required: --ckpt"),
    ],
)
def test_cli_argument_errors(argv, message, capsys):
    assert_usage_error(argv, message, capsys)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--image-size", "12"], "--image-size: resolution must be a power of 2 from 8 to 256"),
        (["--image-size", "512"], "--image-size: resolution must be a power of 2 from 8 to 256"),
        (["--channels", "3"], "--channels applies to an image folder"),
        (["--data", "/no/such/folder"], "--data: data folder '/no/such/folder' does not exist"),
    ],
)
def test_cli_train_errors(options, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "gan", "--out", str(out), "--no-progress", *options]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_sample_foreign_checkpoint(tmp_path, capsys):
    from tests._cli import foreign_checkpoint

    path = foreign_checkpoint(tmp_path / "vae.safetensors", "vae")
    assert main(["sample", "gan", "--ckpt", str(path), "--out", str(tmp_path / "x.png")]) == 2
    assert "--ckpt: " in capsys.readouterr().err and not (tmp_path / "x.png").exists()
