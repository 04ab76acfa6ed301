"""Edges of `genkernels train/sample FAMILY` and of the training functions: unreadable and 16-bit images in a
--data folder, --device, --out, a diverging run, configs the Python API must refuse, and a VAE sampled on
images of another size. Each is a clear error (exit status 2, no traceback) or the right result."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from genkernels import data, train, train_flow, train_gan, train_transformer, train_vae
from genkernels.cli import main
from tests._cli import train_run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--steps", "1", "--model", "tiny", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    """A one-step tiny VAE trained on the digits (8x8 grey)."""
    return train_run(tmp_path_factory, "vae", "--steps", "1", "--model", "tiny", "--batch-size", "4")


def _folder(path, shapes_and_modes) -> str:
    path.mkdir()
    rng = np.random.default_rng(0)
    for i, (shape, mode) in enumerate(shapes_and_modes):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path / f"{i}.png")
    return str(path)


def _assert_error(argv, message, capsys) -> str:
    """``main(argv)`` returns 2 with ``message`` on stderr and no traceback; returns stderr."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    return err


def test_unreadable_image_in_the_folder_is_named(tmp_path, capsys):
    folder = _folder(tmp_path / "images", [((8, 8, 3), "RGB"), ((8, 8, 3), "RGB")])
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        data.image_folder(folder, 8)
    argv = ["train", "vae", "--data", folder, "--image-size", "8", *TINY, "--out", str(tmp_path / "o")]
    _assert_error(argv, "--data: cannot read image", capsys)
    assert not (tmp_path / "o").exists()


def test_16_bit_images_keep_their_levels(tmp_path):
    """A 16-bit grey PNG (mode I;16) read as its 8-bit equivalent, not clipped to white."""
    folder = tmp_path / "deep"
    folder.mkdir()
    levels = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)
    Image.fromarray(levels).save(folder / "a.png")
    with Image.open(folder / "a.png") as im:
        assert im.mode.startswith("I")
    images = data.image_folder(folder, 8, channels=1).images
    expected = torch.from_numpy(np.round(levels / 257.0) / 127.5 - 1.0).float()
    torch.testing.assert_close(images[0, 0], expected, atol=1e-6, rtol=0)
    rgb = data.image_folder(folder, 8, channels=3).images
    torch.testing.assert_close(rgb[0], expected.expand(3, 8, 8), atol=1e-6, rtol=0)
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(folder / "b.tif")  # mode F: no fixed range
    with pytest.raises(ValueError, match="float pixels"):
        data.image_folder(folder, 8, channels=1)


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_device_that_cannot_train(device, tmp_path, capsys):
    argv = ["train", "vae", *TINY, "--device", device, "--out", str(tmp_path / "o")]
    _assert_error(argv, f"--device {device}: ", capsys)
    assert not (tmp_path / "o").exists()


def test_device_index_past_the_gpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["train", "vae", *TINY, "--device", "cuda:3", "--out", str(tmp_path / "o")]
    _assert_error(argv, "--device cuda:3: this machine has 1 CUDA device(s)", capsys)


def test_train_out_below_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = str(tmp_path / "file" / "run")
    _assert_error(["train", "vae", *TINY, "--out", out], "is a file, so the output folder cannot be created", capsys)


def test_sample_out_in_a_new_folder(vae_ckpt, tmp_path, capsys):
    """The folder of --out is created, as `genkernels sample` promises."""
    out = tmp_path / "new" / "sub" / "grid.png"
    assert main(["sample", "vae", "--ckpt", str(vae_ckpt), "--num", "2", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (2 * 65 + 1, 3 * 65 + 1)


@pytest.mark.parametrize("family", ["vae", "transformer"])
def test_diverging_run_is_a_one_line_error(family, tmp_path, capsys):
    argv = ["train", family, *TINY, "--steps", "4", "--lr", "1e30", "--out", str(tmp_path / "o")]
    _assert_error(argv, f"genkernels train {family}: error: training diverged", capsys)


@pytest.mark.parametrize("warmup, steps", [(5, 4), (100, 99)])
def test_transformer_warmup_longer_than_the_run_is_refused(warmup, steps, tmp_path, capsys):
    """--warmup past --steps: the learning rate would never reach --lr. Exit status 2 naming both, before any work."""
    out = tmp_path / "o"
    argv = ["train", "transformer", *TINY, "--steps", str(steps), "--warmup", str(warmup), "--out", str(out)]
    message = "--warmup must be at most --steps (the learning rate reaches --lr when the warm-up ends), got "
    _assert_error(argv, f"{message}--warmup {warmup} with --steps {steps}", capsys)
    assert not out.exists()


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), float("inf")])
def test_diffusion_refuses_a_learning_rate_that_is_not_positive(lr, tmp_path, capsys):
    with pytest.raises(ValueError, match="lr must be a positive number"):
        train.TrainConfig(lr=lr)
    _assert_error(["train", "diffusion", *TINY, "--lr", str(lr), "--out", str(tmp_path / "o")], "lr must be", capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: train.TrainConfig(seed=seed),
        lambda seed: train_vae.VAETrainConfig(seed=seed),
        lambda seed: train_flow.FlowTrainConfig(seed=seed),
        lambda seed: train_gan.GANTrainConfig(seed=seed),
        lambda seed: train_transformer.TransformerTrainConfig(seed=seed),
    ],
)
@pytest.mark.parametrize("seed", [-1, 2**63, 1.5])
def test_configs_refuse_a_seed_out_of_range(make, seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^63\)"):
        make(seed)
    assert make(np.int64(5)).seed == 5


