"""Edges of the package's infrastructure: image folders and PNG grids (genkernels.data), the documented
submodules reached from ``import genkernels``, number checks, CUDA-graph calls and the package metadata."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement

import genkernels
from genkernels import _checks, _graphs, data

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _save(path: pathlib.Path, pixels: np.ndarray, **kwargs) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path, **kwargs)


def _rgb(rng: np.random.Generator, h: int = 6, w: int = 6) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_image_folder_skips_hidden_files_and_folders(tmp_path):
    """Images directly in the folder, next to a notebook's hidden checkpoint folder and macOS metadata files:
    the hidden ones are not images of the data set (the checkpoint folder was taken as the only class and the
    folder's own images dropped; a '._x.png' metadata file was an unreadable image)."""
    rng = np.random.default_rng(0)
    for i in range(3):
        _save(tmp_path / f"img{i}.png", _rgb(rng))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _save(tmp_path / ".ipynb_checkpoints" / "img0-checkpoint.png", _rgb(rng))
    (tmp_path / "._img0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    ds = data.image_folder(tmp_path, size=6)
    assert len(ds) == 3 and ds.class_names == [tmp_path.name] and ds.labels.tolist() == [0, 0, 0]
    expected = np.stack([np.asarray(_load_rgb(tmp_path / f"img{i}.png")) for i in range(3)])
    torch.testing.assert_close(ds.images, torch.from_numpy(expected.transpose(0, 3, 1, 2) / 127.5 - 1).float())


def _load_rgb(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_image_folder_refuses_images_both_in_the_folder_and_in_subfolders(tmp_path):
    """Which layout is meant is not clear: class subfolders would silently drop the folder's own images."""
    rng = np.random.default_rng(1)
    _save(tmp_path / "loose.png", _rgb(rng))
    (tmp_path / "cats").mkdir()
    _save(tmp_path / "cats" / "0.png", _rgb(rng))
    with pytest.raises(ValueError, match=r"1 image\(s\) directly in it .*loose\.png.*subfolders \['cats'\]"):
        data.image_folder(tmp_path, size=6)
    (tmp_path / "loose.png").unlink()
    assert data.image_folder(tmp_path, size=6).class_names == ["cats"]


def test_image_folder_turns_images_as_their_exif_orientation_says(tmp_path):
    """A camera's photo stored sideways with an EXIF orientation is shown upright by every viewer; the data set
    must hold it upright too."""
    from PIL import Image

    pixels = np.zeros((6, 6, 3), dtype=np.uint8)
    pixels[:, :3] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: displayed after a 90 degree clockwise turn
    _save(tmp_path / "photo.png", pixels, exif=exif)
    ds = data.image_folder(tmp_path, size=6, channels=1)
    upright = ds.images[0, 0]
    assert (upright[:3] == 1).all() and (upright[3:] == -1).all()  # white top half


@pytest.mark.parametrize("size", [0, 8.0, True, "8"])
def test_image_folder_size_must_be_a_positive_int(tmp_path, size):
    _save(tmp_path / "a.png", _rgb(np.random.default_rng(2)))
    with pytest.raises(ValueError, match=f"size must be a positive int, got {size!r}"):
        data.image_folder(tmp_path, size=size)


@pytest.mark.parametrize("channels", [True, 2, 3.0])
def test_image_folder_channels_must_be_1_or_3(tmp_path, channels):
    _save(tmp_path / "a.png", _rgb(np.random.default_rng(3)))
    with pytest.raises(ValueError, match=f"channels must be 1 or 3, got {channels!r}"):
        data.image_folder(tmp_path, size=4, channels=channels)


def test_image_folder_reads_every_pixel_mode(tmp_path):
    """RGBA, palette, CMYK, bilevel, grey with alpha and 16-bit grey all load, as the RGB / grey that PIL converts
    them to (16-bit: v / 257)."""
    from PIL import Image

    rng = np.random.default_rng(4)
    rgb = Image.fromarray(_rgb(rng))
    for mode in ("RGBA", "P", "CMYK", "1", "LA"):
        rgb.convert(mode).save(tmp_path / f"{mode}.{'tif' if mode == 'CMYK' else 'png'}")
    grey16 = rng.integers(0, 65536, (6, 6)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    ds = data.image_folder(tmp_path, size=6, channels=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(ds) == len(names) == 6
    got16 = (ds.images[names.index("grey16.png"), 0] + 1) * 127.5
    torch.testing.assert_close(got16, torch.from_numpy((grey16 / 257.0).round()).float(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("batch_size", [2.5, 2.0, True, 0])
def test_batches_refuses_a_batch_size_that_is_not_a_positive_int(batch_size):
    dataset = data.ImageDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64), ["x"])
    with pytest.raises(ValueError, match=f"batch_size must be an int >= 1, got {batch_size!r}"):
        dataset.batches(batch_size, torch.Generator())
    images, _ = next(dataset.batches(np.int64(2), torch.Generator().manual_seed(0)))
    assert images.shape == (2, 1, 2, 2)


def test_save_grid_odd_counts_and_more_columns_than_images(tmp_path):
    from PIL import Image

    images = torch.rand(3, 1, 2, 3) * 2 - 1
    assert data.save_grid(images, tmp_path / "g.png", ncol=8) == (3 * 4 + 1, 3 + 1 + 0)
    assert data.save_grid(images, tmp_path / "h.png", ncol=2, pad=0) == (6, 4)
    with Image.open(tmp_path / "h.png") as im:
        pixels = np.asarray(im)
    assert (pixels[2:, 3:] == 128).all()  # the missing fourth image is background
    np.testing.assert_array_equal(pixels[2:, :3], data.to_uint8(images[2:])[0, :, :, 0])


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(0, 3, 4, 4), r"images must hold at least one image, got shape \(0, 3, 4, 4\)"),
        (torch.zeros(3, 4, 4), r"images must be \(N, C, H, W\), got shape \(3, 4, 4\)"),
    ],
)
def test_save_grid_refuses_images_it_cannot_draw(tmp_path, images, message):
    with pytest.raises(ValueError, match=message):
        data.save_grid(images, tmp_path / "g.png", ncol=2)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ncol": 2.5}, "ncol must be a positive int, got 2.5"),
        ({"ncol": True}, "ncol must be a positive int, got True"),
        ({"ncol": 0}, "ncol must be a positive int, got 0"),
        ({"ncol": 2, "scale": 1.5}, "scale must be a positive int, got 1.5"),
        ({"ncol": 2, "pad": -1}, "pad must be an int >= 0, got -1"),
        ({"ncol": 2, "pad": 1.0}, "pad must be an int >= 0, got 1.0"),
    ],
)
def test_save_grid_options_must_be_ints(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.save_grid(torch.zeros(3, 3, 4, 4), tmp_path / "g.png", **kwargs)


def test_save_grid_takes_numpy_ints(tmp_path):
    size = data.save_grid(torch.zeros(3, 3, 4, 4), tmp_path / "g.png", ncol=np.int64(2), scale=np.int32(2))
    assert size == (2 * 9 + 1, 2 * 9 + 1)


def test_save_grid_says_when_images_hold_nan(tmp_path):
    """A diverged model's NaN samples are drawn black, as -1 is, and said to be NaN: a black grid is not mistaken
    for what the model learned."""
    images = torch.zeros(4, 1, 2, 2)
    images[1, 0, 0, 0] = float("nan")
    images[3] = float("nan")
    with pytest.warns(RuntimeWarning, match="2 of the 4 images hold NaN"):
        data.save_grid(images, tmp_path / "g.png", ncol=4, pad=0)
    assert data.to_uint8(images)[3].max() == 0 and data.to_uint8(images)[1, 0, 0, 0] == 0


def test_documented_submodules_are_reached_from_the_package():
    """``import genkernels`` then ``genkernels.models`` / ``.schedulers`` / ``.train`` / ``.data``, as the README
    names them (imported on first use)."""
    code = (
        "import sys, genkernels\n"
        "assert 'genkernels.models' not in sys.modules\n"
        "assert {'models', 'schedulers', 'train', 'data', 'bench'} <= set(dir(genkernels))\n"
        "print(genkernels.models.ImageGPT.__name__, genkernels.schedulers.DDIMScheduler.__name__,"
        " genkernels.train.sample_diffusion.__name__, genkernels.data.save_grid.__name__)\n"
        "try:\n    genkernels.nope\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "ImageGPT DDIMScheduler sample_diffusion save_grid",
        "module 'genkernels' has no attribute 'nope'",
    ]


@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["1e400", "-1e400"])
def test_number_checks_refuse_ints_beyond_float_range(value):
    """A Python int too large for a float is not a finite real: a ValueError naming the argument, not the
    OverflowError of converting it."""
    assert not _checks.is_finite_real(value)
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        _checks.nonnegative_float("eps", value)
    with pytest.raises(ValueError, match="eps"):
        genkernels.ops.group_norm(torch.randn(2, 4, 3, 3), 2, eps=value)
    from genkernels import _training, train_vae

    with pytest.raises(ValueError, match="lr must be a positive number"):
        _training.check_positive("lr", value)
    with pytest.raises(ValueError, match="grad_clip must be a finite number >= 0"):
        _training.check_nonnegative("grad_clip", value)
    with pytest.raises(ValueError, match="beta must be a number >= 0"):
        train_vae.VAETrainConfig(beta=value)


