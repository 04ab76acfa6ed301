"""More edges of `genkernels train/sample FAMILY`: what --out does to an existing image, and the GAN's training
options taken through the common training path."""

from __future__ import annotations

import pytest
from PIL import Image

from genkernels.cli import main
from tests._cli import train_run

pytestmark = pytest.mark.usefixtures("one_thread")

GAN_TINY = ["--steps", "2", "--model", "tiny", "--batch-size", "4", "--image-size", "8", "--r1-interval", "2"]


@pytest.fixture(scope="module")
def gan_ckpt(tmp_path_factory):
    return train_run(tmp_path_factory, "gan", *GAN_TINY)


def test_sample_replaces_an_existing_image_and_says_so(gan_ckpt, tmp_path, capsys):
    """A sample grid is a reproducible output (the checkpoint, the seed and the options give it again), and
    --out has a default (samples.png) that a second run must be able to reuse: sampling replaces an existing
    image, as image writers do, unlike training, whose checkpoint is a run's work (--overwrite). The help says
    so and the run reports it, so the replacement is never silent."""
    out = tmp_path / "grid.png"
    argv = ["sample", "gan", "--ckpt", str(gan_ckpt), "--num", "4", "--out", str(out)]
    assert main(argv) == 0
    assert "replaced" not in capsys.readouterr().out
    Image.new("L", (3, 3)).save(out)
    assert main(argv) == 0
    assert f"replaced the file that was at {out}" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == (2 * 65 + 1, 2 * 65 + 1)
    with pytest.raises(SystemExit):
        main(["sample", "gan", "-h"])
    assert "an existing file is replaced" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["grid.xbm", "grid.msp", "grid.h5", "grid.wmf", "grid.qoi"])
def test_sample_refuses_an_image_format_that_cannot_hold_the_grid(name, gan_ckpt, tmp_path, capsys):
    """--out in a format PIL lists as writable but which cannot write a grey or RGB grid (XBM and MSP take 1-bit
    images, QOI no grey ones, HDF5 and WMF need a handler installed) was accepted, and the run failed with a
    traceback after sampling; now it is an error before any work."""
    out = tmp_path / name
    assert main(["sample", "gan", "--ckpt", str(gan_ckpt), "--num", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: PIL cannot write grey and RGB images as" in err and "Traceback" not in err
    assert not out.exists()
