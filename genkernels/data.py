"""Training data for the generative models: the 8x8 digits shipped with scikit-learn, or a folder of images.

Both give a :class:`ImageDataset`: images (N, C, H, W) float32 in [-1, 1] and labels (N,) int64,
held in memory. Nothing is downloaded: scikit-learn ships the digits in its package, and a
folder is read from disk.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._checks import is_integer, positive_int

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageDataset:
    """Images in [-1, 1] with integer class labels.

    Attributes:
        images: (N, C, H, W) float32 in [-1, 1].
        labels: (N,) int64 in [0, num_classes).
        class_names: one name per class (the label's meaning).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled minibatches (images, labels) of exactly ``batch_size`` distinct images.

        Every epoch is a fresh permutation of the N images (drawn with ``generator``) cut into
        N // batch_size batches; the N % batch_size images left at its end are dropped for that epoch
        (a different few every epoch), so that every step has the same batch size. batch_size must be
        in [1, N]: anything else is a ValueError here, when called, not a smaller batch (see
        genkernels._training.check_batch_size).
        """
        if not is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        batch_size = int(batch_size)
        if batch_size > len(self):
            raise ValueError(f"batch_size must be at most the data set's {len(self)} images, got {batch_size}")
        return self._epochs(batch_size, generator)

    def _epochs(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        while True:
            order = torch.randperm(n, generator=generator)
            for i in range(0, n - batch_size + 1, batch_size):
                idx = order[i : i + batch_size]
                yield self.images[idx], self.labels[idx]


def digits() -> ImageDataset:
    """The scikit-learn 8x8 digits: 1,797 grey images (1, 8, 8), labels 0-9.

    Pixel values 0..16 map linearly to [-1, 1]: x / 8 - 1.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    return ImageDataset(images, labels, [str(i) for i in range(10)])


def image_folder(path: str | Path, size: int, channels: int = 3) -> ImageDataset:
    """Images from a folder, resized to size x size (bicubic), as (N, channels, size, size) in [-1, 1].

    Layout: either subfolders, one per class (``root/cat/*.png``, ``root/dog/*.jpg``: labels follow
    the sorted subfolder names), or images directly in ``root`` (one class, label 0); images in both
    places are a ValueError (which layout is meant is not clear). Files whose suffix is not an image
    suffix are skipped, and so are hidden files and folders (names starting with '.': a notebook's
    ``.ipynb_checkpoints``, macOS's ``._*`` metadata). size: a positive int. channels: 1 (greyscale) or
    3 (RGB). Images are turned upright as their EXIF orientation says (as viewers show them), then
    non-square ones are center-cropped to a square. 16-bit images are read as their 8-bit equivalent
    (v / 257); a file PIL cannot read is a ValueError naming it.
    """
    try:
        from PIL import Image, ImageOps
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImportError("reading an image folder needs pillow: pip install pillow") from e
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist or is not a folder")
    if not is_integer(channels) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    size = positive_int("size", size)

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in _visible(folder) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    class_dirs = sorted(p for p in _visible(root) if p.is_dir() and images_in(p))
    loose = images_in(root)
    if class_dirs and loose:
        raise ValueError(
            f"data folder {str(root)!r} has {len(loose)} image(s) directly in it ({loose[0].name}, ...) and "
            f"subfolders {[d.name for d in class_dirs]} of images: put every image in a class subfolder, or "
            "move the subfolders out for one class"
        )
    if class_dirs:
        files = [(f, i) for i, d in enumerate(class_dirs) for f in images_in(d)]
        names = [d.name for d in class_dirs]
    else:
        files = [(f, 0) for f in loose]
        names = [root.name or "images"]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r} or its subfolders")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
        except (OSError, SyntaxError) as e:  # PIL's errors for a file that is not (or no longer) an image
            raise ValueError(f"cannot read image {str(f)!r}: {e}") from None
        im = _eight_bit(im, f).convert(mode)
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32).reshape(size, size, channels)
        arrays.append(a.transpose(2, 0, 1))
    images = torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).float()
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageDataset(images, labels, names)


def _visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` whose names do not start with '.' (hidden files and folders are not data)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def _eight_bit(im, path: Path):
    """``im`` with 16-bit pixels (modes I;16*, and I, which older Pillows open 16-bit PNGs as) as 8-bit grey,
    v / 257 rounded: PIL's own conversion clips them at 255 (a 16-bit image turns white). Float pixels (mode F)
    have no fixed range: refused."""
    from PIL import Image

    if im.mode == "F":
        raise ValueError(
            f"image {str(path)!r} has float pixels (mode F), which have no fixed range; save it as 8 or 16 bits"
        )
    if im.mode != "I" and not im.mode.startswith("I;16"):
        return im
    pixels = np.asarray(im, dtype=np.float64) / 257.0
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def load(data: str, size: int | None = None, channels: int = 3) -> ImageDataset:
    """``"digits"`` (size and channels ignored: 1 x 8 x 8), or a folder (:func:`image_folder`; size default 32)."""
    if data == "digits":
        return digits()
    return image_folder(data, 32 if size is None else size, channels)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 in [0, 255] (values outside [-1, 1] clamp; NaN is 0, as -1)."""
    x = images.detach().float().cpu().nan_to_num(nan=-1.0)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path: str | Path, ncol: int, scale: int = 1, pad: int = 1) -> tuple[int, int]:
    """Write images (N, C, H, W) in [-1, 1] (N >= 1) as one PNG grid; returns its (width, height).

    min(ncol, N) images per row, rows = ceil(N / ncol); each image is upscaled ``scale`` times (nearest)
    and separated by ``pad`` mid-grey (128) pixels, so width = min(ncol, N) * (W * scale + pad) + pad and
    height = rows * (H * scale + pad) + pad. ncol and scale: positive ints, pad: an int >= 0. C = 1 writes
    greyscale, C = 3 RGB. NaN pixels are drawn black (as -1), with a RuntimeWarning saying how many images
    hold NaN. The folder of ``path`` is created if needed.
    """
    from PIL import Image

    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError(f"images must hold at least one image, got shape {tuple(images.shape)}")
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels to be written as PNG, got {c}")
    ncol, scale = positive_int("ncol", ncol), positive_int("scale", scale)
    if not is_integer(pad) or pad < 0:
        raise ValueError(f"pad must be an int >= 0, got {pad!r}")
    pad = int(pad)
    nan_images = int(images.detach().isnan().flatten(1).any(1).sum())
    if nan_images:
        warnings.warn(f"save_grid: {nan_images} of the {n} images hold NaN, drawn black", RuntimeWarning, stacklevel=2)
    ncol = min(ncol, n)
    rows = -(-n // ncol)
    hs, ws = h * scale, w * scale
    # Grey gaps: digits and most samples have dark backgrounds that a black gap would merge into.
    grid = np.full((rows * (hs + pad) + pad, ncol * (ws + pad) + pad, c), 128, dtype=np.uint8)
    pixels = to_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (hs + pad), pad + q * (ws + pad)
        grid[y : y + hs, x : x + ws] = pixels[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(path)
    return grid.shape[1], grid.shape[0]
