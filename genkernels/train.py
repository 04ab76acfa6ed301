"""Training and sampling of the class-conditional diffusion models (``genkernels train/sample diffusion``).

Two backbones take the same call, model(x_t, t, labels): ``unet`` (:class:`UNet`) and ``dit``
(:class:`DiT`, the diffusion transformer); the model config's type picks one
(:func:`model_config_for` makes either for a data set) and the checkpoint records it.

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
``ema.``, and the metadata key ``genkernels`` holding JSON: the model (``diffusion-unet`` or
``diffusion-dit``), the backbone (``unet`` or ``dit``) and its config, the objective, the noise
schedule, the label dropout rate, the class names, the image shape and the training step. Checkpoints
written before the DiT existed have no ``backbone`` key and load as UNets; those written before the
label dropout was recorded are taken to have learned the unconditional prediction.

Backends: every fused op of the model (GroupNorm and attention; the DiT's adaLN, RoPE and MLP ops)
follows ``backend``. Without one, a surrounding ``genkernels.backend(...)`` block or the
GENKERNELS_BACKEND variable decides; without those, on CPU the default is "reference" (eager PyTorch):
the triton backend runs on CPU only under the Triton interpreter, which is far too slow to train with.
On CUDA the default is auto (the fastest backend that can run each call).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _graphs
from ._checks import as_number, is_finite_real, is_integer
from ._training import (  # noqa: F401  (re-exported: the public names of every family's checkpoints)
    CHECKPOINT_FORMAT,
    METADATA_KEY,
    TrainLoop,
    backend_scope,
    check_at_least,
    check_batch_size,
    check_choice,
    check_nonnegative,
    check_positive,
    check_seed,
    check_steps,
    checkpoint_path,
    checkpoint_weights,
    default_backend,
    init_training,
    levels_that_fit,
    mean,
    preset_for,
    resolve_device,
    run_metadata,
    save_checkpoint,
)
from ._training import python_numbers as _python_numbers
from ._training import read_metadata as _read_metadata
from .data import ImageDataset
from .models.diffusion import DiT, DiTConfig, UNet, UNetConfig

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
# backbone -> (model class, its config class, the checkpoint metadata's model name)
BACKBONES = {
    "unet": (UNet, UNetConfig, "diffusion-unet"),
    "dit": (DiT, DiTConfig, "diffusion-dit"),
}


@dataclass
class Schedule:
    """The training noise schedule (DDPM betas; unused by the flow objective apart from T).

    num_train_timesteps: T, an int >= 1. beta_schedule: one of genkernels.schedulers' ("linear",
    "scaled_linear", "squaredcos_cap_v2"). beta_start, beta_end: numbers in (0, 1). A ValueError otherwise.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        _python_numbers(self)
        check_at_least("num_train_timesteps", self.num_train_timesteps, 1)
        from .schedulers._base import BETA_SCHEDULES

        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if not (is_finite_real(value) and 0 < value < 1):
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")

    def scheduler_kwargs(self) -> dict:
        """The schedule as keyword arguments of a ``genkernels.schedulers`` scheduler (as of a diffusers one)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_diffusion` (weight_decay: AdamW's, >= 0; grad_clip: the gradient norm
    clip, >= 0, 0: none; schedule: the DDPM noise schedule, see :class:`Schedule`)."""

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
        _python_numbers(self)
        check_choice("objective", self.objective, OBJECTIVES)
        check_steps(self.steps, self.batch_size)
        check_positive("lr", self.lr)
        check_nonnegative("weight_decay", self.weight_decay)
        check_nonnegative("grad_clip", self.grad_clip)
        check_seed(self.seed)
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be a genkernels.train.Schedule, got {type(self.schedule).__name__}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainResult:
    """What :func:`train_diffusion` returns: the trained model, its EMA copy, and the loss of every step."""

    model: UNet | DiT
    ema: UNet | DiT
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