def test_vae_on_one_pixel_images(tmp_path, capsys):
    folder = _folder(tmp_path / "images", [((4, 4, 3), "RGB")] * 2)
    with pytest.raises(ValueError, match="at least 2x2"):
        train_vae.model_config_for(data.image_folder(folder, 1), "tiny")
    argv = ["train", "vae", "--data", folder, "--image-size", "1", *TINY, "--out", str(tmp_path / "o")]
    _assert_error(argv, "at least 2x2", capsys)


def test_sample_vae_on_images_of_another_size(tmp_path, capsys):
    """A VAE trained on 16x16 grey images, shown the 8x8 digits: refused (the prior samples would be 8x8)."""
    folder = _folder(tmp_path / "images", [((16, 16), "L")] * 4)
    out = tmp_path / "run"
    argv = ["train", "vae", "--data", folder, "--image-size", "16", "--channels", "1", *TINY, "--out", str(out)]
    assert main(argv) == 0
    ckpt = str(out / "vae.safetensors")
    png = tmp_path / "x.png"
    argv = ["sample", "vae", "--ckpt", ckpt, "--data", "digits", "--num", "2", "--out", str(png)]
    _assert_error(argv, "--data: the images are 1x8x8, the model was trained on 1x16x16", capsys)
    assert not png.exists()


def test_sample_diffusion_ncol_help(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "diffusion", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: classes, or ceil(sqrt(num)) with --label or one class)" in help_text


# --------------------------------------------------------------------------- batch size against the data


def _family_train(family: str, dataset, out, **options):
    """One tiny step of ``family`` through its Python function (``options``: the config's batch_size, the
    function's overwrite)."""
    batch_size = options.pop("batch_size", 4)
    common = dict(steps=1, batch_size=batch_size, model="tiny", device="cpu")
    if family == "diffusion":
        config = train.TrainConfig(steps=1, batch_size=batch_size)
        model_config = train.model_config_for(dataset, "tiny")
        return train.train_diffusion(dataset, model_config, config, out=out, progress=False, **options)
    config_class, fn = {
        "vae": (train_vae.VAETrainConfig, train_vae.train_vae),
        "flow": (train_flow.FlowTrainConfig, train_flow.train_flow),
        "gan": (train_gan.GANTrainConfig, train_gan.train_gan),
        "transformer": (train_transformer.TransformerTrainConfig, train_transformer.train_transformer),
    }[family]
    return fn(dataset, config_class(**common), out, progress=False, **options)


def _family_data(family: str):
    return train_gan.load_dataset("digits", 8) if family == "gan" else data.digits()


FAMILIES = ["diffusion", "vae", "flow", "gan", "transformer"]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_larger_than_the_data_is_refused(family, tmp_path, capsys):
    """--batch-size 4096 on the 1,797 digits: an error naming the option, the size given and the data's (the
    flow trains on what it does not hold out), before anything is written; not a silently smaller batch."""
    images = "1617 training images (1797 less 180 held out)" if family == "flow" else "1797 training images"
    out = tmp_path / "o"
    argv = ["train", family, *TINY, "--batch-size", "4096", "--out", str(out)]
    _assert_error(argv, f"--batch-size must be at most the {images}, got 4096", capsys)
    with pytest.raises(ValueError) as e:
        _family_train(family, _family_data(family), out, batch_size=4096)
    assert str(e.value) == f"batch_size must be at most the {images}, got 4096"
    assert not out.exists()


