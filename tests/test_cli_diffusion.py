"""`genkernels train diffusion` and `genkernels sample diffusion`: end to end on CPU, and clear argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from genkernels import train
from genkernels.cli import main
from tests._cli import assert_same_grid_twice, assert_usage_error, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints of 3-step training runs from the command line (eps and flow)."""
    argv = ["--steps", "3", "--model", "tiny", "--batch-size", "16"]
    return {obj: train_run(tmp_path_factory, "diffusion", *argv, "--objective", obj) for obj in ("eps", "flow")}


def test_train_writes_a_checkpoint(runs, capsys):
    meta = train.read_metadata(runs["eps"])
    assert meta["objective"] == "eps" and meta["step"] == 3 and meta["config"]["block_out_channels"] == [16, 32]
    assert train.read_metadata(runs["flow"])["objective"] == "flow"


@pytest.mark.parametrize("sampler", sorted(train.SAMPLERS))
def test_sample_every_sampler_writes_the_grid(runs, sampler, tmp_path, capsys):
    ckpt = runs["flow" if sampler == "flow" else "eps"]
    out = tmp_path / "grid.png"
    argv = [
        "sample",
        "diffusion",
        "--ckpt",
        str(ckpt),
        "--sampler",
        sampler,
        "--steps",
        "2",
        "--guidance",
        "2",
        "--seed",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    # 40 images (4 per class), one column per class, 8x8 digits upscaled 8x with 1-pixel gaps.
    with Image.open(out) as im:
        assert im.size == (10 * 65 + 1, 4 * 65 + 1) and im.mode == "L"
    assert f"wrote 40 samples ({sampler}, 2 steps, guidance 2.0)" in capsys.readouterr().out


def test_sample_layout_options_and_default_sampler(runs, tmp_path):
    out = tmp_path / "one-class.png"
    argv = [
        "sample",
        "diffusion",
        "--ckpt",
        str(runs["flow"]),
        "--steps",
        "2",
        "--num",
        "5",
        "--label",
        "3",
        "--ncol",
        "5",
        "--scale",
        "2",
        "--raw-weights",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0  # no --sampler: flow for a flow checkpoint
    with Image.open(out) as im:
        assert im.size == (5 * 17 + 1, 17 + 1)


def test_no_cuda_graph_option(runs, tmp_path, monkeypatch):
    """The sampler's cuda_graph: None (auto: a graph on a GPU from 8 steps) by default, False with the option."""
    from genkernels import train

    seen, sample = [], train.sample_diffusion

    def spy(*args, **kwargs):
        seen.append(kwargs["cuda_graph"])
        return sample(*args, **kwargs)

    monkeypatch.setattr(train, "sample_diffusion", spy)
    argv = ["sample", "diffusion", "--ckpt", str(runs["eps"]), "--steps", "2", "--num", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b.png"), "--no-cuda-graph"]) == 0
    assert seen == [None, False]


def test_same_seed_same_grid(runs, tmp_path):
    argv = ["sample", "diffusion", "--ckpt", str(runs["eps"]), "--sampler", "ddpm", "--steps", "2", "--num", "4"]
    assert_same_grid_twice([*argv, "--seed", "7", "--no-progress"], tmp_path)


def test_sampler_objective_mismatch_is_a_clear_error(runs, tmp_path, capsys):
    argv = ["sample", "diffusion", "--ckpt", str(runs["eps"]), "--sampler", "flow", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sampler 'flow' needs a model trained with objective flow" in err
    assert "trained with objective 'eps'" in err and "--objective flow" in err
    argv = ["sample", "diffusion", "--ckpt", str(runs["flow"]), "--sampler", "dpm++", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert "objective eps or v" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "diffusion"], "the following arguments are required: --out"),
        (["train", "nope", "--out", "x"], "argument family: invalid choice: 'nope'"),
        (["train", "diffusion", "--out", "x", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
        (["train", "diffusion", "--out", "x", "--objective", "x0"], "argument --objective: invalid choice: 'x0'"),
        (["train", "diffusion", "--out", "x", "--label-dropout", "1.5"], "expected a number in [0, 1), got 1.5"),
        (["train", "diffusion", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["sample", "diffusion"], "the following arguments are required: --ckpt"),
        (["sample", "diffusion", "--ckpt", "c", "--sampler", "plms"], "argument --sampler: invalid choice: 'plms'"),
        (["sample", "diffusion", "--ckpt", "c", "--seed", str(2**64)], "--seed: expected an integer in [0, 2^63)"),
        (["train", "diffusion", "--out", "x", "--save-every", "-3"], "--save-every: expected an integer >= 0"),
        (["sample", "diffusion", "--ckpt", "c", "--guidance", "nan"], "--guidance: expected a finite number, got nan"),
    ],
)
def test_argument_errors(argv, message, capsys):
    assert_usage_error(argv, message, capsys)


def test_file_errors(runs, tmp_path, capsys):
    assert main(["train", "diffusion", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "--data: data folder" in capsys.readouterr().err
    assert main(["sample", "diffusion", "--ckpt", str(tmp_path / "none.safetensors")]) == 2
    assert "--ckpt: checkpoint" in capsys.readouterr().err
    assert main(["sample", "diffusion", "--ckpt", str(runs["eps"]), "--label", "10", "--out", "x.png"]) == 2
    assert "--label must be in [-1, 9]" in capsys.readouterr().err


def test_errors_found_before_any_work(runs, tmp_path, capsys, monkeypatch):
    """Outputs that cannot be written, a --backend that cannot run here and a checkpoint whose weights do not fit
    its metadata: a one-line error and status 2, found before training or sampling starts (nothing written)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    a_file, png, ckpt = tmp_path / "file", str(tmp_path / "x.png"), str(runs["eps"])
    a_file.write_text("")
    with safe_open(ckpt, framework="pt") as f:  # the checkpoint less one tensor, under its own metadata
        tensors = load_file(ckpt)
        tensors.pop(sorted(tensors)[0])
        save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=f.metadata())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sample = ["sample", "diffusion", "--ckpt", ckpt, "--out"]
    cpu = ["--device", "cpu"]  # where a GPU is the default device, triton and cuda run there
    cases = [
        (["train", "diffusion", "--out", str(a_file)], "exists and is not a folder"),
        (["train", "diffusion", "--out", str(tmp_path / "o"), "--backend", "triton", *cpu], "TRITON_INTERPRET=1"),
        ([*sample, str(tmp_path)], "is a folder; give the image file"),
        ([*sample, str(tmp_path / "grid")], "must end in an image extension"),
        ([*sample, str(a_file / "x.png")], "is a file, so the image's folder"),
        ([*sample, png, "--backend", "cuda", *cpu], "--backend cuda: the cuda backend runs on a CUDA device"),
        (["sample", "diffusion", "--ckpt", str(tmp_path), "--out", png], "is a folder, not a checkpoint file"),
        (["sample", "diffusion", "--ckpt", str(tmp_path / "broken.safetensors"), "--out", png], "weights do not fit"),
        ([*sample, png, "--steps", "1001"], "--steps must be at most the 1000 timesteps the model was trained on"),
    ]
    for argv, message in cases:
        assert main([*argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    # The backend of GENKERNELS_BACKEND is checked the same way, and named as such.
    train = ["train", "diffusion", "--out", str(tmp_path / "o"), "--no-progress", *cpu]
    for env, message in (("bogus", "GENKERNELS_BACKEND=bogus: not a backend"), ("cuda", "=cuda: the cuda backend")):
        monkeypatch.setenv("GENKERNELS_BACKEND", env)
        assert main(train) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "file"]


def test_module_entry_point():
    """`python -m genkernels` reaches the same parser (no import-time side effects break it)."""
    done = subprocess.run([sys.executable, "-m", "genkernels", "sample", "diffusion"], capture_output=True, text=True)
    assert done.returncode == 2 and "required: --ckpt" in done.stderr
