"""Training and sampling the autoregressive transformer on CPU: a short run on the digits lowers the loss,
checkpoints round-trip, grids are written; `genkernels train/sample transformer` end to end and their errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import genkernels
from genkernels import data, train_transformer
from genkernels.cli import main
from genkernels.models.transformer import ImageGPT, ImageGPTConfig
from tests._cli import assert_load_errors, assert_same_grid_twice, assert_same_weights, assert_usage_error, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return data.digits()


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    """40 steps of the tiny model on the digits, checkpoint written."""
    out = tmp_path_factory.mktemp("transformer")
    config = train_transformer.TransformerTrainConfig(
        steps=40, batch_size=32, lr=3e-3, warmup=5, model="tiny", seed=3, device="cpu"
    )
    return out / train_transformer.CHECKPOINT_NAME, train_transformer.train_transformer(
        digits, config, out, progress=False, data_source={"data": "digits"}
    )


def test_short_run_lowers_the_loss(run):
    _, result = run
    losses = result.losses
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    # Uniform over 16 levels is ln 16 = 2.77 nats; the first steps start there and the run must learn.
    assert abs(losses[0] - math.log(16)) < 0.3
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.4, (first, last)
    assert not result.model.training


def test_lr_schedule():
    f = train_transformer.lr_factor
    assert [f(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(99, 100, 4) == pytest.approx(train_transformer.FINAL_LR_FRACTION)
    assert f(0, 1, 0) == 1.0 and f(50, 100, 0) < 1.0


def test_checkpoint_round_trip(run, tmp_path):
    path, result = run
    model, meta = train_transformer.load_transformer(path)
    assert not model.training and meta == result.metadata
    assert meta["model"] == "transformer" and meta["step"] == 40 and meta["image_shape"] == [1, 8, 8]
    assert meta["data"] == {"data": "digits"}
    assert ImageGPTConfig.from_dict(meta["config"]) == result.model.config
    assert meta["config"]["dim"] == 32 and meta["config"]["num_classes"] == 10
    assert_same_weights(model, result.model)
    assert_load_errors(train_transformer.load_transformer, path, "transformer", "gan", tmp_path)


def test_sample_transformer(run, tmp_path):
    path, _ = run
    model, _ = train_transformer.load_transformer(path)
    out = tmp_path / "grid.png"
    result = train_transformer.sample_transformer(model, 6, 1, out, temperature=0.8, top_k=4)
    assert result.images.shape == (6, 1, 8, 8) and torch.equal(result.labels, torch.tensor([0, 1, 2, 3, 4, 5]))
    cell = 8 * 8 + 1
    assert result.size == (6 * cell + 1, cell + 1)  # one row: the classes
    with Image.open(out) as im:
        assert im.size == result.size and im.mode == "L"
        pixels = np.asarray(im)
    np.testing.assert_array_equal(
        pixels[1 : 1 + 64 : 8, 1 : 1 + 64 : 8], data.to_uint8(result.images * 2 - 1)[0, ..., 0]
    )
    with genkernels.backend("reference"):
        expected = model.sample_tokens(6, None, 0.8, 4, 1)
    assert torch.equal(result.tokens, expected)
    assert torch.equal(result.images, model.dequantize(expected))
    with pytest.raises(ValueError, match="num must be a positive int"):
        train_transformer.sample_transformer(model, 0, 1, out)


def test_warmup_must_end_within_the_run():
    """A warm-up longer than the run would never reach the peak lr: a ValueError naming both values. The default
    (100) shortens to the run's steps; a warm-up of all the steps reaches the peak at the last one."""
    config = train_transformer.TransformerTrainConfig
    with pytest.raises(ValueError) as e:
        config(steps=10, warmup=11)
    assert str(e.value) == (
        "warmup must be at most steps (the learning rate reaches lr when the warm-up ends), got warmup=11 with steps=10"
    )
    assert config(steps=10, warmup=10).warmup == 10 and config(steps=10, warmup=0).warmup == 0
    assert config(steps=10).warmup == 10 and config().warmup == train_transformer.DEFAULT_WARMUP == 100
    assert config(steps=np.int64(5), warmup=np.int64(5)).warmup == 5
    assert train_transformer.lr_factor(9, 10, 10) == 1.0


