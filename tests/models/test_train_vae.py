"""Training and sampling the VAE on CPU: the loss falls, the loss is the documented sum, checkpoints round-trip,
the sample grid has the documented layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import genkernels
from genkernels import data, train_vae
from tests._cli import assert_load_errors, assert_same_weights


def _run(digits, steps, out=None, **overrides):
    config = train_vae.VAETrainConfig(steps=steps, batch_size=32, model="tiny", device="cpu", **overrides)
    return train_vae.train_vae(digits, config, out, progress=False)


def test_training_lowers_the_loss(digits):
    """60 steps of the tiny model, batch 32: the mean loss of the last 10 steps is well below the first 10."""
    result = _run(digits, 60, lr=3e-3)
    assert len(result.losses) == len(result.reconstruction) == len(result.kl) == 60
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.6 * first, f"loss {first:.4f} (first 10 steps) -> {last:.4f} (last 10)"


def test_loss_is_reconstruction_plus_scaled_kl(digits):
    """loss = rec + beta * KL / (C * H * W) at every step (module doc), for both reconstruction losses."""
    for loss in train_vae.LOSSES:
        result = _run(digits, 3, loss=loss, beta=0.5)
        assert result.metadata["loss"] == loss
        for total, rec, kl in zip(result.losses, result.reconstruction, result.kl):
            assert kl > 0
            assert math.isclose(total, rec + 0.5 * kl / 64, rel_tol=1e-5), (loss, total, rec, kl)


def test_same_seed_same_run(digits):
    """Batches, initialization and the fused op's noise (Philox keyed by seed and step) all follow the seed."""
    a, b, c = _run(digits, 3, seed=4), _run(digits, 3, seed=4), _run(digits, 3, seed=5)
    assert a.losses == b.losses and a.losses != c.losses


def test_reconstruction_loss():
    x, y = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 1.0]])
    assert train_vae.reconstruction_loss(x, y, "l1").item() == pytest.approx(1.25)
    assert train_vae.reconstruction_loss(x, y, "l2").item() == pytest.approx(2.125)


@pytest.fixture(scope="module")
def checkpoint(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    result = _run(digits, 4, out=out, save_every=2)
    return out / train_vae.CHECKPOINT_NAME, result


def test_checkpoint_round_trip(checkpoint, digits):
    path, result = checkpoint
    model, meta = train_vae.load_vae(path)
    assert not model.training
    assert meta == result.metadata
    assert meta["model"] == "vae" and meta["step"] == 4 and meta["loss"] == "l2" and meta["beta"] == 0.05
    assert meta["class_names"] == digits.class_names and meta["image_shape"] == [1, 8, 8]
    assert model.config == train_vae.model_config_for(digits, "tiny")
    latent = result.model.encode(digits.images[:2]).latent_dist.mode()
    assert meta["latent_shape"] == list(latent.shape[1:])
    assert_same_weights(model, result.model)


def test_checkpoint_errors(checkpoint, tmp_path):
    assert_load_errors(train_vae.load_vae, checkpoint[0], "vae", "diffusion-unet", tmp_path)


def test_sample_grid(checkpoint, digits, tmp_path):
    """7 inputs in rows of 4: input row, reconstruction row, input row, reconstruction row, 2 prior rows."""
    model, _ = train_vae.load_vae(checkpoint[0])
    out = tmp_path / "grid.png"
    result = train_vae.sample_vae(model, digits, 7, 3, out, ncol=4)
    assert result.inputs.shape == result.reconstructions.shape == result.samples.shape == (7, 1, 8, 8)
    with torch.no_grad(), genkernels.backend("reference"):  # auto would pick the slow Triton interpreter
        want = model.decode(model.encode(result.inputs).latent_dist.mode()).sample
    torch.testing.assert_close(result.reconstructions, want)
    cell = 8 * 8 + 1  # 8x8 digits upscaled 8x (to 64 px), 1-pixel gaps
    assert result.size == (4 * cell + 1, 6 * cell + 1)
    with Image.open(out) as im:
        assert im.size == result.size and im.mode == "L"
        pixels = np.asarray(im)
    cells = [data.to_uint8(t)[..., 0] for t in (result.inputs, result.reconstructions, result.samples)]
    for row, (images, first) in enumerate([(0, 0), (1, 0), (0, 4), (1, 4), (2, 0), (2, 4)]):
        y = 1 + row * cell
        np.testing.assert_array_equal(pixels[y : y + 64 : 8, 1 : 1 + 64 : 8], cells[images][first])
    assert (pixels[1 + 3 * cell : 1 + 3 * cell + 64, 1 + 3 * cell : 1 + 3 * cell + 64] == 128).all()  # padding
    again = tmp_path / "again.png"
    train_vae.sample_vae(model, digits, 7, 3, again, ncol=4)
    assert again.read_bytes() == out.read_bytes()


def test_config_errors(digits):
    with pytest.raises(ValueError, match="loss must be one of"):
        train_vae.VAETrainConfig(loss="l3")
    with pytest.raises(ValueError, match="beta must be a number >= 0, got -1"):
        train_vae.VAETrainConfig(beta=-1)
    with pytest.raises(ValueError, match="model must be one of"):
        train_vae.VAETrainConfig(model="huge")
    with pytest.raises(ValueError, match=r"num must be an int in \[1, "):
        train_vae.sample_vae(None, digits, 0, 0, "x.png")
