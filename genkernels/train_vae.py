"""Training and sampling of the VAE (AutoencoderKL) family (``genkernels train/sample vae``).

Objective, per batch x (B, C, H, W) in [-1, 1], with P = C * H * W the pixel elements of a sample:

    moments = encoder(x);  z, kl = reparameterize(moments)      one fused pass: z = mean + std * eps,
                                                               kl[b] = KL(q(z | x_b) || N(0, I))
    x_rec = decoder(z)
    loss  = rec + beta * mean_b(kl[b]) / P
    rec   = mean over all B * P elements of |x_rec - x|  (loss "l1")  or  (x_rec - x)^2  (loss "l2")

Dividing the per-sample KL by P puts it on the same per-pixel scale as the reconstruction mean, so
beta does not depend on the image size or the batch: the loss times P is the per-sample summed
reconstruction error plus beta times the per-sample KL, which is the weighting of Stable
Diffusion's autoencoder training (its ``kl_weight`` is this beta; it uses 1e-6 with a perceptual
and adversarial loss on top, which are not used here). Larger beta gives a latent closer to
N(0, I), so decodes of prior samples look more like the data, at the cost of blurrier
reconstructions. AdamW, gradient clipping at norm 1.

Sampling (:func:`sample_vae`) writes a PNG grid: rows of data images, each followed by the row of
their reconstructions decode(mode of q(z | x)), then rows of decodes of prior samples z ~ N(0, I)
of the latent shape.

Checkpoints are safetensors files ``OUT/vae.safetensors``: the weights under ``model.`` and the
metadata key ``genkernels`` holding JSON: the AutoencoderKL config, the loss, beta, the class
names, the image and latent shapes, where the data came from, and the training step (see
genkernels.train.save_checkpoint, shared with the diffusion family).

Backends: every GroupNorm, attention and reparameterize op follows ``backend``; the default is
"reference" on CPU and auto on CUDA (genkernels.train.default_backend).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _training
from ._checks import check_backend, is_finite_real, is_integer
from .data import ImageDataset
from .models.vae import AutoencoderKL, AutoencoderKLConfig

LOSSES = ("l1", "l2")
MODEL_PRESETS = ("tiny", "small")
CHECKPOINT_NAME = "vae.safetensors"
MODEL_NAME = "vae"  # the metadata's "model" entry


@dataclass
class VAETrainConfig:
    """Hyper-parameters of :func:`train_vae`.

    Args:
        steps: optimizer steps.
        batch_size: images per step, at most the data's N images (more is a ValueError when training
            starts, not a smaller batch). Each step takes that many distinct images; the last N % batch_size
            of every shuffled epoch are dropped (ImageDataset.batches).
        lr: AdamW learning rate.
        loss: reconstruction loss, "l1" (mean absolute error) or "l2" (mean squared error).
        beta: weight of the KL term, per pixel element (see the module doc); 0 trains an
            autoencoder with a noisy, unregularized latent. On the digits (2000 steps, "small"),
            0.05 keeps reconstructions close (mean squared error about 0.014) and makes most decodes
            of prior samples legible digits; 1e-3 reconstructs better (about 0.002) but its prior
            samples are mostly not digits.
        model: size preset, "tiny" (:meth:`AutoencoderKLConfig.tiny`, tests) or "small"
            (:meth:`AutoencoderKLConfig.digits`).
        seed: parameter initialization, batch order and the reparameterization noise.
        save_every: also write the checkpoint every this many steps (0: only at the end).
        device: where to train (None: cuda when available, else cpu).
        backend: backend of every op; None: :func:`genkernels.train.default_backend` of the device.
        weight_decay: AdamW weight decay.
        grad_clip: gradient norm clipping (0: none).
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    loss: str = "l2"
    beta: float = 0.05
    model: str = "small"
    seed: int = 0
    save_every: int = 0
    device: str | None = None
    backend: str | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _training.python_numbers(self)
        _training.check_choice("loss", self.loss, LOSSES)
        _training.check_choice("model", self.model, MODEL_PRESETS)
        _training.check_steps(self.steps, self.batch_size)
        _training.check_seed(self.seed)
        _training.check_positive("lr", self.lr)
        if not (is_finite_real(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a number >= 0, got {self.beta!r}")
        _training.check_at_least("save_every", self.save_every, 0)
        _training.check_nonnegative("weight_decay", self.weight_decay)
        _training.check_nonnegative("grad_clip", self.grad_clip)
        check_backend(self.backend)  # here, not once the model is built and the output folder made


@dataclass
class VAETrainResult:
    """What :func:`train_vae` returns: the trained model, the loss of every step and its two terms.

    losses[k] = reconstruction[k] + beta * kl[k] / P; kl[k] is the batch mean of the per-sample KL
    (nats, not divided by P).
    """

    model: AutoencoderKL
    losses: list[float]
    reconstruction: list[float]
    kl: list[float]
    metadata: dict


def model_config_for(data: ImageDataset, preset: str = "small") -> AutoencoderKLConfig:
    """An AutoencoderKL config for ``data``: the preset's sizes with the data's channels and size.

    preset: "tiny" (:meth:`AutoencoderKLConfig.tiny`) or "small" (:meth:`AutoencoderKLConfig.digits`).
    The encoder halves the resolution at every level but the last; levels whose latent would not
    divide the image evenly or fall below 2x2 are dropped (the 8x8 digits keep at most 3 levels); images
    smaller than 2x2 are a ValueError.
    """
    presets = {"tiny": AutoencoderKLConfig.tiny, "small": AutoencoderKLConfig.digits}
    base, c, h = _training.preset_for(presets, preset, data)
    if h < 2:
        raise ValueError(f"images must be at least 2x2 for the VAE, got {h}x{h}")
    levels = _training.levels_that_fit(h, len(base.block_out_channels))
    return dataclasses.replace(
        base,
        in_channels=c,
        out_channels=c,
        sample_size=h,
        block_out_channels=tuple(base.block_out_channels[:levels]),
        down_block_types=tuple(base.down_block_types[:levels]),
        up_block_types=tuple(base.up_block_types[:levels]),
    )


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean over every element of |x_rec - x| ("l1") or (x_rec - x)^2 ("l2"), in float32; a 0-d tensor."""
    diff = x_rec.float() - x.float()
    return diff.abs().mean() if loss == "l1" else diff.square().mean()


def train_vae(
    data: ImageDataset,
    config: VAETrainConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    *,
    data_source: dict | None = None,
    overwrite: bool = False,
) -> VAETrainResult:
    """Train an AutoencoderKL on ``data`` with the loss of the module doc; returns the model and losses.

    Args:
        data: images (N, C, H, W) float32 in [-1, 1] (labels are unused; their names are kept in the
            metadata).
        config: see :class:`VAETrainConfig`.
        out_dir: a folder (created): ``vae.safetensors`` is written there at the end (and every
            ``config.save_every`` steps when > 0); None: nothing is written.
        progress: show a tqdm progress bar with the running loss, reconstruction error and KL.
        data_source: how to load ``data`` again (``{"data": "digits"}`` or a folder with
            ``image_size`` and ``channels``), stored in the metadata so ``genkernels sample vae`` can
            show reconstructions without a ``--data`` option.
        overwrite: replace a ``vae.safetensors`` already in ``out_dir``; False (default): a
            FileExistsError before any work (genkernels._training.checkpoint_path).
    """
    out_path = _training.checkpoint_path(out_dir, "vae", overwrite)
    _training.check_batch_size(config.batch_size, len(data))
    model_config = model_config_for(data, config.model)
    device = _training.resolve_device(config.device)
    model, opt, gen = _training.init_training(lambda: AutoencoderKL(model_config), config, device)
    pixels = math.prod(data.image_shape)
    metadata = _training.run_metadata(
        MODEL_NAME, model_config, data, loss=config.loss, beta=config.beta, latent_shape=None, data=data_source
    )
    loop = _training.TrainLoop("vae", model, metadata, config.steps, config.save_every, out_path, progress)
    losses: list[float] = []
    recs: list[float] = []
    kls: list[float] = []
    batches = data.batches(config.batch_size, gen)
    with _training.backend_scope(device, config.backend):
        model.train()
        for step in loop:
            x, _ = next(batches)
            x = x.to(device)
            posterior = model.encode(x).latent_dist
            # z and the per-sample KL from one fused pass over the moments. The noise comes from the
            # Philox stream (seed, offset=step): reproducible on every device, no host round trip.
            z, kl = posterior.sample_with_kl(seed=config.seed, offset=step)
            rec = reconstruction_loss(model.decode(z).sample, x, config.loss)
            kl_mean = kl.float().mean()
            loss = rec + (config.beta / pixels) * kl_mean
            losses.append(loop.update(opt, loss, step, config.grad_clip))
            recs.append(rec.item())
            kls.append(kl_mean.item())
            if step == 0:
                metadata["latent_shape"] = list(z.shape[1:])
            loop.show(
                step,
                lambda: {
                    "loss": f"{_training.mean(losses[-10:]):.4f}",
                    "rec": f"{_training.mean(recs[-10:]):.4f}",
                    "kl": f"{_training.mean(kls[-10:]):.2f}",
                },
            )
            loop.saved(step + 1)
    loop.finish()
    return VAETrainResult(model, losses, recs, kls, metadata)


def read_vae_metadata(path: str | Path) -> dict:
    """The metadata of a VAE checkpoint (FileNotFoundError / ValueError as genkernels.train.read_metadata)."""
    return _training.read_metadata(path, model=MODEL_NAME, family="vae")


def load_vae(
    path: str | Path, device: torch.device | str = "cpu", backend: str | None = None
) -> tuple[AutoencoderKL, dict]:
    """(AutoencoderKL with the checkpoint's weights, in eval mode on ``device``; the metadata).

    backend: the model's backend for every op (None: follow the scope / environment / auto).
    """
    meta = read_vae_metadata(path)
    model = AutoencoderKL(AutoencoderKLConfig.from_json(json.dumps(meta["config"])), backend=backend)
    model.load_state_dict(_training.checkpoint_weights(path))
    return model.to(device).eval(), meta


@dataclass
class VAESamples:
    """What :func:`sample_vae` returns: the tensors of the grid (each (N, C, H, W) in [-1, 1]) and its size."""

    inputs: torch.Tensor
    reconstructions: torch.Tensor
    samples: torch.Tensor
    size: tuple[int, int]


@torch.no_grad()
def sample_vae(
    model: AutoencoderKL,
    data: ImageDataset,
    num: int,
    seed: int,
    out: str | Path,
    *,
    ncol: int | None = None,
    scale: int | None = None,
    backend: str | None = None,
) -> VAESamples:
    """Write a PNG grid of ``num`` data images with their reconstructions, and ``num`` prior samples.

    The ``num`` inputs are drawn from ``data`` without replacement (num <= len(data)) by a generator
    seeded with ``seed``; reconstructions are decode(mode of q(z | x)); prior samples are decode(z)
    with z ~ N(0, I) of the latent shape (C_lat, H / f, W / f), drawn on the CPU from the same
    generator (the same seed gives the same grid on every device).

    Layout: ``ncol`` images per row (default min(num, 10)); for every ``ncol`` inputs, a row of inputs
    then the row of their reconstructions beneath; then the prior samples, ``ncol`` per row. A short
    last row is padded with mid-grey. Images are upscaled ``scale`` times (default: to about 64 px). num, ncol and
    scale: positive ints; seed: an int in [0, 2^63); each is checked (a ValueError naming it) before any sampling.
    Returns the tensors and the grid's (width, height) as written by genkernels.data.save_grid.
    """
    if not (is_integer(num) and 1 <= num <= len(data)):
        raise ValueError(f"num must be an int in [1, {len(data)}] (the data's size), got {num!r}")
    num = int(num)
    channels = model.config.in_channels
    if data.image_shape[0] != channels:
        raise ValueError(f"the data has {data.image_shape[0]} channels but the model takes {channels}")
    if model.config.out_channels != channels:  # inputs and reconstructions share the grid
        raise ValueError(
            f"the model must output as many channels as it takes, got {channels} -> {model.config.out_channels}"
        )
    seed, ncol, scale = _training.grid_options(seed, ncol, scale, min(num, 10), channels)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    x = data.images[torch.randperm(len(data), generator=gen)[:num]]
    with _training.backend_scope(device, backend):
        posterior = model.encode(x.to(device, dtype)).latent_dist
        mode = posterior.mode()
        rec = model.decode(mode).sample.float().cpu()
        z = torch.randn(mode.shape, generator=gen).to(device, dtype)
        prior = model.decode(z).sample.float().cpu()

    rows = -(-num // ncol)

    def padded(images: torch.Tensor) -> torch.Tensor:
        # 0 is mid-grey in [-1, 1]: the same grey as the grid's gaps.
        fill = images.new_zeros((rows * ncol - num, *images.shape[1:]))
        return torch.cat([images, fill]).view(rows, ncol, *images.shape[1:])

    pairs = torch.stack([padded(x), padded(rec)], dim=1).flatten(0, 2)  # input row r, reconstruction row r, ...
    grid = torch.cat([pairs, padded(prior).flatten(0, 1)])
    size = _training.write_grid(grid, out, ncol, scale)
    return VAESamples(x, rec, prior, size)
