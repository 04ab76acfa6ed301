"""Training and sampling of the autoregressive transformer (``genkernels train/sample transformer``).

One training step, on a batch of images x (B, C, H, W) in [-1, 1] with labels y:

    loss = mean next-token cross-entropy of ImageGPT over the quantized pixels of x given y   (nats per token)

AdamW (betas 0.9, 0.95; weight decay on matrices only, not on norms or embeddings), the learning rate
warmed up linearly over ``warmup`` steps and then decayed along a cosine to 10 % of ``lr`` at the last
step, gradients clipped to norm ``grad_clip``. Parameter initialization and the batch order come from
``seed``: the same seed gives the same run on the same device.

Data: ``digits`` (the 8x8 digits, 10 classes) or a folder of images (genkernels.data.image_folder; its
subfolders are the classes). The model is class-conditional on the data's classes.

Checkpoints are safetensors files ``OUT/transformer.safetensors``: the model's weights under ``model.``
and the metadata key ``genkernels`` (JSON: the ImageGPTConfig, the class names, the image shape, the data
source, the step). Sampling (:func:`sample_transformer`) decodes with the KV cache and writes a PNG grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _training
from ._checks import is_integer, is_real
from .data import ImageDataset
from .models.transformer import POSITIONS, ImageGPT, ImageGPTConfig

MODEL_PRESETS = ("tiny", "small")
CHECKPOINT_NAME = "transformer.safetensors"
MODEL_NAME = "transformer"  # the metadata's "model" entry
FINAL_LR_FRACTION = 0.1
DEFAULT_WARMUP = 100  # warm-up steps when none are given (fewer in a shorter run: all of its steps)


@dataclass
class TransformerTrainConfig:
    """Hyper-parameters of :func:`train_transformer`.

    Args:
        steps: optimizer steps.
        batch_size: images per step, at most the data's N images (more is a ValueError when training
            starts, not a smaller batch). Each step takes that many distinct images; the last N % batch_size
            of every shuffled epoch are dropped (ImageDataset.batches).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay of the weight matrices.
        warmup: steps of linear learning-rate warm-up (then a cosine decay to lr / 10), at most ``steps``:
            more is a ValueError, as the learning rate would never reach ``lr``. None (default):
            DEFAULT_WARMUP (100), or ``steps`` in a shorter run; the field holds the number after init.
        grad_clip: clip the gradient norm to this (0: no clipping).
        model: size preset, "tiny" (dim 32, 1 block: tests) or "small" (ImageGPT's defaults: dim 128, 4 blocks).
        levels: quantization levels per pixel value (>= 2).
        positions: "rope" or "learned".
        seed: parameter initialization and batch order.
        save_every: also write the checkpoint every this many steps (0: only at the end).
        device: where to train (None: cuda when available, else cpu).
        backend: backend of every fused op; None: "reference" on CPU, "auto" elsewhere.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int | None = None
    grad_clip: float = 1.0
    model: str = "small"
    levels: int = 16
    positions: str = "rope"
    seed: int = 0
    save_every: int = 0
    device: str | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        _training.python_numbers(self)
        # Counts are whole (a warm-up of 1.5 steps would lift the learning rate above lr) and no field is a bool.
        for name in ("steps", "batch_size", "warmup", "save_every", "levels"):
            value = getattr(self, name)
            if not (is_integer(value) or (name == "warmup" and value is None)):
                raise ValueError(f"{name} must be an int, got {value!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            if not is_real(getattr(self, name)):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        _training.check_choice("model", self.model, MODEL_PRESETS)
        _training.check_choice("positions", self.positions, POSITIONS)
        _training.check_steps(self.steps, self.batch_size)
        _training.check_seed(self.seed)
        _training.check_positive("lr", self.lr)
        if self.warmup is None:
            self.warmup = min(DEFAULT_WARMUP, self.steps)
        _training.check_at_least("warmup", self.warmup, 0)
        if self.warmup > self.steps:
            raise ValueError(
                f"warmup must be at most steps (the learning rate reaches lr when the warm-up ends), got "
                f"warmup={self.warmup} with steps={self.steps}"
            )
        _training.check_at_least("save_every", self.save_every, 0)
        _training.check_at_least("levels", self.levels, 2)
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value}")


@dataclass
class TransformerTrainResult:
    """What :func:`train_transformer` returns: the model (eval mode), the loss of every step (nats per
    token) and the checkpoint metadata."""

    model: ImageGPT
    losses: list[float]
    metadata: dict


def model_config_for(
    data: ImageDataset, preset: str = "small", levels: int = 16, positions: str = "rope"
) -> ImageGPTConfig:
    """An ImageGPTConfig for ``data``: the preset's sizes at the data's image size, channels and classes.

    preset: "tiny" (dim 32, depth 1, 2 heads) or "small" (dim 128, depth 4, 4 heads). Square images only
    (ValueError otherwise).
    """
    presets = {
        "tiny": lambda: ImageGPTConfig(dim=32, depth=1, heads=2),
        "small": lambda: ImageGPTConfig(dim=128, depth=4, heads=4),
    }
    base, c, h = _training.preset_for(presets, preset, data)
    sizes = {"dim": base.dim, "depth": base.depth, "heads": base.heads}
    return ImageGPTConfig(
        image_size=h, channels=c, levels=levels, num_classes=data.num_classes, positions=positions, **sizes
    )


def _optimizer(model: ImageGPT, config: TransformerTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the Linear weights only (not on norms, embeddings or positions)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if id(p) in decay], "weight_decay": config.weight_decay},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The learning rate of ``step`` as a fraction of the peak: (step + 1) / warmup during the warm-up, then a
    cosine from 1 to FINAL_LR_FRACTION at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(steps - 1 - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def train_transformer(
    data: ImageDataset,
    config: TransformerTrainConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    *,
    data_source: dict | None = None,
    overwrite: bool = False,
) -> TransformerTrainResult:
    """Train an ImageGPT on ``data`` by next-token cross-entropy (see the module doc).

    Args:
        data: images (N, C, H, W) float32 in [-1, 1], square, with labels (N,).
        config: see :class:`TransformerTrainConfig`.
        out_dir: a folder (created): ``transformer.safetensors`` is written there at the end (and every
            ``config.save_every`` steps when > 0); None: nothing is written.
        progress: a tqdm progress bar with the running loss (nats per token) and the learning rate.
        data_source: how the data was loaded (stored in the metadata).
        overwrite: replace a ``transformer.safetensors`` already in ``out_dir``; False (default): a
            FileExistsError before any work (genkernels._training.checkpoint_path).
    """
    out_path = _training.checkpoint_path(out_dir, "transformer", overwrite)
    _training.check_batch_size(config.batch_size, len(data))
    cfg = model_config_for(data, config.model, config.levels, config.positions)
    device = _training.resolve_device(config.device)
    torch.manual_seed(config.seed)  # parameter initialization
    gen = torch.Generator().manual_seed(config.seed)
    model = ImageGPT.from_config(cfg).to(device)
    opt = _optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, config.steps, config.warmup))
    metadata = _training.run_metadata(MODEL_NAME, cfg, data, data=data_source)
    loop = _training.TrainLoop("transformer", model, metadata, config.steps, config.save_every, out_path, progress)
    losses: list[float] = []
    batches = data.batches(config.batch_size, gen)
    with _training.backend_scope(device, config.backend):
        model.train()
        for step in loop:
            images, labels = next(batches)
            labels = labels.to(device) if cfg.num_classes else None
            loss = model.loss(images.to(device), labels)
            losses.append(loop.update(opt, loss, step, config.grad_clip))
            schedule.step()
            loop.show(
                step,
                lambda: {
                    "loss": f"{_training.mean(losses[-10:]):.4f}",
                    "lr": f"{schedule.get_last_lr()[0]:.2e}",
                },
            )
            loop.saved(step + 1)
    loop.finish()
    return TransformerTrainResult(model, losses, metadata)


