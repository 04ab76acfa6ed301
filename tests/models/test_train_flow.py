"""Training and sampling the Glow on CPU: held-out bits/dim falls, dequantization and bits/dim follow their
definitions, checkpoints round-trip, the sample grid has the documented size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from genkernels import data, train_flow
from tests._cli import assert_load_errors, assert_same_weights


def _run(digits, steps, out=None, **overrides):
    config = train_flow.FlowTrainConfig(
        **{"steps": steps, "batch_size": 64, "model": "tiny", "device": "cpu", **overrides}
    )
    return train_flow.train_flow(digits, config, out, progress=False)


def test_training_lowers_heldout_bits_per_dim(digits):
    """The tiny Glow, 60 steps of batch 64 on the digits: the held-out bits/dim drops visibly."""
    result = _run(digits, 60, lr=3e-3, eval_every=20)
    assert [h["step"] for h in result.history] == [0, 20, 40, 60]
    assert result.history[0]["train"] is None and len(result.losses) == 60
    for h in result.history[1:]:
        assert h["train"] == pytest.approx(np.mean(result.losses[h["step"] - 20 : h["step"]]))
    first, last = result.history[0]["heldout"], result.history[-1]["heldout"]
    assert last < first - 0.4, f"held-out bits/dim {first:.3f} (step 0) -> {last:.3f} (step 60)"
    # A model that knows nothing spends log2(17) = 4.09 bits per pixel on the 17 digit levels.
    assert last < math.log2(17)


def test_batch_of_one_2x2_image_trains_to_sane_bits_per_dim():
    """Batch 1 of 2x2 RGB images: every ActNorm's first batch holds one value per channel (std 0). The
    bits/dim stay near the 8 of 256 uniform levels (ActNorm keeps scale 1 there), not ~1e21."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 2, 2), generator=gen).float() / 255 * 2 - 1
    dataset = data.ImageDataset(images, torch.zeros(8, dtype=torch.int64), ["x"])
    result = _run(dataset, 3, batch_size=1, heldout=0.25, n_bins=256)
    bits = [h["heldout"] for h in result.history] + list(result.losses)
    assert all(math.isfinite(b) and 7 < b < 12 for b in bits), bits


def test_pixel_levels(digits):
    assert train_flow.pixel_levels(digits.images) == 17
    eight_bit = torch.arange(256.0) / 127.5 - 1
    assert train_flow.pixel_levels(eight_bit) == 256
    assert train_flow.pixel_levels(torch.tensor([-1.0, 1.0, 1.0])) == 2
    assert train_flow.pixel_levels(torch.tensor([-1.0, 0.123, 1.0])) == 256


def test_dequantize_fills_each_level_bin():
    """Level k of n_bins owns [k / n_bins, (k + 1) / n_bins); quantize undoes dequantize."""
    n_bins = 17
    images = (torch.arange(n_bins, dtype=torch.float32) / 8 - 1).repeat(200).view(-1, 1, 1, n_bins)
    x = train_flow.dequantize(images, n_bins, torch.Generator().manual_seed(0))
    levels = torch.arange(n_bins).expand_as(x)
    assert ((x >= levels / n_bins) & (x < (levels + 1) / n_bins)).all()
    torch.testing.assert_close(train_flow.quantize(x, n_bins), images)
    assert train_flow.quantize(torch.tensor([-0.5, 1.5, float("nan")]), n_bins).tolist() == [-1.0, 1.0, -1.0]


def test_split_is_fixed_by_seed(digits):
    a_train, a_held = train_flow.split(digits, 0.1, seed=3)
    b_train, b_held = train_flow.split(digits, 0.1, seed=3)
    _, c_held = train_flow.split(digits, 0.1, seed=4)
    assert len(a_held) == 180 and len(a_train) == 1797 - 180
    assert torch.equal(a_held.images, b_held.images) and not torch.equal(a_held.images, c_held.images)
    # Disjoint: together the two parts are the data set.
    both = torch.cat([a_train.images, a_held.images]).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == torch.unique(digits.images.flatten(1), dim=0).shape[0]