def test_batches_have_the_size_asked_for():
    """Every batch holds batch_size distinct images; an epoch's last N % batch_size are dropped (different ones
    every epoch); a batch of all N images is one batch per epoch; more than N is a ValueError, not a cap."""
    dataset = data.ImageDataset(torch.arange(10.0).view(10, 1, 1, 1), torch.zeros(10, dtype=torch.int64), ["x"])
    batches = dataset.batches(4, torch.Generator().manual_seed(0))
    dropped = []
    for _ in range(3):
        epoch = [next(batches)[0].flatten() for _ in range(2)]
        assert all(b.shape == (4,) for b in epoch)
        seen = torch.cat(epoch)
        assert seen.unique().numel() == 8
        dropped.append(sorted(set(range(10)) - set(seen.long().tolist())))
    assert len({tuple(d) for d in dropped}) > 1
    whole = dataset.batches(10, torch.Generator().manual_seed(0))
    assert [sorted(next(whole)[0].flatten().long().tolist()) for _ in range(2)] == [list(range(10))] * 2
    with pytest.raises(ValueError, match="batch_size must be at most the data set's 10 images, got 11"):
        dataset.batches(11, torch.Generator())


# --------------------------------------------------------------------------- a second run into the same folder


@pytest.mark.parametrize("family", FAMILIES)
def test_a_second_run_does_not_replace_the_first_without_overwrite(family, tmp_path, capsys):
    """A second `train FAMILY --out DIR`: exit status 2 before any work, the first run's checkpoint untouched (the
    function: a FileExistsError); --overwrite (overwrite=True) replaces it. Another family's checkpoint in the
    folder is no obstacle."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f"{'gan' if family == 'vae' else 'vae'}.safetensors").write_bytes(b"another family")
    argv = ["train", family, *TINY, "--out", str(out)]
    assert main(argv) == 0
    ckpt = out / f"{family}.safetensors"
    first = ckpt.read_bytes()
    _assert_error(argv, f"--out {out}: '{ckpt}' exists (an earlier run's checkpoint); pass --overwrite", capsys)
    with pytest.raises(FileExistsError, match="exists .* pass overwrite=True to replace it"):
        _family_train(family, _family_data(family), out)
    assert ckpt.read_bytes() == first
    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert ckpt.read_bytes() != first


def test_empty_out_is_refused(capsys):
    """--out "" (an unset shell variable) would train into the current folder: refused."""
    _assert_error(["train", "vae", *TINY, "--out", ""], "--out must name a folder, got ''", capsys)


def test_the_run_report_compares_windows_that_do_not_overlap():
    """A short run's "first k -> last k" means: k = min(10, steps // 2), at least 1, so 2 steps compare step 0
    with step 1 rather than the mean of both with itself."""
    from genkernels.cli import _ends

    assert _ends([4.0, 2.0]) == (4.0, 2.0, 1)
    assert _ends([3.0]) == (3.0, 3.0, 1)
    assert _ends([1.0, 1.0, 1.0, 5.0, 9.0, 9.0, 9.0]) == (1.0, 9.0, 3)
    assert _ends([float(v) for v in range(40)]) == (4.5, 34.5, 10)


# --------------------------------------------------------------------------- checkpoint file permissions


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_checkpoint_permissions_follow_the_umask(mask, tmp_path):
    """The checkpoint of a run (periodic saves, then the final one) gets 0666 less the umask, as a file written
    with open(path, "w"), not safetensors' private 0600; no temporary file is left beside it."""
    out = tmp_path / "run"
    old = os.umask(mask)
    try:
        argv = ["train", "transformer", *TINY, "--steps", "2", "--save-every", "1", "--out", str(out)]
        assert main(argv) == 0
    finally:
        os.umask(old)
    ckpt = out / "transformer.safetensors"
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o666 & ~mask
    assert os.listdir(out) == ["transformer.safetensors"]


def test_checkpoint_save_is_atomic_and_keeps_an_existing_mode(tmp_path, monkeypatch):
    """A save that fails midway leaves the previous checkpoint as it was and no partial file; a save over an
    existing checkpoint keeps its mode (as open(path, "w") would)."""
    import safetensors.torch

    path = tmp_path / "vae.safetensors"
    train.save_checkpoint(path, torch.nn.Linear(1, 1), None, {"model": "x"})
    os.chmod(path, 0o640)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, torch.nn.Linear(2, 2), None, {"model": "x"})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["vae.safetensors"]
    monkeypatch.undo()
    train.save_checkpoint(path, torch.nn.Linear(2, 2), None, {"model": "x"})
    assert path.read_bytes() != before and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["vae.safetensors"]
