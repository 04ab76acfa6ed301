"""Training and sampling of the normalizing flow (Glow) family (``genkernels train/sample flow``).

Objective: maximum likelihood of the discrete images under the flow's continuous density, with
uniform dequantization. With n_bins levels per pixel and D = C * H * W pixel elements:

    x01 = (x + 1) / 2                          the data's [-1, 1] images in [0, 1]
    k   = round(x01 * (n_bins - 1))            the pixel's level, an integer in [0, n_bins)
    x   = (k + u) / n_bins,  u ~ U(0, 1)^D     dequantized: x + U(0, 1 / n_bins) on the level's bin

    bits/dim = (-log p(x) + D log(n_bins)) / (D log 2)        (Glow.bits_per_dim)

where log p(x) is the flow's log density of x on [0, 1]^D (Glow.log_prob, nats; the model takes x
as it is: its first ActNorm, initialized from the first batch, centres and scales it). Each bin of
the discrete image has width 1 / n_bins, so -log p(x) + D log(n_bins) is, in expectation over u, an
upper bound on -log P(k) of the discrete model: bits/dim is a number of bits per pixel element,
comparable across image sizes and with log2(n_bins) for a model that knows nothing (uniform
levels). The training loss is the batch mean of bits/dim; AdamW, gradient-norm clipping.

n_bins: by default the number of evenly spaced levels the data's pixels take (:func:`pixel_levels`):
256 for 8-bit images, 17 for the scikit-learn digits, whose pixels are the counts 0..16. With 17
bins every digit level owns one bin of width 1/17 and the bins tile [0, 1]; with 256 bins the
digits would fill only 17 of the 256 bins (every 16th), the continuous density would have to
concentrate on 17 spikes of width 1/256 per pixel with empty gaps between them (a nearly
discontinuous map, hard for a smooth flow to fit), and the bits/dim would mostly measure how well
it squeezes mass into those spikes rather than how well it models the digits. Fewer bins
than the data's levels merge neighbouring levels (as Glow's 5-bit CelebA does).

Held-out bits/dim: a fixed fraction of the images, chosen by a permutation seeded with ``seed``, is
never trained on. Its bits/dim (one fixed dequantization noise, so evaluations are comparable) is
evaluated after ActNorm's data-dependent initialization on the first training batch (step 0),
every ``eval_every`` steps and at the end; the history is returned and stored in the checkpoint.

Sampling (:func:`sample_flow`) draws each level's latent from its learned prior with the standard
deviation scaled by the temperature, z = mean + temperature * std * eps (Glow.sample), maps
the flow's x in [0, 1] back to a level k = floor(x * n_bins) and writes the images as a PNG grid.

Checkpoints are safetensors files ``OUT/flow.safetensors``: the weights under ``model.`` and the
metadata key ``genkernels`` holding JSON: the Glow config, n_bins, the bits/dim history, the split,
the class names and image shape, where the data came from, and the training step (see
genkernels.train.save_checkpoint, shared with the other families).

Backends: every coupling and ActNorm op follows ``backend``; the default is "reference" on CPU and
auto on CUDA (genkernels.train.default_backend).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _training
from ._checks import as_number, check_backend, is_finite_real, is_integer, positive_int
from .data import ImageDataset
from .models.flow import Glow, GlowConfig

MODEL_PRESETS = ("tiny", "small")
CHECKPOINT_NAME = "flow.safetensors"
MODEL_NAME = "flow"  # the metadata's "model" entry
MAX_BINS = 256
EVAL_BATCH = 256  # held-out images per forward pass (no gradients: memory is not the limit)


@dataclass
class FlowTrainConfig:
    """Hyper-parameters of :func:`train_flow`.

    Args:
        steps: optimizer steps.
        batch_size: images per step, at most the N training images (those not held out; more is a
            ValueError when training starts, not a smaller batch). Each step takes that many distinct
            images; the last N % batch_size of every shuffled epoch are dropped (ImageDataset.batches).
        lr: AdamW learning rate.
        model: size preset, "tiny" (:meth:`GlowConfig.tiny`, tests) or "small" (:meth:`GlowConfig.digits`).
        n_bins: levels per pixel element, 2..256; None: :func:`pixel_levels` of the data (17 for the
            digits, 256 for 8-bit images; see the module doc).
        heldout: fraction of the images held out for evaluation, in (0, 1).
        eval_every: evaluate the held-out bits/dim every this many steps (0: only at step 0 and at the end).
        seed: parameter initialization, the held-out split, batch order and dequantization noise.
        save_every: also write the checkpoint every this many steps (0: only at the end).
        device: where to train (None: cuda when available, else cpu).
        backend: backend of every op; None: :func:`genkernels.train.default_backend` of the device.
        weight_decay: AdamW weight decay.
        grad_clip: gradient norm clipping (0: none).
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    model: str = "small"
    n_bins: int | None = None
    heldout: float = 0.1
    eval_every: int = 250
    seed: int = 0
    save_every: int = 0
    device: str | None = None
    backend: str | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _training.python_numbers(self)
        _training.check_choice("model", self.model, MODEL_PRESETS)
        _training.check_steps(self.steps, self.batch_size)
        _training.check_seed(self.seed)
        _training.check_positive("lr", self.lr)
        if self.n_bins is not None and not (is_integer(self.n_bins) and 2 <= self.n_bins <= MAX_BINS):
            raise ValueError(f"n_bins must be None or an int in [2, {MAX_BINS}], got {self.n_bins!r}")
        if not 0.0 < self.heldout < 1.0:
            raise ValueError(f"heldout must be a fraction in (0, 1), got {self.heldout}")
        _training.check_at_least("eval_every", self.eval_every, 0)
        _training.check_at_least("save_every", self.save_every, 0)
        _training.check_nonnegative("weight_decay", self.weight_decay)
        _training.check_nonnegative("grad_clip", self.grad_clip)
        check_backend(self.backend)  # here, not once the model is built and the output folder made


