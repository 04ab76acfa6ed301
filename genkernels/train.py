"""Training and sampling of the class-conditional diffusion UNet (``genkernels train/sample diffusion``).

Objectives, with x0 a data batch, n ~ N(0, I) and y the labels (replaced by the null label with
probability ``label_dropout``, so one model learns both the conditional and the unconditional
prediction that classifier-free guidance mixes):

    eps:  t ~ U{0..T-1},  x_t = a_t x0 + s_t n  (DDPMScheduler.add_noise),  target n
    v:    same x_t,                                                       target a_t n - s_t x0
    flow: u ~ U(0, 1),    x_u = (1 - u) x0 + u n,  t = u T,               target n - x0 (velocity)

with a_t = sqrt(alphas_cumprod[t]), s_t = sqrt(1 - alphas_cumprod[t]) of the beta schedule and
T = num_train_timesteps. Loss: mean squared error of the model output against the target. AdamW,
gradient clipping at norm 1, and an exponential moving average of the weights (decay
min(ema_decay, (1 + k) / (10 + k)) at step k) which sampling uses.

Sampling runs a genkernels.schedulers scheduler through its diffusers interface: set_timesteps,
init_noise_sigma, scale_model_input, and step(...).prev_sample. With guidance scale g != 1 the
model runs once on the batch [x; x] with labels [null; y] and step() receives the batched
[uncond; cond] output with ``guidance_scale=g``: out = out_u + g (out_c - out_u), fused in the step.
The objective fixes which samplers apply: eps and v models run ddpm, ddim, euler, euler-a and
dpm++; flow models run flow.

Checkpoints are safetensors files: the weights under ``model.`` and the EMA weights under
``ema.``, and the metadata key ``genkernels`` holding JSON: the UNet config, the objective, the
noise schedule, the class names and the training step.

Backends: every GroupNorm and attention op follows ``backend``. On CPU the default is
"reference" (eager PyTorch): the triton backend runs on CPU only under the Triton interpreter,
which is far too slow to train with. On CUDA the default is auto (the fastest backend that can
run each call).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _registry
from ._training import (  # noqa: F401  (re-exported: the public names of every family's checkpoints)
    CHECKPOINT_FORMAT,
    METADATA_KEY,
    TrainLoop,
    backend_for,
    check_choice,
    check_steps,
    checkpoint_weights,
    default_backend,
    init_training,
    levels_that_fit,
    mean,
    preset_for,
    read_metadata,
    resolve_device,
    run_metadata,
    save_checkpoint,
)
from .data import ImageDataset
from .models.diffusion import UNet, UNetConfig

OBJECTIVES = ("eps", "v", "flow")
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "flow": "flow"}
# sampler name -> (genkernels.schedulers class name, objectives it applies to)
SAMPLERS = {
    "ddpm": ("DDPMScheduler", ("eps", "v")),
    "ddim": ("DDIMScheduler", ("eps", "v")),
    "euler": ("EulerDiscreteScheduler", ("eps", "v")),
    "euler-a": ("EulerAncestralDiscreteScheduler", ("eps", "v")),
    "dpm++": ("DPMSolverMultistepScheduler", ("eps", "v")),
    "flow": ("FlowMatchEulerDiscreteScheduler", ("flow",)),
}
# Extra step() arguments per sampler. DDIM clips the predicted x0 to the data range [-1, 1] (diffusers'
# default clip_sample); the noise direction must then come from the clipped x0 too, or the update mixes a
# clipped x0 with the unclipped model epsilon and the samples stay noisy.
STEP_KWARGS = {"ddim": {"use_clipped_model_output": True}}


@dataclass
class Schedule:
    """The training noise schedule (DDPM betas; unused by the flow objective apart from T)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def scheduler_kwargs(self) -> dict:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_diffusion`."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    objective: str = "eps"
    seed: int = 0
    grad_clip: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_steps(self.steps, self.batch_size)
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainResult:
    """What :func:`train_diffusion` returns: the trained model, its EMA copy, and the loss of every step."""

    model: UNet
    ema: UNet
    losses: list[float]
    metadata: dict


def _schedulers():
    from . import schedulers

    return schedulers


def make_noise_scheduler(schedule: Schedule, objective: str):
    """The DDPMScheduler whose add_noise gives the training forward process of the eps and v objectives."""
    return _schedulers().DDPMScheduler(**schedule.scheduler_kwargs(), prediction_type=PREDICTION_TYPE[objective])


def training_pair(
    x0: torch.Tensor, noise: torch.Tensor, objective: str, schedule: Schedule, noise_scheduler, generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target) of one training batch (see the module doc). x0, noise: (B, C, H, W); t: (B,)."""
    b = x0.shape[0]
    big_t = schedule.num_train_timesteps
    if objective == "flow":
        u = torch.rand(b, generator=generator).to(x0.device)
        ub = u.view(b, 1, 1, 1).to(x0.dtype)
        return (1 - ub) * x0 + ub * noise, u * big_t, noise - x0
    t = torch.randint(0, big_t, (b,), generator=generator).to(x0.device)
    x_t = noise_scheduler.add_noise(x0, noise, t)
    if objective == "eps":
        return x_t, t, noise
    # a_t and s_t straight from the scheduler's own forward process: training and sampling share one schedule.
    unit = torch.ones(b, 1, 1, 1, device=x0.device, dtype=x0.dtype)
    a = noise_scheduler.add_noise(unit, torch.zeros_like(unit), t)
    s = noise_scheduler.add_noise(torch.zeros_like(unit), unit, t)
    return x_t, t, a * noise - s * x0


def model_config_for(data: ImageDataset, preset: str = "small") -> UNetConfig:
    """A UNet config for ``data``: the preset's sizes with the data's channels, size and classes.

    preset: "tiny" (tests) or "small" (:meth:`UNetConfig.digits`). Levels whose resolution would
    fall below 2x2 are dropped.
    """
    presets = {"tiny": UNetConfig.tiny, "small": UNetConfig.digits}
    base, c, h = preset_for(presets, preset, data)
    levels = levels_that_fit(h, len(base.block_out_channels))
    return presets[preset](
        sample_size=h,
        in_channels=c,
        out_channels=c,
        block_out_channels=base.block_out_channels[:levels],
        attention=base.attention[:levels],
        num_classes=data.num_classes,
    )


def _ema_update(ema: UNet, model: UNet, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1.0 - decay)


def train_diffusion(
    data: ImageDataset,
    model_config: UNetConfig,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    backend: str | None = None,
    out: str | Path | None = None,
    save_every: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train a class-conditional UNet on ``data`` (see the module doc); returns the model, EMA and losses.

    Args:
        data: images in [-1, 1] (N, C, H, W) and labels (N,).
        model_config: the UNet's sizes; its num_classes must equal data.num_classes.
        config: steps, batch size, objective, learning rate, EMA decay, label dropout, seed.
        device: where to train.
        backend: for every GroupNorm and attention op; None: :func:`default_backend` of device.
        out: a folder: ``diffusion.safetensors`` is written there at the end (and every
            ``save_every`` steps when > 0).
        progress: show a tqdm progress bar with the running loss.
    """
    if model_config.num_classes != data.num_classes:
        raise ValueError(
            f"model_config.num_classes={model_config.num_classes} but the data has {data.num_classes} classes"
        )
    if (model_config.in_channels, model_config.out_channels) != (data.image_shape[0],) * 2:
        raise ValueError(f"model_config channels must equal the data's {data.image_shape[0]}")
    device = torch.device(device)
    backend = backend_for(device, backend)
    model, opt, gen = init_training(lambda: UNet(model_config), config, device)
    ema = copy.deepcopy(model).requires_grad_(False)
    noise_scheduler = None if config.objective == "flow" else make_noise_scheduler(config.schedule, config.objective)
    metadata = run_metadata(
        "diffusion-unet", model_config, data, objective=config.objective, schedule=config.schedule.__dict__
    )
    loop = TrainLoop("diffusion", model, metadata, config.steps, save_every, out, progress, ema=ema)
    losses: list[float] = []
    batches = data.batches(config.batch_size, gen)
    with _registry.backend(backend):
        model.train()
        for step in loop:
            x0, labels = next(batches)
            x0, labels = x0.to(device), labels.to(device)
            drop = torch.rand(labels.shape, generator=gen).to(device) < config.label_dropout
            labels = torch.where(drop, torch.full_like(labels, model.null_label), labels)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            x_t, t, target = training_pair(x0, noise, config.objective, config.schedule, noise_scheduler, gen)
            loss = torch.nn.functional.mse_loss(model(x_t, t, labels).float(), target.float())
            losses.append(loop.update(opt, loss, step, config.grad_clip))
            _ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
            loop.show(step, lambda: {"loss": f"{mean(losses[-10:]):.4f}"})
            loop.saved(step + 1)
    loop.finish()
    return TrainResult(model, ema, losses, metadata)


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint(
    path: str | Path, *, ema: bool = True, device: torch.device | str = "cpu", backend: str | None = None
) -> tuple[UNet, dict]:
    """(UNet with the checkpoint's EMA weights, or its raw weights with ema=False; metadata)."""
    meta = read_metadata(path)
    model = UNet(UNetConfig.from_json(json.dumps(meta["config"])), backend=backend)
    prefix = "ema." if ema else "model."
    state = checkpoint_weights(path, prefix)
    if not state:
        raise ValueError(f"{str(path)!r} has no {prefix}* weights (saved without EMA? use the raw weights)")
    model.load_state_dict(state)
    return model.to(device).eval(), meta


# --------------------------------------------------------------------------- sampling


def check_sampler(sampler: str, objective: str) -> None:
    """Raise a ValueError when ``sampler`` cannot run a model trained with ``objective``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    allowed = SAMPLERS[sampler][1]
    if objective not in allowed:
        fitting = sorted(s for s, (_, objs) in SAMPLERS.items() if objective in objs)
        raise ValueError(
            f"sampler {sampler!r} needs a model trained with objective {' or '.join(allowed)}, but this "
            f"checkpoint was trained with objective {objective!r}; use one of {fitting}"
            + (" or train with --objective flow" if sampler == "flow" else "")
        )


def make_scheduler(sampler: str, objective: str, schedule: Schedule):
    """The genkernels.schedulers scheduler of ``sampler`` for a model of ``objective``."""
    check_sampler(sampler, objective)
    cls = getattr(_schedulers(), SAMPLERS[sampler][0])
    if sampler == "flow":
        return cls(num_train_timesteps=schedule.num_train_timesteps)
    return cls(**schedule.scheduler_kwargs(), prediction_type=PREDICTION_TYPE[objective])


@torch.no_grad()
def sample_diffusion(
    model: UNet,
    metadata: dict,
    labels: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    guidance: float = 1.0,
    seed: int = 0,
    backend: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate len(labels) images with ``sampler`` in ``steps`` steps; returns (N, C, H, W) in the data range.

    labels: (N,) class labels (the null label num_classes gives unconditional samples). guidance:
    classifier-free guidance scale g (1: the conditional model alone; see the module doc). The
    initial noise and every noise draw of the sampler come from a generator seeded with ``seed``
    on the model's device: the same seed gives the same images.
    """
    objective = metadata["objective"]
    check_sampler(sampler, objective)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = next(model.parameters()).device
    backend = backend_for(device, backend)
    schedule = Schedule(**metadata["schedule"])
    scheduler = make_scheduler(sampler, objective, schedule)
    scheduler.set_timesteps(steps, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    c, h, w = metadata["image_shape"]
    n = labels.shape[0]
    labels = labels.to(device)
    dtype = next(model.parameters()).dtype
    x = torch.randn((n, c, h, w), generator=gen, device=device, dtype=dtype) * scheduler.init_noise_sigma
    guided = guidance != 1.0
    if guided:
        labels = torch.cat([torch.full_like(labels, model.null_label), labels])

    from tqdm.auto import tqdm

    step_kwargs = dict(STEP_KWARGS.get(sampler, {}), generator=gen)
    if guided:
        step_kwargs["guidance_scale"] = guidance
    with _registry.backend(backend):
        for t in tqdm(scheduler.timesteps, desc=f"sample {sampler}", disable=not progress, dynamic_ncols=True):
            x_in = scheduler.scale_model_input(x, t)
            out = model(torch.cat([x_in, x_in]) if guided else x_in, t, labels)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x