def test_graphed_call_refuses_a_tensor_as_its_example():
    """``example`` is one tensor per argument; a bare tensor iterates as its rows and was taken as that many
    inputs."""
    with pytest.raises(TypeError, match=r"example must be a sequence of tensors .* got a Tensor"):
        _graphs.GraphedCall(lambda x: x * 2, torch.randn(3, 4))


def _dependencies() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]


@pytest.mark.parametrize("torch_version, triton_pin", [("2.4.0", "3.0.0"), ("2.5.1", "3.1.0"), ("2.6.0", "3.2.0")])
def test_metadata_accepts_torch_2_4_and_the_triton_it_pins(torch_version, triton_pin):
    """torch >= 2.4 is accepted with the triton each torch release requires (==3.0.0 for 2.4): a triton floor
    above it made pip replace a user's torch 2.4 / 2.5 with the newest release to satisfy genkernels."""
    required = {r.name: r for r in _dependencies()}
    assert required["torch"].specifier.contains(torch_version)
    if "triton" in required:
        assert required["triton"].specifier.contains(triton_pin)


def test_triton_older_than_the_kernels_is_reported():
    """With the triton floor gone from the requirements, torch 2.4 / 2.5 come with triton 3.0 / 3.1: the triton
    backend names the version and the floor instead of failing inside a kernel; the extras the tests and the
    benchmarks install (a CPU torch brings no triton) keep the floor."""
    from genkernels.triton._common import too_old

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    assert too_old("3.0.0") == "triton 3.0.0 is older than 3.2, which the kernels need"
    assert too_old("3.1.0+git1234") is not None
    assert too_old("3.2.0") is None and too_old("3.9.0") is None and too_old("4.0") is None
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("test", "bench"):
        (spec,) = [Requirement(r) for r in extras[extra] if Requirement(r).name == "triton"]
        assert not spec.specifier.contains("3.1.0") and spec.specifier.contains("3.2.0")