def model_config_for(data: ImageDataset, preset: str = "small", backbone: str = "unet") -> UNetConfig | DiTConfig:
    """A config of ``backbone`` for ``data``: the preset's sizes with the data's channels, size and classes.

    preset: "tiny" (tests) or "small" (:meth:`UNetConfig.digits` / :meth:`DiTConfig.digits`).
    backbone: "unet" (UNet levels whose resolution would fall below 2x2 are dropped) or "dit"
    (the preset's patch size must divide the image size).
    """
    check_choice("backbone", backbone, tuple(BACKBONES))
    if backbone == "dit":
        presets = {"tiny": DiTConfig.tiny, "small": DiTConfig.digits}
        _, c, h = preset_for(presets, preset, data)
        return presets[preset](sample_size=h, in_channels=c, out_channels=c, num_classes=data.num_classes)
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


def backbone_of(model_config: UNetConfig | DiTConfig) -> str:
    """The backbone ("unet" or "dit") a model config builds; a TypeError for anything else."""
    for name, (_, config_class, _) in BACKBONES.items():
        if isinstance(model_config, config_class):
            return name
    raise TypeError(f"model_config must be a UNetConfig or a DiTConfig, got {type(model_config).__name__}")


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1.0 - decay)


def train_diffusion(
    data: ImageDataset,
    model_config: UNetConfig | DiTConfig,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    backend: str | None = None,
    out: str | Path | None = None,
    save_every: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train a class-conditional UNet or DiT on ``data`` (see the module doc); returns the model, EMA and losses.

    Args:
        data: images in [-1, 1] (N, C, H, W) and labels (N,).
        model_config: a UNetConfig (UNet backbone) or a DiTConfig (DiT backbone); its num_classes
            must equal data.num_classes, its channels the data's (and a DiT's patch size must
            divide the images; with learned positions its sample_size must be theirs).
        config: steps, batch size (at most len(data): a ValueError otherwise; each step takes that many
            distinct images, see ImageDataset.batches), objective, learning rate, EMA decay, label
            dropout, seed.
        device: where to train.
        backend: for every fused op of the model; None: :func:`default_backend` of device.
        out: a folder (created): ``diffusion.safetensors`` is written there at the end (and every
            ``save_every`` steps when > 0).
        progress: show a tqdm progress bar with the running loss.
        overwrite: replace a ``diffusion.safetensors`` already in ``out``; False (default): a
            FileExistsError before any work (genkernels._training.checkpoint_path).
    """
    backbone = backbone_of(model_config)
    out_path = checkpoint_path(out, "diffusion", overwrite)
    check_batch_size(config.batch_size, len(data))
    if model_config.num_classes != data.num_classes:
        raise ValueError(
            f"model_config.num_classes={model_config.num_classes} but the data has {data.num_classes} classes"
        )
    if (model_config.in_channels, model_config.out_channels) != (data.image_shape[0],) * 2:
        raise ValueError(f"model_config channels must equal the data's {data.image_shape[0]}")
    model_class, _, model_name = BACKBONES[backbone]
    if backbone == "dit":
        model_config.grid_size(*data.image_shape[1:])  # a ValueError before training for images it cannot take
    device = torch.device(device)
    model, opt, gen = init_training(lambda: model_class(model_config), config, device)
    ema = copy.deepcopy(model).requires_grad_(False)
    noise_scheduler = None if config.objective == "flow" else make_noise_scheduler(config.schedule, config.objective)
    metadata = run_metadata(
        model_name,
        model_config,
        data,
        backbone=backbone,
        objective=config.objective,
        schedule=config.schedule.__dict__,
        label_dropout=config.label_dropout,
    )
    loop = TrainLoop("diffusion", model, metadata, config.steps, save_every, out_path, progress, ema=ema)
    losses: list[float] = []
    batches = data.batches(config.batch_size, gen)
    with backend_scope(device, backend):
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


def read_metadata(path: str | Path, model: str | None = None, family: str = "diffusion") -> dict:
    """The JSON metadata of a diffusion checkpoint of either backbone (``model`` None: "diffusion-unet"
    or "diffusion-dit"; a name: only that model), as genkernels._training.read_metadata.

    Raises FileNotFoundError for a missing file, ValueError for a file that is not a safetensors file,
    has no genkernels metadata, or holds another model.
    """
    if model is not None:
        meta = _read_metadata(path, model, family)
    else:
        try:
            meta = _read_metadata(path, BACKBONES["unet"][2], family)
        except ValueError as not_unet:
            try:
                meta = _read_metadata(path, BACKBONES["dit"][2], family)
            except ValueError:
                raise not_unet from None
    if meta["model"] in (name for _, _, name in BACKBONES.values()):
        _check_metadata(path, meta)
    return meta


def _check_metadata(path: str | Path, meta: dict) -> None:
    """A ValueError naming ``path`` unless the metadata of a diffusion checkpoint holds what sampling reads: an
    objective, a valid schedule, a backbone that fits the model name, a valid model config and an image shape
    whose channels are the model's. A damaged (or hand-edited) checkpoint then fails here, in one line, rather
    than in the middle of sampling."""

    def damaged(what: str) -> ValueError:
        return ValueError(f"{str(path)!r}: {what} (a damaged checkpoint?)")

    for key in ("objective", "schedule", "config", "image_shape"):
        if key not in meta:
            raise damaged(f"its metadata has no {key!r}")
    if meta["objective"] not in OBJECTIVES:
        raise damaged(f"its metadata's objective must be one of {OBJECTIVES}, got {meta['objective']!r}")
    backbone = meta.get("backbone", "unet")  # checkpoints from before the DiT have no backbone: UNets
    if backbone not in BACKBONES or BACKBONES[backbone][2] != meta["model"]:
        raise damaged(f"backbone {backbone!r} does not fit model {meta['model']!r}")
    try:
        Schedule(**meta["schedule"])
    except (TypeError, ValueError) as e:
        raise damaged(f"its metadata's schedule {meta['schedule']!r}: {e}") from None
    try:
        config = BACKBONES[backbone][1].from_json(json.dumps(meta["config"]))
    except (TypeError, ValueError, AttributeError) as e:
        raise damaged(f"its metadata's config: {e}") from None
    shape = meta["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(is_integer(v) and v >= 1 for v in shape)):
        raise damaged(f"its metadata's image_shape must be [C, H, W] of positive ints, got {shape!r}")
    if shape[0] != config.in_channels or shape[0] != config.out_channels:
        raise damaged(f"its metadata's image_shape {shape} does not fit its model's {config.in_channels} channels")


def load_checkpoint(
    path: str | Path, *, ema: bool = True, device: torch.device | str = "cpu", backend: str | None = None
) -> tuple[UNet | DiT, dict]:
    """(the checkpoint's model, a UNet or a DiT as its metadata's backbone says, with its EMA weights,
    or its raw weights with ema=False; metadata)."""
    meta = read_metadata(path)  # checked: the backbone fits the model name, the config is valid
    model_class, config_class, _ = BACKBONES[meta.get("backbone", "unet")]
    model = model_class(config_class.from_json(json.dumps(meta["config"])), backend=backend)
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
    model: UNet | DiT,
    metadata: dict,
    labels: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    guidance: float = 1.0,
    seed: int = 0,
    backend: str | None = None,
    progress: bool = False,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Generate len(labels) images with ``sampler`` in ``steps`` steps; returns (N, C, H, W) in the data range.

    labels: (N,) integer class labels in [0, num_classes] (the null label num_classes gives unconditional
    samples), on any device; checked on the host before any model call. guidance: classifier-free guidance
    scale g, a finite float (1: the conditional model alone; 0: the unconditional one; see the module doc). A
    model whose metadata records ``label_dropout`` 0 never learned the unconditional prediction: guidance != 1
    and the null label are then a ValueError. steps: at most the schedule's num_train_timesteps.
    The initial noise and every noise draw of the sampler come from a generator seeded with ``seed`` (an
    int in [0, 2^63)) on the model's device: the same seed gives the same images.

    cuda_graph: run the model's forward as one CUDA graph, captured at the first step and replayed at the
    others (every step has the same shapes), instead of a plain call per step whose CPU time (an op's
    dispatch and launches) the GPU would wait for. None (default): on a CUDA device when ``steps`` is at
    least :data:`GRAPH_MIN_STEPS` (the capture runs the model three times: two warm-up calls and the
    captured one), falling back to plain calls with a warning if the capture fails; True: always, on a CUDA
    device only, a failed capture raising; False: never. The scheduler's step runs outside the graph. The
    model must not synchronize with the host in its forward, and auto backend choices follow
    ``genkernels.graph_mode()``.
    """
    objective = metadata["objective"]
    check_sampler(sampler, objective)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a (N,) tensor of class labels, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be a (N,) tensor of class labels, got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if not is_integer(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    schedule = Schedule(**metadata["schedule"])
    if steps > schedule.num_train_timesteps:
        raise ValueError(
            f"steps must be at most the {schedule.num_train_timesteps} timesteps the model was trained on, got {steps}"
        )
    seed = as_number(seed)  # a NumPy integer as the Python int
    check_seed(seed)
    if not is_finite_real(guidance):
        raise ValueError(f"guidance must be a finite float, got {guidance!r}")
    if cuda_graph not in (None, True, False):
        raise ValueError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
    # The values are checked here, on the host, once: on a GPU the model's embedding would meet an out-of-range
    # label as a device-side assert, which ends the process's CUDA context. int64 holds the null label, which a
    # small integer dtype (uint8) might not.
    labels = labels.to(device="cpu", dtype=torch.long)
    null = model.null_label
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= null:
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(f"labels must be class labels in [0, {null}] ({null}: the null label), got {bad}")
    if metadata.get("label_dropout") == 0 and (guidance != 1.0 or bool((labels == null).any())):
        raise ValueError(
            "this model was trained with label_dropout 0: it never learned the unconditional prediction (the null "
            f"label {null}) that guidance {guidance} and unconditional samples need; sample with guidance=1.0 "
            "and class labels, or train with label_dropout > 0"
        )
    device = next(model.parameters()).device
    if cuda_graph and not _graphs.available(device):
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got one on {device}")
    graphed = _graphs.available(device) and steps >= GRAPH_MIN_STEPS if cuda_graph is None else cuda_graph
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
    with backend_scope(device, backend):
        denoise = _Denoiser(model, labels, graphed, strict=bool(cuda_graph))
        for t in tqdm(scheduler.timesteps, desc=f"sample {sampler}", disable=not progress, dynamic_ncols=True):
            x_in = scheduler.scale_model_input(x, t)
            out = denoise(torch.cat([x_in, x_in]) if guided else x_in, t)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


#: The fewest sampling steps for which :func:`sample_diffusion` captures the model in a CUDA graph by default.
GRAPH_MIN_STEPS = 8


class _Denoiser:
    """The model call of one sampling loop, model(x, t, labels) with fixed labels: plain, or (``graphed``)
    replayed from a CUDA graph captured at the first call (:class:`genkernels._graphs.GraphedCall`; t passed
    as a 0-d tensor, as the loop's timesteps are). A failed capture raises when ``strict``, else warns and
    leaves the calls plain."""

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor, graphed: bool, strict: bool) -> None:
        self.model, self.labels, self.graphed, self.strict = model, labels, graphed, strict
        self.call: _graphs.GraphedCall | None = None

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if not self.graphed:
            return self.model(x, t, self.labels)
        t = torch.as_tensor(t, device=x.device)
        if self.call is None:
            try:
                self.call = _graphs.GraphedCall(lambda x_, t_: self.model(x_, t_, self.labels), (x, t))
            except Exception as e:
                if self.strict:
                    raise
                import warnings

                warnings.warn(
                    f"sample_diffusion: the model's forward could not be captured in a CUDA graph "
                    f"({type(e).__name__}: {e}); sampling with plain calls (cuda_graph=False skips the attempt)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.graphed = False
                return self.model(x, t, self.labels)
        return self.call(x, t)