def test_config_errors(digits):
    with pytest.raises(ValueError, match="model must be one of"):
        train_transformer.TransformerTrainConfig(model="huge")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        train_transformer.TransformerTrainConfig(lr=0)
    with pytest.raises(ValueError, match="positions must be one of"):
        train_transformer.TransformerTrainConfig(positions="alibi")
    with pytest.raises(ValueError, match="grad_clip must be a number >= 0"):
        train_transformer.TransformerTrainConfig(grad_clip=-1.0)
    cfg = train_transformer.model_config_for(digits, "small", levels=8, positions="learned")
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.levels, cfg.positions) == (128, 4, 4, 8, "learned")
    assert isinstance(ImageGPT.from_config(cfg), ImageGPT)


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    argv = ["--steps", "2", "--model", "tiny", "--batch-size", "8", "--levels", "8", "--positions", "learned"]
    return train_run(tmp_path_factory, "transformer", *argv, "--warmup", "1")


def test_cli_train_writes_a_checkpoint(ckpt):
    meta = train_transformer.read_transformer_metadata(ckpt)
    assert meta["step"] == 2 and meta["data"] == {"data": "digits"} and meta["image_shape"] == [1, 8, 8]
    assert meta["config"]["levels"] == 8 and meta["config"]["positions"] == "learned"


def test_cli_sample_writes_a_png(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "transformer", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert "wrote 40 samples (temperature 1) to" in capsys.readouterr().out
    with Image.open(out) as im:  # 4 per class: 4 rows of the 10 classes, 8x8 images upscaled 8x
        assert im.size == (10 * 65 + 1, 4 * 65 + 1) and im.mode == "L"
    argv = ["sample", "transformer", "--ckpt", str(ckpt), "--num", "5", "--ncol", "5", "--scale", "2", "--seed", "4"]
    argv += ["--temperature", "0.7", "--top-k", "3", "--label", "7"]
    assert_same_grid_twice(argv, tmp_path, (5 * 17 + 1, 17 + 1))
    # Decoding without the cache draws the same tokens.
    assert main([*argv, "--no-cache", "--out", str(tmp_path / "c.png")]) == 0
    assert "top-k 3, no cache" in capsys.readouterr().out
    assert (tmp_path / "c.png").read_bytes() == (tmp_path / "a.png").read_bytes()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "transformer", "--out", "x", "--beta", "0.1"], "it applies to `genkernels train vae`"),
        (["train", "gan", "--out", "x", "--levels", "8"], "it applies to `genkernels train transformer`"),
        (["sample", "gan", "--ckpt", "c", "--top-k", "3"], "applies to `genkernels sample transformer`"),
        (
            ["sample", "vae", "--ckpt", "c", "--temperature", "1"],
            "applies to `genkernels sample flow` or `genkernels sample transformer`",
        ),
        (["sample", "transformer", "--ckpt", "c", "--truncation", "1"], "applies to `genkernels sample gan`"),
        (["train", "transformer", "--out", "x", "--levels", "1"], "argument --levels: expected an integer in [2, "),
        (["train", "transformer", "--out", "x", "--positions", "alibi"], "argument --positions: invalid choice"),
        (["sample", "transformer", "--ckpt", "c", "--top-k", "0"], "argument --top-k: expected a positive integer"),
        (["sample", "transformer", "--ckpt", "c", "--temperature", "-1"], "argument --temperature: expected a number"),
        (["sample", "transformer"], "the following arguments are required: --ckpt"),
    ],
)
def test_cli_argument_errors(argv, message, capsys):
    assert_usage_error(argv, message, capsys)


def test_cli_command_errors(ckpt, tmp_path, capsys):
    out = tmp_path / "x.png"
    for options, message in (
        (["--label", "10"], "--label must be in [0, 9] (this model has 10 classes), got 10"),
        (["--top-k", "9"], "--top-k must be at most the model's 8 levels, got 9"),
    ):
        assert main(["sample", "transformer", "--ckpt", str(ckpt), "--out", str(out), *options]) == 2
        assert message in capsys.readouterr().err
    from tests._cli import foreign_checkpoint

    path = foreign_checkpoint(tmp_path / "gan.safetensors", "gan")
    assert main(["sample", "transformer", "--ckpt", str(path), "--out", str(out)]) == 2
    assert "--ckpt: " in capsys.readouterr().err and not out.exists()
    run_dir = tmp_path / "run"
    assert main(["train", "transformer", "--out", str(run_dir), "--image-size", "16", "--no-progress"]) == 2
    assert "--image-size applies to an image folder" in capsys.readouterr().err and not run_dir.exists()
