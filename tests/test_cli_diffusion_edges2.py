"""`genkernels sample diffusion` on checkpoints whose metadata is damaged, that hold no EMA weights, or whose model
never learned the unconditional prediction: a one-line error and status 2, before any sampling."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from genkernels import train
from genkernels.cli import main
from tests._cli import train_run
from tests.criterion import assert_criterion

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--steps", "1", "--model", "tiny", "--batch-size", "4"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_run(tmp_path_factory, "diffusion", *TINY)


def _sample(ckpt, tmp_path, *options: str) -> list[str]:
    out = str(tmp_path / "grid.png")
    return ["sample", "diffusion", "--ckpt", str(ckpt), "--steps", "1", "--num", "2", "--out", out, *options]


def _assert_refused(argv: list[str], message: str, capsys) -> None:
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def _with_metadata(ckpt, path, change) -> str:
    """A copy of ``ckpt`` at ``path`` with its genkernels metadata passed through ``change`` (a dict -> dict)."""
    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["genkernels"])
    save_file(load_file(str(ckpt)), str(path), metadata={"genkernels": json.dumps(change(meta))})
    return str(path)


def _without(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _set(key, value):
    return lambda meta: {**meta, key: value}


@pytest.mark.parametrize(
    "change,message",
    [
        (_without("objective"), "its metadata has no 'objective'"),
        (_set("objective", "x0"), "its metadata's objective must be one of ('eps', 'v', 'flow'), got 'x0'"),
        (_without("schedule"), "its metadata has no 'schedule'"),
        (_set("schedule", {"num_train_timesteps": 1000, "beta_schedule": "cosine"}), "beta_schedule must be one of"),
        (_set("schedule", {"timesteps": 1000}), "its metadata's schedule"),
        (_set("image_shape", [3, 8, 8]), "image_shape [3, 8, 8] does not fit its model's 1 channels"),
        (_set("image_shape", [1, 8]), "image_shape must be [C, H, W] of positive ints, got [1, 8]"),
        (lambda m: {**m, "config": {**m["config"], "bogus": 1}}, "its metadata's config: unknown UNetConfig keys"),
        (_set("backbone", "dit"), "backbone 'dit' does not fit model 'diffusion-unet'"),
        (lambda m: [m], "metadata is not a JSON object"),
    ],
)
def test_damaged_metadata_is_a_one_line_error(ckpt, tmp_path, capsys, change, message):
    """Each was a traceback (KeyError, ValueError from a scheduler or the model, a message listing no sampler)."""
    damaged = _with_metadata(ckpt, tmp_path / "damaged.safetensors", change)
    _assert_refused(_sample(damaged, tmp_path), message, capsys)
    with pytest.raises(ValueError, match="damaged.safetensors"):
        train.read_metadata(damaged)
    assert not (tmp_path / "grid.png").exists()


def test_a_checkpoint_without_ema_weights(ckpt, tmp_path, capsys):
    """A checkpoint saved without its EMA was a traceback unless --raw-weights was given."""
    model, meta = train.load_checkpoint(ckpt, ema=False)
    path = tmp_path / "raw.safetensors"
    train.save_checkpoint(path, model, None, meta)
    _assert_refused(_sample(path, tmp_path), "has no ema.* weights", capsys)
    assert main([*_sample(path, tmp_path, "--raw-weights"), "--no-progress"]) == 0


def test_label_is_checked_before_the_weights_load(ckpt, tmp_path, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(train, "load_checkpoint", load)
    _assert_refused(_sample(ckpt, tmp_path, "--label", "10"), "--label must be in [-1, 9]", capsys)


def test_guidance_of_a_model_trained_without_label_dropout(tmp_path_factory, tmp_path, capsys):
    """--label-dropout 0 never trains the null label: the default guidance (3) sampled with an untrained
    unconditional branch, and no error. Now the default is 1 there, and guidance or --label -1 are refused."""
    ckpt = train_run(tmp_path_factory, "diffusion", *TINY, "--label-dropout", "0")
    assert train.read_metadata(ckpt)["label_dropout"] == 0.0
    assert main([*_sample(ckpt, tmp_path), "--no-progress"]) == 0
    assert "guidance 1.0" in capsys.readouterr().out
    for option in (["--guidance", "3"], ["--label", "-1"]):
        _assert_refused(_sample(ckpt, tmp_path, *option), "trained with --label-dropout 0", capsys)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_out_of_range_labels_on_a_gpu_are_refused_before_the_model(ckpt, cuda_graph):
    """On a GPU the models check no label values (that would wait for the device): an out-of-range label reached
    the embedding as a device-side assert, after which no CUDA call of the process worked. Labels on the device
    are checked by sample_diffusion, and sampling still works afterwards."""
    import torch

    model, meta = train.load_checkpoint(ckpt, device="cuda", backend="reference")
    kwargs = dict(sampler="ddim", steps=train.GRAPH_MIN_STEPS, guidance=2.0, seed=1, cuda_graph=cuda_graph)
    with pytest.raises(ValueError, match=r"labels must be class labels in \[0, 10\]"):
        train.sample_diffusion(model, meta, torch.tensor([0, 11], device="cuda"), **kwargs)
    labels = torch.tensor([0, 10], device="cuda", dtype=torch.uint8)
    x = train.sample_diffusion(model, meta, labels, **kwargs)
    plain = train.sample_diffusion(model, meta, labels, **{**kwargs, "cuda_graph": False})
    reference = train.sample_diffusion(model.double(), meta, labels, **{**kwargs, "cuda_graph": False})
    assert x.device.type == "cuda" and x.shape == (2, 1, 8, 8)
    assert_criterion(x, plain, reference)


def test_dit_on_images_its_patches_do_not_divide(tmp_path, capsys):
    """The error spoke of patch_size and sample_size, names the user never gave: now it names --backbone and
    --image-size."""
    import numpy as np
    from PIL import Image

    (tmp_path / "data" / "a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((9, 9, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "data" / "a" / f"{i}.png")
    argv = ["train", "diffusion", "--data", str(tmp_path / "data"), "--image-size", "7", "--backbone", "dit"]
    _assert_refused(
        [*argv, *TINY[:-1], "2", "--out", str(tmp_path / "o")],
        "--backbone dit (--model tiny) on 7x7 images: patch_size=2 must divide sample_size=7",
        capsys,
    )