def read_transformer_metadata(path: str | Path) -> dict:
    """The metadata of a transformer checkpoint (FileNotFoundError / ValueError as genkernels.train.read_metadata)."""
    return _training.read_metadata(path, model=MODEL_NAME, family="transformer")


def load_transformer(
    path: str | Path, device: torch.device | str = "cpu", backend: str | None = None
) -> tuple[ImageGPT, dict]:
    """(the checkpoint's ImageGPT in eval mode on ``device``, pinned to ``backend`` (None: scope / auto);
    the metadata)."""
    meta = read_transformer_metadata(path)
    model = ImageGPT.from_config(ImageGPTConfig.from_json(json.dumps(meta["config"])), backend=backend)
    model.load_state_dict(_training.checkpoint_weights(path, "model."))
    return model.to(device).eval(), meta


@dataclass
class TransformerSamples:
    """What :func:`sample_transformer` returns: images (N, C, H, W) in [0, 1], their tokens (N, L), the labels
    (N,) (None for an unconditional model) and the grid's (width, height)."""

    images: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor | None
    size: tuple[int, int]


@torch.no_grad()
def sample_transformer(
    model: ImageGPT,
    num: int,
    seed: int,
    out: str | Path,
    *,
    labels: torch.Tensor | int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
    ncol: int | None = None,
    scale: int | None = None,
    backend: str | None = None,
) -> TransformerSamples:
    """Write a PNG grid of ``num`` samples of ``model`` (:meth:`ImageGPT.sample`).

    labels: the class of every image ((num,) integers or one int; None: classes 0, 1, ... in turn).
    temperature, top_k, use_cache: as ImageGPT.sample; seed: its generator's seed (the same seed gives the
    same grid). ``ncol`` images per row (default: the number of classes when labels cycle through them,
    else ceil(sqrt(num))), upscaled ``scale`` times (default: to about 64 px). backend: of every fused op
    (None: "reference" on CPU, "auto" elsewhere).
    """
    if not is_integer(num) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    num = int(num)
    classes = model.config.num_classes
    default_ncol = min(classes, num) if labels is None and classes > 1 else math.ceil(math.sqrt(num))
    seed, ncol, scale = _training.grid_options(seed, ncol, scale, default_ncol, model.config.channels)
    device = model.head.weight.device
    with _training.backend_scope(device, backend):
        labels = model._sample_labels(num, labels, device)
        # One call: decoding without CUDA graphs (their capture decodes once uncaptured and then captures
        # every step, which repeated calls repay and a single one does not).
        tokens = model.sample_tokens(num, labels, temperature, top_k, seed, use_cache, cuda_graph=False)
    images = model.dequantize(tokens).cpu()
    size = _training.write_grid(images * 2 - 1, out, ncol, scale)
    return TransformerSamples(images, tokens.cpu(), None if labels is None else labels.cpu(), size)
