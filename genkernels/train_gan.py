"""Training and sampling of the GAN family (``genkernels train/sample gan``).

One training step, on a batch of real images x (B, C, R, R) in [-1, 1] and fresh latents z ~ N(0, I):

    D step:    loss_D = mean softplus(D(G(z))) + mean softplus(-D(x))           (G(z) without gradients)
    R1 step:   every r1_interval steps (step 0 included): loss_R1 = r1_gamma / 2 * mean ||grad_x D(x)||^2
               * r1_interval, a second D update (lazy regularization; its backward is a double backward)
    G step:    loss_G = mean softplus(-D(G(z')))                                 (D frozen), z' fresh
    EMA:       G_ema <- ema_beta * G_ema + (1 - ema_beta) * G                      (buffers copied)

G's w_avg takes one step per training step, when the D phase makes its fakes (as StyleGAN3's loss,
update_emas=True there only): moving it in the G phase too would decay it at 0.995^2 per step.

Adam with betas (0, 0.99) for G; D's learning rate and beta2 are adjusted for the lazy R1 steps as
StyleGAN2 does: lr * c and 0.99 ** c with c = r1_interval / (r1_interval + 1). The synthesis noise comes
from torch's global generator (seeded with the run's seed), latents and batch order from a CPU
generator seeded the same: the same seed gives the same run on the same device.

Data: ``digits`` (the scikit-learn 8x8 digits, upsampled bilinearly to image_size, default 16) or a
folder of images (resized to image_size); image_size is the GAN's resolution (a power of 2, 8 to 256).

Checkpoints are safetensors files ``OUT/gan.safetensors``: the generator under ``model.generator.``,
the discriminator under ``model.discriminator.``, G_ema under ``ema.``, and the metadata key
``genkernels`` (JSON: the GANConfig, the class names, the image shape, the data source, the step).
Sampling (:func:`sample_gan`) uses G_ema with the truncation trick and each layer's fixed noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import _training
from . import data as data_mod
from ._checks import as_number, is_finite_real, is_integer
from .data import ImageDataset
from .models.gan import (  # noqa: F401 (GANConfig: the CLI checks --image-size with it)
    Discriminator,
    GANConfig,
    Generator,
    discriminator_loss,
    ema_copy,
    generator_loss,
    r1_penalty,
    update_ema,
)

MODEL_PRESETS = ("tiny", "small")
CHECKPOINT_NAME = "gan.safetensors"
MODEL_NAME = "gan"  # the metadata's "model" entry
DEFAULT_IMAGE_SIZE = 16


@dataclass
class GANTrainConfig:
    """Hyper-parameters of :func:`train_gan`.

    Args:
        steps: training steps (each a D step, a G step and, every r1_interval steps, an R1 step).
        batch_size: real images (and latents) per step, at most the data's N images (more is a ValueError
            when training starts, not a smaller batch). Each step takes that many distinct images; the last
            N % batch_size of every shuffled epoch are dropped (ImageDataset.batches).
        lr: Adam learning rate of G (D's is adjusted for lazy R1, see the module doc).
        model: size preset, "tiny" (:meth:`GANConfig.tiny`, tests) or "small" (:meth:`GANConfig.digits`).
        r1_gamma, r1_interval, ema_beta: override the preset's (None: keep it).
        seed: parameter initialization, batch order, latents and noise.
        save_every: also write the checkpoint every this many steps (0: only at the end).
        device: where to train (None: cuda when available, else cpu).
        backend: backend of every fused op; None: :func:`genkernels.train.default_backend` of the device.
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    model: str = "small"
    r1_gamma: float | None = None
    r1_interval: int | None = None
    ema_beta: float | None = None
    seed: int = 0
    save_every: int = 0
    device: str | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        _training.python_numbers(self)
        _training.check_choice("model", self.model, MODEL_PRESETS)
        _training.check_steps(self.steps, self.batch_size)
        _training.check_seed(self.seed)
        _training.check_positive("lr", self.lr)
        _training.check_at_least("save_every", self.save_every, 0)


@dataclass
class GANTrainResult:
    """What :func:`train_gan` returns: the networks and the losses of every step.

    d_losses[k], g_losses[k]: the D and G losses of step k; r1[k]: (step, mean ||grad_x D(x)||^2) of every
    R1 step.
    """

    generator: Generator
    discriminator: Discriminator
    generator_ema: Generator
    d_losses: list[float]
    g_losses: list[float]
    r1: list[tuple[int, float]]
    metadata: dict


class GANPair(torch.nn.Module):
    """The trained pair under one module, so that one checkpoint holds both (``generator.*``, ``discriminator.*``)."""

    def __init__(self, generator: Generator, discriminator: Discriminator) -> None:
        super().__init__()
        self.generator, self.discriminator = generator, discriminator


def load_dataset(data: str, image_size: int | None = None, channels: int | None = None) -> ImageDataset:
    """The training images at image_size x image_size (default 16).

    data: "digits" (the 8x8 digits upsampled bilinearly, align_corners=False, clamped to [-1, 1]; channels
    must be None) or a folder (genkernels.data.image_folder; channels 1 or 3, default 3). image_size must
    be a power of 2 in [8, 256] (the GAN's resolution).
    """
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    GANConfig(resolution=size)  # the resolution check, before any image is read
    if data == "digits":
        if channels is not None:
            raise ValueError(f"channels applies to an image folder; the digits are grey (1 channel), got {channels}")
        d = data_mod.digits()
        images = F.interpolate(d.images, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
        return ImageDataset(images.contiguous(), d.labels, d.class_names)
    return data_mod.load(data, size, 3 if channels is None else channels)


def model_config_for(data: ImageDataset, preset: str = "small", **overrides) -> GANConfig:
    """A GANConfig for ``data``: the preset's sizes at the data's resolution and channels.

    preset: "tiny" (:meth:`GANConfig.tiny`) or "small" (:meth:`GANConfig.digits`); ``overrides`` that are
    not None replace config fields (r1_gamma, r1_interval, ema_beta). Square images whose size is a power
    of 2 in [8, 256] only (ValueError otherwise).
    """
    presets = {"tiny": GANConfig.tiny, "small": GANConfig.digits}
    _, c, h = _training.preset_for(presets, preset, data)
    return presets[preset](resolution=h, img_channels=c, **{k: v for k, v in overrides.items() if v is not None})


def train_gan(
    data: ImageDataset,
    config: GANTrainConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    *,
    data_source: dict | None = None,
    overwrite: bool = False,
) -> GANTrainResult:
    """Train a generator / discriminator pair on ``data`` with the losses of the module doc.

    Args:
        data: images (N, C, R, R) float32 in [-1, 1], R a power of 2 in [8, 256] (labels unused).
        config: see :class:`GANTrainConfig`.
        out_dir: a folder (created): ``gan.safetensors`` is written there at the end (and every
            ``config.save_every`` steps when > 0); None: nothing is written.
        progress: a tqdm progress bar with the running D loss, G loss and R1 penalty.
        data_source: how the data was loaded (stored in the metadata).
        overwrite: replace a ``gan.safetensors`` already in ``out_dir``; False (default): a
            FileExistsError before any work (genkernels._training.checkpoint_path).
    """
    out_path = _training.checkpoint_path(out_dir, "gan", overwrite)
    _training.check_batch_size(config.batch_size, len(data))
    cfg = model_config_for(
        data, config.model, r1_gamma=config.r1_gamma, r1_interval=config.r1_interval, ema_beta=config.ema_beta
    )
    device = _training.resolve_device(config.device)
    torch.manual_seed(config.seed)  # parameter initialization and the synthesis noise
    gen = torch.Generator().manual_seed(config.seed)
    G, D = Generator(cfg).to(device), Discriminator(cfg).to(device)
    G_ema = ema_copy(G)
    c = cfg.r1_interval / (cfg.r1_interval + 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=config.lr, betas=(0.0, 0.99), eps=1e-8)
    opt_d = torch.optim.Adam(D.parameters(), lr=config.lr * c, betas=(0.0, 0.99**c), eps=1e-8)
    metadata = _training.run_metadata(MODEL_NAME, cfg, data, data=data_source)
    pair = GANPair(G, D)
    loop = _training.TrainLoop("gan", pair, metadata, config.steps, config.save_every, out_path, progress, ema=G_ema)
    d_losses: list[float] = []
    g_losses: list[float] = []
    r1s: list[tuple[int, float]] = []
    batches = data.batches(config.batch_size, gen)

    def latents() -> torch.Tensor:
        return torch.randn(config.batch_size, cfg.z_dim, generator=gen).to(device)

    with _training.backend_scope(device, config.backend):
        pair.train()
        for step in loop:
            real, _ = next(batches)
            real = real.to(device)
            with torch.no_grad():
                fake = G(latents())
            d_loss = discriminator_loss(D(fake), D(real))
            d_losses.append(loop.update(opt_d, d_loss, step, 0.0, "D loss"))
            if step % cfg.r1_interval == 0:
                penalty, _ = r1_penalty(D, real)
                r1_value = penalty.mean()
                loop.update(opt_d, r1_value * (cfg.r1_gamma / 2 * cfg.r1_interval), step, 0.0, "R1 loss")
                r1s.append((step, r1_value.item()))
            D.requires_grad_(False)
            g_loss = generator_loss(D(G(latents(), update_w_avg=False)))  # w_avg moved in the D phase
            g_losses.append(loop.update(opt_g, g_loss, step, 0.0, "G loss"))
            D.requires_grad_(True)
            update_ema(G_ema, G, cfg.ema_beta)
            loop.show(
                step,
                lambda: {
                    "D": f"{_training.mean(d_losses[-10:]):.3f}",
                    "G": f"{_training.mean(g_losses[-10:]):.3f}",
                    "R1": f"{r1s[-1][1]:.3g}",
                },
            )
            loop.saved(step + 1)
    loop.finish()
    return GANTrainResult(G, D, G_ema, d_losses, g_losses, r1s, metadata)


def read_gan_metadata(path: str | Path) -> dict:
    """The metadata of a GAN checkpoint (FileNotFoundError / ValueError as genkernels.train.read_metadata)."""
    return _training.read_metadata(path, model=MODEL_NAME, family="gan")


def load_gan(
    path: str | Path, device: torch.device | str = "cpu", backend: str | None = None, ema: bool = True
) -> tuple[Generator, dict]:
    """(the checkpoint's generator, in eval mode on ``device``; the metadata).

    ema: G_ema's weights (what sampling uses); False: the raw generator's. backend: the generator's
    backend for every fused op (None: follow the scope / environment / auto).
    """
    meta = read_gan_metadata(path)
    G = Generator(GANConfig.from_json(json.dumps(meta["config"])), backend=backend)
    if ema:
        weights = _training.checkpoint_weights(path, "ema.")
    else:
        weights = _training.checkpoint_weights(path, "model.generator.")
    G.load_state_dict(weights)
    return G.to(device).eval(), meta


@dataclass
class GANSamples:
    """What :func:`sample_gan` returns: the images (N, C, R, R) in about [-1, 1] and the grid's (width, height)."""

    images: torch.Tensor
    size: tuple[int, int]


@torch.no_grad()
def sample_gan(
    generator: Generator,
    num: int,
    seed: int,
    out: str | Path,
    *,
    truncation: float = 1.0,
    ncol: int | None = None,
    scale: int | None = None,
    backend: str | None = None,
) -> GANSamples:
    """Write a PNG grid of ``num`` images G(z, truncation_psi=truncation, noise_mode="const").

    z ~ N(0, I) (num, z_dim) is drawn on the CPU from a generator seeded with ``seed`` (the same seed
    gives the same grid on every device); each layer uses its fixed noise map. The generator runs in eval
    mode (its w_avg untouched) and is left in the mode it was in. ``ncol`` images per row
    (default ceil(sqrt(num))), upscaled ``scale`` times (default: to about 64 px); both positive ints. seed:
    an int in [0, 2^63). Each argument is checked (ValueError naming it) before the generator runs.
    """
    if not is_integer(num) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not is_finite_real(truncation):
        raise ValueError(f"truncation must be a finite number, got {truncation!r}")
    num, truncation = int(num), as_number(truncation)
    default_ncol = math.ceil(math.sqrt(num))
    seed, ncol, scale = _training.grid_options(seed, ncol, scale, default_ncol, generator.config.img_channels)
    param = next(generator.parameters())
    z = torch.randn(num, generator.config.z_dim, generator=torch.Generator().manual_seed(seed))
    # Eval mode for the call, whatever the caller left: in training mode the mapping would first move w_avg
    # towards these samples' w (changing the model, and the point the truncation pulls towards).
    modes = [(m, m.training) for m in generator.modules()]
    generator.eval()
    try:
        with _training.backend_scope(param.device, backend):
            images = generator(z.to(param.device, param.dtype), truncation_psi=truncation, noise_mode="const")
    finally:
        for m, training in modes:
            m.training = training
    images = images.float().cpu()
    return GANSamples(images, _training.write_grid(images, out, ncol, scale))
