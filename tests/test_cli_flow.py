"""`genkernels train flow` and `genkernels sample flow`: end to end on CPU, and clear errors for options of another
family and other bad combinations."""

from __future__ import annotations

import pytest
from PIL import Image

from genkernels import train_flow
from genkernels.cli import FAMILIES, main
from tests._cli import assert_same_grid_twice, assert_usage_error, foreign_checkpoint, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The checkpoint of a 4-step training run from the command line."""
    argv = ["--steps", "4", "--model", "tiny", "--batch-size", "16"]
    return train_run(
        tmp_path_factory, "flow", *argv, "--lr", "2e-3", "--seed", "3", "--eval-every", "2", "--heldout", "0.2"
    )


def test_families():
    assert "flow" in FAMILIES


def test_train_writes_a_checkpoint(ckpt, capsys):
    meta = train_flow.read_flow_metadata(ckpt)
    assert meta["step"] == 4 and meta["n_bins"] == 17
    assert [h["step"] for h in meta["bits_per_dim"]] == [0, 2, 4]
    assert meta["split"] == {"heldout": 0.2, "seed": 3, "train_images": 1797 - 359}
    assert meta["data"] == {"data": "digits"} and meta["image_shape"] == [1, 8, 8]
    assert meta["config"]["in_channels"] == 1 and meta["config"]["image_size"] == 8


def test_train_prints_bits_per_dim(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "flow", "--steps", "1", "--model", "tiny", "--batch-size", "8", "--n-bins", "9"]
    assert main([*argv, "--eval-every", "0", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "trained 1 steps (9 bins): held-out bits/dim " in printed and f"checkpoint {out}/flow.safetensors" in printed
    assert [h["step"] for h in train_flow.read_flow_metadata(out / "flow.safetensors")["bits_per_dim"]] == [0, 1]


def test_sample_writes_the_grid(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "flow", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    # default 64 samples, 8 per row; 8x8 digits at 8x with 1-pixel gaps.
    with Image.open(out) as im:
        assert im.size == (8 * 65 + 1, 8 * 65 + 1) and im.mode == "L"
    assert "wrote 64 samples (temperature 0.7)" in capsys.readouterr().out


def test_sample_options(ckpt, tmp_path):
    argv = ["sample", "flow", "--ckpt", str(ckpt), "--num", "5", "--ncol", "5", "--temperature", "1"]
    argv += ["--scale", "2", "--seed", "7", "--backend", "reference"]
    assert_same_grid_twice(argv, tmp_path, (5 * 17 + 1, 1 * 17 + 1))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "flow", "--out", "x", "--objective", "eps"], "it applies to `genkernels train diffusion`"),
        (["train", "flow", "--out", "x", "--beta", "0.1"], "it applies to `genkernels train vae`"),
        (["train", "vae", "--out", "x", "--n-bins", "16"], "it applies to `genkernels train flow`"),
        (["train", "diffusion", "--out", "x", "--heldout=0.2"], "it applies to `genkernels train flow`"),
        (["sample", "flow", "--ckpt", "c", "--sampler", "ddim"], "not an option of `genkernels sample flow`"),
        (["sample", "flow", "--ckpt", "c", "--data", "digits"], "applies to `genkernels sample vae`"),
        (["sample", "diffusion", "--ckpt", "c", "--temperature", "1"], "applies to `genkernels sample flow`"),
        (["train", "flow", "--out", "x", "--n-bins", "1"], "argument --n-bins: expected an integer in [2, 256], got 1"),
        (["train", "flow", "--out", "x", "--heldout", "1"], "argument --heldout: expected a number in (0, 1), got 1.0"),
        (["train", "flow", "--out", "x", "--eval-every", "-1"], "argument --eval-every: expected an integer >= 0"),
        (["sample", "flow", "--ckpt", "c", "--temperature", "-1"], "argument --temperature: expected a number >= 0"),
        (["train", "flow", "--out", "x", "--model", "huge"], "argument --model: invalid choice: 'huge'"),
        (["train", "flow"], "the following arguments are required: --out"),
        (["sample", "flow"], "the following arguments are required: --ckpt"),
    ],
)
def test_argument_errors(argv, message, capsys):
    assert_usage_error(argv, message, capsys)


def test_command_errors(ckpt, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["train", "flow", "--data", "digits", "--channels", "1", "--out", out]) == 2
    assert "--channels applies to an image folder" in capsys.readouterr().err
    assert main(["sample", "flow", "--ckpt", str(tmp_path / "none.safetensors")]) == 2
    assert "--ckpt: checkpoint" in capsys.readouterr().err
    vae = foreign_checkpoint(tmp_path / "vae.safetensors", "vae")
    assert main(["sample", "flow", "--ckpt", str(vae), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds a 'vae' model, not a flow checkpoint" in capsys.readouterr().err
    assert main(["sample", "vae", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds a 'flow' model, not a vae checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "o").exists()


def test_image_folder(tmp_path, capsys):
    """A folder of RGB images trains at 256 bins and samples an RGB grid; an odd size is refused (every Glow
    level squeezes 2x2 pixels)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (6, 6), (i * 40, 255, 7)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "flow", "--data", str(folder), "--image-size", "7", "--out", str(out)]) == 2
    assert "the image size must be even" in capsys.readouterr().err
    assert not out.exists()
    argv = ["train", "flow", "--data", str(folder), "--image-size", "4", "--steps", "1", "--model", "tiny"]
    assert main([*argv, "--batch-size", "2", "--heldout", "0.25", "--out", str(out), "--no-progress"]) == 0
    meta = train_flow.read_flow_metadata(out / "flow.safetensors")
    assert meta["n_bins"] == 256 and meta["image_shape"] == [3, 4, 4] and meta["config"]["levels"] == 1
    assert meta["data"] == {"data": str(folder.resolve()), "image_size": 4, "channels": 3}
    grid = tmp_path / "grid.png"
    assert main(["sample", "flow", "--ckpt", str(out / "flow.safetensors"), "--num", "4", "--out", str(grid)]) == 0
    with Image.open(grid) as im:
        assert im.size == (2 * 65 + 1, 2 * 65 + 1) and im.mode == "RGB"
