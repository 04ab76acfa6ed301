"""What the training families (genkernels.train, train_vae, train_flow) share.

Config checks, the device and backend defaults, model presets, the training loop's bookkeeping
(parameter initialization, optimizer step, progress bar, periodic and final checkpoints), the
safetensors checkpoint format with its JSON metadata, and the PNG grid defaults of sampling.
genkernels.train re-exports the public names (save_checkpoint, read_metadata, default_backend...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Callable

import torch

from ._checks import as_number, is_finite_real, is_integer, positive_int

CHECKPOINT_FORMAT = 1
METADATA_KEY = "genkernels"


# --------------------------------------------------------------------------- config checks


def python_numbers(config) -> None:
    """Replace the NumPy scalars among the fields of the dataclass ``config`` by the equal Python numbers
    (:func:`genkernels._checks.as_number`), so that its checks, the training loop and the checkpoint's JSON
    metadata see Python numbers only."""
    for field in dataclasses.fields(config):
        setattr(config, field.name, as_number(getattr(config, field.name)))


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_at_least(name: str, value: int, low: int) -> None:
    """A ValueError naming ``name`` unless ``value`` is an int (not a bool, not a float such as 2.0) >= ``low``."""
    if not is_integer(value):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_positive(name: str, value: float) -> None:
    """A ValueError naming ``name`` unless ``value`` is a finite real number > 0 (not a bool)."""
    if not (is_finite_real(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    """A ValueError naming ``name`` unless ``value`` is a finite real number >= 0 (not a bool)."""
    if not (is_finite_real(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_steps(steps: int, batch_size: int) -> None:
    check_at_least("steps", steps, 1)
    check_at_least("batch_size", batch_size, 1)


def check_batch_size(batch_size: int, images: int, name: str = "batch_size", held_out: int = 0) -> None:
    """A ValueError naming ``name`` when a batch of ``batch_size`` cannot be drawn from ``images`` training images
    (``held_out`` more were set aside for evaluation: the message says so).

    An error rather than a cap: the batch size sets the gradient's noise and, with the learning rate, the
    run's dynamics, so a run that quietly trains on a smaller batch than the one asked for (the whole data
    set) is not the run the user configured; a warning would scroll by under the progress bar. The error
    says the largest batch that fits, and the user chooses."""
    if batch_size > images:
        of = f"the {images} training images" + (f" ({images + held_out} less {held_out} held out)" if held_out else "")
        raise ValueError(f"{name} must be at most {of}, got {batch_size}")


def check_seed(seed: int) -> None:
    """A seed every generator of the training loops takes (torch's, the Philox ops'): an int in [0, 2^63)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")


# --------------------------------------------------------------------------- device, backend, model presets


def default_backend(device: torch.device | str) -> str:
    """ "reference" on CPU (see the module doc of genkernels.train), "auto" elsewhere."""
    return "reference" if torch.device(device).type == "cpu" else "auto"