@dataclass
class FlowTrainResult:
    """What :func:`train_flow` returns.

    losses[k]: the batch-mean training bits/dim of step k. history: one entry per evaluation,
    ``{"step": s, "train": mean training bits/dim of the steps since the previous evaluation (None
    at step 0), "heldout": held-out bits/dim}``, in step order.
    """

    model: Glow
    losses: list[float]
    history: list[dict]
    metadata: dict


def pixel_levels(images: torch.Tensor) -> int:
    """The fewest evenly spaced levels in [-1, 1], at most 256, that hold every value of ``images``.

    k levels sit at -1 + 2 j / (k - 1), j = 0..k-1: 17 for the digits (counts 0..16 mapped by
    v / 8 - 1), 256 for 8-bit images, 2 for black-and-white ones. Values on no such grid give 256.
    """
    x01 = ((images.detach().float().cpu().unique() + 1) / 2).double()
    for k in range(2, MAX_BINS + 1):
        scaled = x01 * (k - 1)
        if (scaled - scaled.round()).abs().max().item() < 1e-4:  # float32 rounding: about 255 * 6e-8
            return k
    return MAX_BINS


def dequantize(images: torch.Tensor, n_bins: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> x = (k + u) / n_bins in [0, 1), k = round((images + 1) / 2 * (n_bins - 1)).

    u ~ U(0, 1) per element, drawn on the CPU from ``generator`` (the same generator state gives the
    same x on every device); float32, on the images' device.
    """
    levels = ((images.float() + 1) / 2 * (n_bins - 1)).round().clamp(0, n_bins - 1)
    u = torch.rand(images.shape, generator=generator).to(images.device)
    return (levels + u) / n_bins


def quantize(x: torch.Tensor, n_bins: int) -> torch.Tensor:
    """The inverse of :func:`dequantize`: x in [0, 1] -> level k = floor(x n_bins) -> image k / (n_bins - 1) * 2 - 1.

    Values outside [0, 1) clamp to the end levels; NaN (a diverged sample) maps to level 0.
    """
    levels = torch.floor(torch.nan_to_num(x.float(), nan=0.0) * n_bins).clamp(0, n_bins - 1)
    return levels / (n_bins - 1) * 2 - 1


def model_config_for(data: ImageDataset, preset: str = "small") -> GlowConfig:
    """A Glow config for ``data``: the preset's sizes with the data's channels and size.

    preset: "tiny" (:meth:`GlowConfig.tiny`) or "small" (:meth:`GlowConfig.digits`). Every level
    squeezes 2x2 pixels into channels; levels that would leave less than 2x2 pixels are dropped (one
    level always stays: 2x2 images end at 1x1).
    """
    presets = {"tiny": GlowConfig.tiny, "small": GlowConfig.digits}
    base, c, h = _training.preset_for(presets, preset, data)
    if h % 2:
        raise ValueError(f"the image size must be even (every Glow level squeezes 2x2 pixels), got {h}")
    # L squeezes leave h / 2**L pixels: the levels_that_fit of L + 1 halvings counted from the image.
    levels = max(1, _training.levels_that_fit(h, base.levels + 1) - 1)
    return dataclasses.replace(base, in_channels=c, image_size=h, levels=levels)


def split(data: ImageDataset, heldout: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(train, held-out) subsets of ``data``: round(heldout * N) images (at least 1) chosen by a
    permutation seeded with ``seed``; the same seed gives the same split."""
    n = len(data)
    n_held = max(1, round(heldout * n))
    if n_held >= n:
        raise ValueError(f"holding out {n_held} of {n} images leaves none to train on; lower heldout ({heldout})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(as_number(seed)))

    def subset(idx: torch.Tensor) -> ImageDataset:
        return ImageDataset(data.images[idx], data.labels[idx], list(data.class_names))

    return subset(order[n_held:]), subset(order[:n_held])


@torch.no_grad()
def evaluate(model: Glow, images: torch.Tensor, n_bins: int, seed: int = 0) -> float:
    """Mean bits/dim of ``images`` (N, C, H, W) in [-1, 1] with dequantization noise seeded by ``seed``.

    Runs the model in eval mode (restoring its mode after) in batches of EVAL_BATCH on its device.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(as_number(seed))
    total = 0.0
    for i in range(0, images.shape[0], EVAL_BATCH):
        x = dequantize(images[i : i + EVAL_BATCH].to(device), n_bins, gen)
        total += model.bits_per_dim(x, n_bins).sum().item()
    model.train(was_training)
    return total / images.shape[0]


def train_flow(
    data: ImageDataset,
    config: FlowTrainConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    *,
    data_source: dict | None = None,
    overwrite: bool = False,
) -> FlowTrainResult:
    """Train a Glow on ``data`` by maximum likelihood (module doc); returns the model, losses and bits/dim history.

    Args:
        data: images (N, C, H, W) float32 in [-1, 1] (labels are unused; their names are kept in
            the metadata). A fraction ``config.heldout`` is held out for evaluation.
        config: see :class:`FlowTrainConfig`.
        out_dir: a folder (created): ``flow.safetensors`` is written there at the end (and every
            ``config.save_every`` steps when > 0); None: nothing is written.
        progress: show a tqdm progress bar with the running training bits/dim and the last
            held-out bits/dim.
        data_source: how to load ``data`` again (``{"data": "digits"}`` or a folder with
            ``image_size`` and ``channels``), stored in the metadata.
        overwrite: replace a ``flow.safetensors`` already in ``out_dir``; False (default): a
            FileExistsError before any work (genkernels._training.checkpoint_path).
    """
    out_path = _training.checkpoint_path(out_dir, "flow", overwrite)
    model_config = model_config_for(data, config.model)
    train_data, heldout = split(data, config.heldout, config.seed)
    _training.check_batch_size(config.batch_size, len(train_data), held_out=len(heldout))
    n_bins = pixel_levels(data.images) if config.n_bins is None else config.n_bins
    device = _training.resolve_device(config.device)
    model, opt, gen = _training.init_training(lambda: Glow.from_config(model_config), config, device)
    history: list[dict] = []
    metadata = _training.run_metadata(
        MODEL_NAME,
        model_config,
        data,
        n_bins=n_bins,
        bits_per_dim=history,
        split={"heldout": config.heldout, "seed": config.seed, "train_images": len(train_data)},
        data=data_source,
    )
    loop = _training.TrainLoop("flow", model, metadata, config.steps, config.save_every, out_path, progress)
    # Seeded apart from the batches, so the held-out noise is the same whatever eval_every is.
    eval_seed = config.seed + 1
    losses: list[float] = []
    since_eval: list[float] = []
    batches = train_data.batches(config.batch_size, gen)

    def record(step: int) -> None:
        train_bpd = _training.mean(since_eval) if since_eval else None
        heldout_bpd = evaluate(model, heldout.images, n_bins, eval_seed)
        history.append({"step": step, "train": train_bpd, "heldout": heldout_bpd})
        since_eval.clear()

    with _training.backend_scope(device, config.backend):
        model.train()
        for step in loop:
            x = dequantize(next(batches)[0].to(device), n_bins, gen)
            if step == 0:
                # ActNorm initializes from the first batch it sees in training; do it before the
                # step-0 evaluation, so that evaluation measures the initialized model.
                with torch.no_grad():
                    model.log_prob(x)
                record(0)
            loss = model.bits_per_dim(x, n_bins).mean()
            value = loop.update(opt, loss, step, config.grad_clip, what="bits/dim")
            losses.append(value)
            since_eval.append(value)
            done = step + 1
            if (config.eval_every > 0 and done % config.eval_every == 0) or done == config.steps:
                record(done)
            loop.show(
                step,
                lambda: {"bpd": f"{_training.mean(losses[-10:]):.3f}", "heldout": f"{history[-1]['heldout']:.3f}"},
            )
            loop.saved(done)
    loop.finish()
    return FlowTrainResult(model, losses, history, metadata)


def read_flow_metadata(path: str | Path) -> dict:
    """The metadata of a flow checkpoint (FileNotFoundError / ValueError as genkernels.train.read_metadata)."""
    return _training.read_metadata(path, model=MODEL_NAME, family="flow")


def load_flow(path: str | Path, device: torch.device | str = "cpu", backend: str | None = None) -> tuple[Glow, dict]:
    """(Glow with the checkpoint's weights, in eval mode on ``device``; the metadata).

    backend: the model's backend for every op (None: follow the scope / environment / auto).
    """
    meta = read_flow_metadata(path)
    model = Glow.from_config(GlowConfig.from_dict(meta["config"]), backend=backend)
    model.load_state_dict(_training.checkpoint_weights(path))
    return model.to(device).eval(), meta


@dataclass
class FlowSamples:
    """What :func:`sample_flow` returns: the images of the grid ((N, C, H, W) in [-1, 1], on the
    n_bins levels) and the grid's (width, height)."""

    images: torch.Tensor
    size: tuple[int, int]


@torch.no_grad()
def sample_flow(
    model: Glow,
    num: int,
    temperature: float,
    seed: int,
    out: str | Path,
    *,
    n_bins: int = MAX_BINS,
    ncol: int | None = None,
    scale: int | None = None,
    backend: str | None = None,
) -> FlowSamples:
    """Write a PNG grid of ``num`` samples of the flow at ``temperature``; returns them and the grid's size.

    Latents from the learned priors, z = mean + temperature * std * eps, by ``Glow.sample(num,
    temperature, seed)`` (the same seed gives the same grid); the flow's x in [0, 1] is mapped to
    the level floor(x * n_bins) of the ``n_bins`` the model was trained with (the checkpoint's
    ``n_bins``; :func:`quantize`). ``ncol`` images per row (default ceil(sqrt(num))), upscaled
    ``scale`` times (default: to about 64 px), written by genkernels.data.save_grid. num, n_bins, ncol and scale:
    ints; seed: an int in [0, 2^63); each is checked (a ValueError naming it) before any sampling.
    """
    num = positive_int("num", num)
    if not (is_finite_real(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (is_integer(n_bins) and 2 <= n_bins <= MAX_BINS):
        raise ValueError(f"n_bins must be an int in [2, {MAX_BINS}], got {n_bins!r}")
    n_bins = int(n_bins)
    seed, ncol, scale = _training.grid_options(seed, ncol, scale, math.ceil(math.sqrt(num)), model.config.in_channels)
    with _training.backend_scope(next(model.parameters()).device, backend):
        x = model.sample(num, temperature=temperature, seed=seed)
    images = quantize(x.float().cpu(), n_bins)
    size = _training.write_grid(images, out, ncol, scale)
    return FlowSamples(images, size)
