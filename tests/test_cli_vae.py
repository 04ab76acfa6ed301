"""`genkernels train vae` and `genkernels sample vae`: end to end on CPU, and clear errors for options of another
family and other bad combinations."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from genkernels import train_vae
from genkernels.cli import FAMILIES, main
from tests._cli import assert_same_grid_twice, assert_usage_error, foreign_checkpoint, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The checkpoint of a 3-step training run from the command line."""
    return train_run(
        tmp_path_factory,
        "vae",
        "--steps",
        "3",
        "--model",
        "tiny",
        "--batch-size",
        "16",
        "--loss",
        "l1",
        "--beta",
        "0.01",
    )


def test_families():
    assert "vae" in FAMILIES


def test_train_writes_a_checkpoint(ckpt):
    meta = train_vae.read_vae_metadata(ckpt)
    assert meta["loss"] == "l1" and meta["beta"] == 0.01 and meta["step"] == 3
    assert meta["data"] == {"data": "digits"} and meta["image_shape"] == [1, 8, 8]
    assert meta["config"]["in_channels"] == 1


def test_sample_writes_the_grid(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "vae", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    # default 20 inputs in rows of 10: 2 input rows, 2 reconstruction rows, 2 prior rows; 8x8 digits at 8x.
    with Image.open(out) as im:
        assert im.size == (10 * 65 + 1, 6 * 65 + 1) and im.mode == "L"
    assert "wrote 20 images with their reconstructions and 20 prior samples" in capsys.readouterr().out


def test_sample_options(ckpt, tmp_path):
    argv = ["sample", "vae", "--ckpt", str(ckpt), "--data", "digits", "--num", "5", "--ncol", "5"]
    argv += ["--scale", "2", "--seed", "7", "--backend", "reference"]
    assert_same_grid_twice(argv, tmp_path, (5 * 17 + 1, 3 * 17 + 1))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "vae", "--out", "x", "--objective", "eps"], "argument --objective: not an option of"),
        (["train", "vae", "--out", "x", "--ema-decay=0.9"], "it applies to `genkernels train diffusion`"),
        (["train", "diffusion", "--out", "x", "--beta", "0.1"], "it applies to `genkernels train vae`"),
        (["sample", "vae", "--ckpt", "c", "--sampler", "ddim"], "not an option of `genkernels sample vae`"),
        (["sample", "vae", "--ckpt", "c", "--guidance", "2"], "applies to `genkernels sample diffusion`"),
        (["sample", "diffusion", "--ckpt", "c", "--data", "digits"], "applies to `genkernels sample vae`"),
        (["train", "vae", "--out", "x", "--loss", "l3"], "argument --loss: invalid choice: 'l3'"),
        (["train", "vae", "--out", "x", "--beta", "-1"], "argument --beta: expected a number >= 0, got -1.0"),
        (["train", "vae", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "vae"], "the following arguments are required: --out"),
        (["sample", "vae"], "the following arguments are required: --ckpt"),
        (["train", "nope", "--out", "x"], "argument family: invalid choice: 'nope'"),
    ],
)
def test_argument_errors(argv, message, capsys):
    assert_usage_error(argv, message, capsys)


def test_command_errors(ckpt, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["train", "vae", "--data", "digits", "--image-size", "16", "--out", out]) == 2
    assert "--image-size applies to an image folder; --data digits is always 1 x 8 x 8" in capsys.readouterr().err
    assert main(["train", "vae", "--data", str(tmp_path / "none"), "--out", out]) == 2
    assert "--data: data folder" in capsys.readouterr().err
    assert main(["sample", "vae", "--ckpt", str(tmp_path / "none.safetensors")]) == 2
    assert "--ckpt: checkpoint" in capsys.readouterr().err
    assert main(["sample", "vae", "--ckpt", str(ckpt), "--num", "5000", "--out", str(tmp_path / "x.png")]) == 2
    assert "--num must be at most the data's 1797 images, got 5000" in capsys.readouterr().err
    unet = foreign_checkpoint(tmp_path / "unet.safetensors", "diffusion-unet")
    assert main(["sample", "vae", "--ckpt", str(unet), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds a 'diffusion-unet' model, not a vae checkpoint" in capsys.readouterr().err
    assert main(["sample", "diffusion", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds a 'vae' model, not a diffusion checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "o").exists()


def test_image_folder_round_trip(tmp_path):
    """A folder of RGB images: the checkpoint records the folder, so `sample vae` needs no --data."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    argv = ["train", "vae", "--data", str(folder), "--image-size", "8", "--steps", "1", "--model", "tiny"]
    assert main([*argv, "--batch-size", "2", "--out", str(out), "--no-progress"]) == 0
    meta = train_vae.read_vae_metadata(out / "vae.safetensors")
    assert meta["data"] == {"data": str(folder.resolve()), "image_size": 8, "channels": 3}
    grid = tmp_path / "grid.png"
    assert main(["sample", "vae", "--ckpt", str(out / "vae.safetensors"), "--num", "4", "--out", str(grid)]) == 0
    with Image.open(grid) as im:
        assert im.size == (4 * 65 + 1, 3 * 65 + 1) and im.mode == "RGB"