def backend_scope(device: torch.device | str, backend: str | None) -> contextlib.AbstractContextManager:
    """The ``genkernels.backend`` block that training and sampling on ``device`` run in.

    ``backend`` given: that backend for every op. Else, when nothing around chose a backend for every op (no
    ``genkernels.backend(name)`` block, no GENKERNELS_BACKEND), the device's :func:`default_backend` for every
    op not chosen by name (a surrounding ``genkernels.backend(name, ops=...)`` block's choices stay); else no
    block of its own, so what surrounds the call applies."""
    from . import _registry

    if backend is not None:
        return _registry.backend(backend)
    if _registry.requested(None) == "auto":
        return _registry.fallback(default_backend(device))
    return contextlib.nullcontext()


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device; None: cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def levels_that_fit(size: int, levels: int) -> int:
    """The most resolution levels, at most ``levels``, whose halvings of ``size`` stay whole and >= 2 pixels."""
    while levels > 1 and (size % 2 ** (levels - 1) or size // 2 ** (levels - 1) < 2):
        levels -= 1
    return levels


def preset_for(presets: dict[str, Callable], preset: str, data) -> tuple[object, int, int]:
    """(the default config of ``preset``, the data's channels, its image size); square images only."""
    if preset not in presets:
        raise ValueError(f"model preset must be one of {sorted(presets)}, got {preset!r}")
    c, h, w = data.image_shape
    base = presets[preset]()
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    return base, c, h


# --------------------------------------------------------------------------- the training loop


def init_training(build: Callable[[], torch.nn.Module], config, device: torch.device):
    """(model, AdamW optimizer, CPU generator), all from ``config.seed``: the same seed, the same run."""
    torch.manual_seed(config.seed)  # parameter initialization
    gen = torch.Generator().manual_seed(config.seed)
    model = build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return model, opt, gen


def run_metadata(model_name: str, model_config, dataset, /, **entries) -> dict:
    """A training run's checkpoint metadata: the format, what the model is and its config, the family's
    ``entries``, the data's class names and image shape, and the step (0 until the run updates it)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model_name,
        "config": json.loads(model_config.to_json()),
        **entries,
        "class_names": list(dataset.class_names),
        "image_shape": list(dataset.image_shape),
        "step": 0,
    }


def checkpoint_path(
    out_dir: str | Path | None, family: str, overwrite: bool, option: str = "overwrite=True"
) -> Path | None:
    """``out_dir/FAMILY.safetensors``, the checkpoint a training run writes (None when ``out_dir`` is None).

    Called before any work, and creates nothing. A checkpoint already there (an earlier run's) is a
    FileExistsError unless ``overwrite``: a second run into the same folder would otherwise replace the
    first one's weights without a word. A folder of that name is a FileExistsError either way (the run
    could not write its checkpoint at the end). ``option``: how the message tells to overwrite.
    """
    if out_dir is None:
        return None
    path = Path(out_dir) / f"{family}.safetensors"
    if path.is_dir():
        raise FileExistsError(f"{str(path)!r} is a folder, so the checkpoint cannot be written there")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{str(path)!r} exists (an earlier run's checkpoint); pass {option} to replace it, "
            "or write to another folder"
        )
    return path


class TrainLoop:
    """The bookkeeping of every family's training loop.

    Iterating gives the step numbers behind a tqdm bar ("train FAMILY"); :meth:`update` takes one
    optimizer step; :meth:`show` sets the bar's postfix every 10 steps and at the last;
    :meth:`saved` writes the checkpoint ``out_path`` (:func:`checkpoint_path`; its folder is created here)
    every ``save_every`` steps before the last; :meth:`finish` puts the models in eval mode and writes the
    final checkpoint.
    """

    def __init__(
        self,
        family: str,
        model: torch.nn.Module,
        metadata: dict,
        steps: int,
        save_every: int,
        out_path: Path | None,
        progress: bool,
        ema: torch.nn.Module | None = None,
    ) -> None:
        self.steps, self.model, self.ema, self.metadata, self.save_every = steps, model, ema, metadata, save_every
        self.out_path = out_path
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)

        from tqdm.auto import tqdm

        self.bar = tqdm(range(steps), desc=f"train {family}", disable=not progress, dynamic_ncols=True)

    def __iter__(self):
        return iter(self.bar)

    def update(self, opt, loss: torch.Tensor, step: int, grad_clip: float, what: str = "loss") -> float:
        """Backward, clip, step; returns the loss value (FloatingPointError when it is not finite)."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged: {what} {value} at step {step}; try a lower --lr")
        return value

    def show(self, step: int, postfix: Callable[[], dict]) -> None:
        if step % 10 == 0 or step == self.steps - 1:
            # A dict keeps this order; keyword arguments would be sorted alphabetically.
            self.bar.set_postfix(postfix())

    def saved(self, done: int) -> None:
        """After ``done`` steps: the periodic checkpoint, when one is due."""
        if self.out_path is not None and self.save_every > 0 and done % self.save_every == 0 and done < self.steps:
            save_checkpoint(self.out_path, self.model, self.ema, {**self.metadata, "step": done})

    def finish(self) -> None:
        self.model.eval()
        if self.ema is not None:
            self.ema.eval()
        self.metadata["step"] = self.steps
        if self.out_path is not None:
            save_checkpoint(self.out_path, self.model, self.ema, self.metadata)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, model: torch.nn.Module, ema: torch.nn.Module | None, metadata: dict) -> None:
    """Write ``model.*`` (and ``ema.*``) weights and the JSON metadata as one safetensors file.

    Shared by every family: the metadata's ``model`` key names what the weights are, and
    :func:`read_metadata` checks it. The file appears at ``path`` only once complete (written to a
    temporary file beside it, then renamed over it), with the permissions ``open(path, "w")`` would
    give: an existing file's mode, else 0666 less the umask (not safetensors' private 0600).
    """
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # The kernel applies the umask (and a folder's default ACL) to the mode of a file created 0666: read
    # that off a new file rather than calling os.umask, which sets the umask of every thread to learn it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(path).st_mode)  # open(path, "w") keeps an existing file's mode
        # safetensors writes through a private (0600) temporary file of its own, renamed over ``tmp``.
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_metadata(path: str | Path, model: str = "diffusion-unet", family: str = "diffusion") -> dict:
    """The JSON metadata of a checkpoint written by :func:`save_checkpoint` whose ``model`` is ``model``.

    Raises FileNotFoundError for a missing file, ValueError for a file that is not a safetensors file,
    has no genkernels metadata, or holds another model. ``family`` is the name the errors use
    ("diffusion", "vae", "flow").
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {str(path)!r} {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a file that is not one of its own
        raise ValueError(f"{str(path)!r} is not a safetensors checkpoint: {e}") from e
    if METADATA_KEY not in meta:
        raise ValueError(f"{str(path)!r} has no {METADATA_KEY!r} metadata: not a genkernels {family} checkpoint")
    try:
        data = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r}: its {METADATA_KEY!r} metadata is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r}: its {METADATA_KEY!r} metadata is not a JSON object: not a genkernels file")
    if data.get("model") != model:
        raise ValueError(
            f"{str(path)!r} holds a {data.get('model')!r} model, not a {family} checkpoint (model {model!r})"
        )
    return data


def checkpoint_weights(path: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The weights saved under ``prefix`` (``model.`` or ``ema.``), without the prefix."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- sample grids


def grid_options(seed, ncol, scale, default_ncol: int, channels: int | None = None) -> tuple[int, int, int | None]:
    """(seed, ncol, scale) of a sampler that writes a PNG grid (:func:`write_grid`), checked before it samples.

    seed: an int in [0, 2^63) (:func:`check_seed`; NumPy integers taken as the Python int). ncol: a positive int,
    None: ``default_ncol``. scale: a positive int, None: kept (:func:`write_grid` upscales to about 64 px). Bools
    and floats are refused with a ValueError naming the option, before any sampling rather than after it (NumPy
    would otherwise fail on a float only when the grid is drawn, and take True as 1). ``channels``: the images'
    channels, when known: a PNG holds 1 (grey) or 3 (RGB), else a ValueError before sampling too."""
    seed = as_number(seed)
    check_seed(seed)
    ncol = default_ncol if ncol is None else positive_int("ncol", ncol)
    scale = None if scale is None else positive_int("scale", scale)
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"the images have {channels} channels; a PNG grid takes 1 (grey) or 3 (RGB)")
    return seed, ncol, scale


def write_grid(images: torch.Tensor, out: str | Path, ncol: int, scale: int | None) -> tuple[int, int]:
    """genkernels.data.save_grid with images upscaled ``scale`` times (None: to about 64 px); ``ncol`` and
    ``scale`` as :func:`grid_options` returns them."""
    from .data import save_grid

    scale = max(1, 64 // images.shape[-2]) if scale is None else scale
    return save_grid(images, out, ncol=ncol, scale=scale)