@pytest.fixture(scope="module")
def checkpoint(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("flow")
    result = _run(digits, 4, out=out, save_every=2, eval_every=2, seed=1)
    return out / train_flow.CHECKPOINT_NAME, result


def test_checkpoint_round_trip(checkpoint, digits):
    path, result = checkpoint
    model, meta = train_flow.load_flow(path)
    assert not model.training
    assert meta == result.metadata
    assert meta["model"] == "flow" and meta["step"] == 4 and meta["n_bins"] == 17
    assert [h["step"] for h in meta["bits_per_dim"]] == [0, 2, 4]
    assert meta["class_names"] == digits.class_names and meta["image_shape"] == [1, 8, 8]
    assert meta["split"] == {"heldout": 0.1, "seed": 1, "train_images": 1797 - 180}
    assert model.config == train_flow.model_config_for(digits, "tiny")
    assert_same_weights(model, result.model)
    # The loaded model scores the held-out split exactly as the last evaluation did.
    _, heldout = train_flow.split(digits, 0.1, seed=1)
    assert train_flow.evaluate(model, heldout.images, 17, seed=2) == pytest.approx(meta["bits_per_dim"][-1]["heldout"])


def test_checkpoint_errors(checkpoint, tmp_path):
    assert_load_errors(train_flow.load_flow, checkpoint[0], "flow", "vae", tmp_path)


def test_sample_grid(checkpoint, tmp_path):
    """10 samples in rows of 4 (3 rows), 8x8 digits upscaled 8x with 1-pixel gaps; the seed fixes the grid."""
    model, meta = train_flow.load_flow(checkpoint[0])
    out = tmp_path / "grid.png"
    result = train_flow.sample_flow(model, 10, 0.7, 3, out, n_bins=meta["n_bins"], ncol=4)
    assert result.images.shape == (10, 1, 8, 8)
    levels = (result.images + 1) / 2 * 16  # on the 17 digit levels
    torch.testing.assert_close(levels, levels.round())
    cell = 8 * 8 + 1
    assert result.size == (4 * cell + 1, 3 * cell + 1)
    with Image.open(out) as im:
        assert im.size == result.size and im.mode == "L"
        pixels = np.asarray(im)
    np.testing.assert_array_equal(pixels[1 : 1 + 64 : 8, 1 : 1 + 64 : 8], data.to_uint8(result.images)[0, ..., 0])
    again = tmp_path / "again.png"
    train_flow.sample_flow(model, 10, 0.7, 3, again, n_bins=meta["n_bins"], ncol=4)
    assert again.read_bytes() == out.read_bytes()
    default = train_flow.sample_flow(model, 5, 1.0, 0, tmp_path / "d.png", n_bins=17, scale=2)
    assert default.size == (3 * 17 + 1, 2 * 17 + 1)  # ceil(sqrt(5)) = 3 per row


def test_config_errors(digits):
    with pytest.raises(ValueError, match="model must be one of"):
        train_flow.FlowTrainConfig(model="huge")
    with pytest.raises(ValueError, match=r"n_bins must be None or an int in \[2, 256\], got 1"):
        train_flow.FlowTrainConfig(n_bins=1)
    with pytest.raises(ValueError, match=r"heldout must be a fraction in \(0, 1\), got 1.0"):
        train_flow.FlowTrainConfig(heldout=1.0)
    with pytest.raises(ValueError, match="leaves none to train on"):
        train_flow.split(data.ImageDataset(digits.images[:1], digits.labels[:1], digits.class_names), 0.5, 0)
    odd = data.ImageDataset(torch.zeros(4, 1, 7, 7), torch.zeros(4, dtype=torch.int64), ["x"])
    with pytest.raises(ValueError, match="image size must be even"):
        train_flow.model_config_for(odd)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        train_flow.sample_flow(None, 4, -1.0, 0, "x.png")