def test_sdist_carries_the_extension_sources():
    """MANIFEST.in puts CMakeLists.txt and every file of csrc (kernels, bindings, headers) in the sdist."""
    manifest = (ROOT / "MANIFEST.in").read_text().split("\n")
    assert "include CMakeLists.txt" in manifest
    patterns = next(line.split()[2:] for line in manifest if line.startswith("recursive-include csrc"))
    files = [p for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    assert files and all(any(p.match(pattern) for pattern in patterns) for p in files)


class _FakeStream:
    def __init__(self, device):
        self.device = device

    def wait_stream(self, other):
        pass


def _fake_cuda(monkeypatch, current):
    """torch.cuda's streams, graphs and device context stood in for on the CPU; ``current[0]`` is the current
    device. Returns what torch.cuda.graph was entered with."""
    import contextlib

    captured = {}

    @contextlib.contextmanager
    def device_context(device):
        outer, current[0] = current[0], torch.device(device)
        yield
        current[0] = outer

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None, **kwargs):
        captured.update(stream=stream, current=current[0])
        yield

    monkeypatch.setattr(_graphs, "device_context", device_context)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream(device or current[0]))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream(device or current[0]))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return captured


def test_capture_captures_on_a_stream_of_the_current_device(monkeypatch):
    """torch.cuda.graph's shared default capture stream lives on whichever device was current at its first use;
    the capture stream is made on the current device instead, where the function's kernels run."""
    current = [torch.device("cuda", 1)]
    captured = _fake_cuda(monkeypatch, current)
    _, out = _graphs.capture(lambda: "out", warmups=1)
    assert out == "out" and captured["current"] == torch.device("cuda", 1)
    assert captured["stream"] is not None and captured["stream"].device == torch.device("cuda", 1)


def test_graphed_call_captures_with_its_inputs_device_current(monkeypatch):
    """A model on cuda:1 while cuda:0 is current (``--device cuda:1``): the warm-up and the capture run with
    cuda:1 current, so that its streams and kernels are on one device."""
    current = [torch.device("cuda", 0)]
    _fake_cuda(monkeypatch, current)
    ran_on = []

    def capture(fn, warmups=2):
        ran_on.append(current[0])
        return "graph", fn()

    monkeypatch.setattr(_graphs, "capture", capture)
    example = torch.zeros(2, device="meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda", 1)), raising=False)
    try:
        _graphs.GraphedCall(lambda x: x, (example,))
    finally:
        monkeypatch.undo()
    assert ran_on == [torch.device("cuda", 1)]


def test_float_checks_trace_under_dynamic_compile():
    """torch.compile(dynamic=True) traces Python floats as symbols, and math.isfinite on one broke the graph
    ("torch.* op returned non-Tensor"), so fullgraph failed for every op with a float argument left at its
    default (affine_coupling's clamp) or passed (group_norm's eps)."""
    torch._dynamo.reset()
    x, h = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)

    def coupling(x, h):
        return genkernels.ops.affine_coupling(x, h, scale="softclamp_tanh", backend="reference")

    def norm(x, eps):
        return genkernels.ops.group_norm(x, 2, eps=eps, activation="silu", backend="reference")

    for fn, args in ((coupling, (x, h)), (norm, (x, 1e-5)), (norm, (x, 1e-3))):
        got = torch.compile(fn, dynamic=True, fullgraph=True)(*args)
        torch.testing.assert_close(got, fn(*args), rtol=0, atol=0)
    assert not _checks.is_finite_real(float("nan")) and not _checks.is_finite_real(-float("inf"))
    assert _checks.is_finite_real(1e308) and _checks.is_finite_real(-0.0)
