"""What every scheduler shares: config, output, beta schedules, timestep spacing, step bookkeeping.

The interface is diffusers' (constructor keywords, ``config``, ``from_config``, ``set_timesteps``,
``timesteps``, ``scale_model_input``, ``step``, ``add_noise``, ``init_noise_sigma``, ``order``),
so a pipeline written for diffusers schedulers runs on these. Schedule tables stay on the CPU:
``step`` turns them into Python-float coefficients and launches one fused kernel, with no
host-device synchronization. Timestep tables are computed with the same float32 / numpy
arithmetic as diffusers so that timesteps and sigmas agree bit for bit.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import as_number, is_integer

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


class SchedulerConfig(dict):
    """The constructor's keyword arguments, readable as keys or attributes (``config.prediction_type``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no entry {name!r}") from None


@dataclass
class SchedulerOutput:
    """The result of ``step``: ``prev_sample`` (x at the next timestep) and ``pred_original_sample`` (x0).

    Indexable like a tuple (``out[0]`` is prev_sample), as diffusers' outputs are.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """(prev_sample, pred_original_sample), leaving out a missing x0."""
        if self.pred_original_sample is None:
            return (self.prev_sample,)
        return (self.prev_sample, self.pred_original_sample)

    def __getitem__(self, index):
        return self.to_tuple()[index]


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """The float32 (num_train_timesteps,) beta table.

    linear: evenly spaced from beta_start to beta_end; scaled_linear: the square of evenly spaced
    values from sqrt(beta_start) to sqrt(beta_end); squaredcos_cap_v2: beta_i = min(1 - f(t_{i+1}) /
    f(t_i), 0.999) with f(t) = cos((t + 0.008) / 1.008 * pi / 2)^2 and t_i = i / N (Nichol &
    Dhariwal's cosine schedule); trained_betas, when given, is used as is (one beta per training
    timestep: another length is a ValueError, not a schedule clamped at its end). rescale_betas_zero_snr
    shifts and scales sqrt(abar) so that the last timestep has zero signal (Lin et al. 2023).
    """
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(
                f"trained_betas has shape {tuple(betas.shape)} but num_train_timesteps is {num_train_timesteps}: "
                "pass one beta per training timestep"
            )
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    else:

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    if rescale_betas_zero_snr:
        root = torch.cumprod(1.0 - betas, dim=0).sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        abar_table = root**2
        betas = 1 - torch.cat([abar_table[0:1], abar_table[1:] / abar_table[:-1]])
    return betas


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int | None) -> int:
    """num_inference_steps as a Python int in [1, num_train_timesteps] (no upper bound when None), else a ValueError."""
    n, top = num_inference_steps, num_train_timesteps
    if not (is_integer(n) and n >= 1 and (top is None or n <= top)):
        accepted = "an int >= 1" if top is None else f"an int in [1, {top}]"
        raise ValueError(f"num_inference_steps must be {accepted}, got {n!r}")
    return int(num_inference_steps)


def spaced_timesteps(config: SchedulerConfig, num_inference_steps: int, dtype) -> np.ndarray:
    """Descending inference timesteps, as numpy ``dtype`` (int64 for discrete, float32 for sigma schedulers).

    By config.timestep_spacing: linspace: evenly spaced over [0, N - 1] (rounded when integer);
    leading: multiples of N // n, plus config.steps_offset; trailing: N - 1 downwards in steps of
    N / n, rounded (N = config.num_train_timesteps, n = num_inference_steps).
    """
    num_inference_steps = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
    spacing, steps_offset = config.timestep_spacing, config.steps_offset
    n, big_n = num_inference_steps, config.num_train_timesteps
    if spacing == "linspace":
        if np.dtype(dtype) == np.int64:
            return np.linspace(0, big_n - 1, n).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, big_n - 1, n, dtype=dtype)[::-1].copy()
    if spacing == "leading":
        ratio = big_n // n
        steps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(dtype)
        return steps + np.asarray(steps_offset, dtype=dtype)
    ratio = big_n / n
    return np.round(np.arange(big_n, 0, -ratio)).astype(dtype) - np.asarray(1, dtype=dtype)


def karras_sigmas(
    sigmas: np.ndarray, num_inference_steps: int, sigma_min: float | None = None, sigma_max: float | None = None
) -> np.ndarray:
    """Karras et al. (2022) noise levels: sigma_i^(1/rho) evenly spaced from sigma_max^(1/rho) to sigma_min^(1/rho).

    rho = 7; sigma_max and sigma_min default to the first and last entries of the descending sigmas.
    """
    rho = 7.0
    top = sigma_max if sigma_max is not None else sigmas[0].item()
    bottom = sigma_min if sigma_min is not None else sigmas[-1].item()
    ramp = np.linspace(0, 1, num_inference_steps)
    top_root, bottom_root = top ** (1 / rho), bottom ** (1 / rho)
    return (top_root + ramp * (bottom_root - top_root)) ** rho


def sigmas_to_timesteps(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of the given sigmas: piecewise-linear in log sigma between table entries.

    log_train_sigmas: log of the (ascending) training sigma table, in its own dtype (float32), as
    diffusers keeps it, so that the timesteps agree bit for bit.
    """
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # Index of the last table entry at or below each log sigma (0 when none is), kept below the end.
    below = (log_sigma[None, :] - log_train_sigmas[:, None]) >= 0
    low = np.clip(below.sum(axis=0) - 1, 0, log_train_sigmas.shape[0] - 2)
    low_value, high_value = log_train_sigmas[low], log_train_sigmas[low + 1]
    weight = np.clip((low_value - log_sigma) / (low_value - high_value), 0, 1)
    return ((1 - weight) * low + weight * (low + 1)).reshape(sigmas.shape)


def host_scalar(value: Any, name: str = "timestep") -> float | None:
    """value as a Python number if it is one (or a CPU tensor); None for a device tensor (no sync)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single value, got a tensor of shape {tuple(value.shape)}")
        return value.item() if value.device.type == "cpu" else None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value.item() if isinstance(value, (np.integer, np.floating)) else value
    raise TypeError(f"{name} must be a number or a one-element tensor, got {type(value).__name__}")


class SchedulerBase:
    """Config handling, step counting and the fused-step options common to every scheduler.

    Subclasses list, in ``_choices``, the accepted values of their string options and, in
    ``_only``, the diffusers options they accept at one value only (a config that turns such a
    feature on is rejected with a clear error instead of being silently ignored), and in
    ``_inert``, options kept in the config whatever their value because they only matter with a
    feature that is off (``dynamic_thresholding_ratio`` without thresholding).
    """

    order = 1
    _choices: dict[str, tuple] = {}
    _only: dict[str, Any] = {}
    _inert: dict[str, Any] = {}
    _missing_step_index = "first"

    # ------------------------------------------------------------------ config

    def _set_config(self, values: dict[str, Any], extra: dict[str, Any]) -> None:
        name = type(self).__name__
        values = {k: v for k, v in values.items() if k not in ("self", "kwargs", "__class__")}
        inert = {k: extra.pop(k, v) for k, v in self._inert.items()}
        for key, value in extra.items():
            if key not in self._only:
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
            if value != self._only[key]:
                raise ValueError(f"{name}: {key}={value!r} is not supported; accepted: {self._only[key]!r}")
        for key, accepted in self._choices.items():
            if values[key] not in accepted:
                raise ValueError(f"{name}: {key} must be one of {', '.join(map(repr, accepted))}, got {values[key]!r}")
        if not is_integer(values["num_train_timesteps"]) or values["num_train_timesteps"] < 1:
            got = values["num_train_timesteps"]
            raise ValueError(f"{name}: num_train_timesteps must be a positive int, got {got!r}")
        # Python numbers only (NumPy scalars converted), as in a config read from JSON.
        merged = {**values, **self._only, **extra, **inert}
        self._config = SchedulerConfig({key: as_number(value) for key, value in merged.items()})
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._noise_offset = 0

    @property
    def config(self) -> SchedulerConfig:
        """The constructor's arguments (diffusers-style), including the fixed-value options."""
        return self._config

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, **kwargs: Any):
        """Build from a diffusers scheduler config dict (e.g. ``pipe.scheduler.config``), overridden by kwargs.

        Keys this class does not know (``_class_name``, other schedulers' options) are ignored, as
        diffusers does; so are the keys the config lists in ``_use_default_values`` (those its scheduler
        took by default, not from its own config): this class takes its own defaults there, as
        diffusers' from_config does (Stable Diffusion 1.x's PNDM config defaults timestep_spacing to
        "leading"; an Euler scheduler made from it spaces by its own "linspace"). Known options set to
        values we do not support raise ValueError.
        """
        config = dict(config or {})
        defaulted = set(config.pop("_use_default_values", None) or ())
        merged = {**{k: v for k, v in config.items() if k not in defaulted}, **kwargs}
        if merged.get("trained_betas") is not None:
            merged["trained_betas"] = list(merged["trained_betas"])
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        known |= set(cls._only) | set(cls._inert)
        return cls(**{k: v for k, v in merged.items() if k in known})

    # ------------------------------------------------------------------ step bookkeeping

    @property
    def step_index(self) -> int | None:
        """Index of the next step in ``timesteps`` (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index, when set by ``set_begin_index`` (img2img / partial schedules)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the schedule at ``timesteps[begin_index]`` (as diffusers' pipelines do for img2img)."""
        self._begin_index = int(begin_index)

    def _reset_steps(self, host_timesteps: list) -> None:
        """A new schedule: host copy of the timesteps, no current or begin step, fresh noise offsets."""
        self._host_timesteps = host_timesteps
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._step_index = None
        self._begin_index = None
        self._noise_offset = 0

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    def _check_steps_left(self, index: int) -> None:
        """Refuse a step at ``index`` past the schedule's last step."""
        count = len(self._host_timesteps)
        if index >= count:
            raise ValueError(f"all {count} steps of the schedule have run: call set_timesteps again for a new run")

    def _index_for_timestep(self, value: float) -> int:
        """Position of value in the schedule; the second match when it repeats (diffusers' rule)."""
        matches = [i for i, t in enumerate(self._host_timesteps) if t == value]
        if not matches:
            raise ValueError(f"timestep {value!r} is not in this scheduler's timesteps {self._host_timesteps}")
        return matches[1] if len(matches) > 1 else matches[0]

    def _init_step_index(self, timestep: Any) -> None:
        """Find the current step without reading device memory.

        A Python number or CPU tensor is looked up in the host copy of the schedule; a device
        tensor (as from iterating ``timesteps`` on the GPU) starts at ``begin_index`` or 0.
        """
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        value = host_scalar(timestep)
        self._step_index = 0 if value is None else self._index_for_timestep(value)

    def _on_device(self, name: str, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A schedule table copied to device once (per set_timesteps), for add_noise's gathers."""
        key = (name, device)
        if key not in self._device_tables:
            self._device_tables[key] = table.to(device)
        return self._device_tables[key]

    def _sample_step_indices(self, timesteps: Any, samples: torch.Tensor) -> torch.Tensor:
        """Each sample's position in the schedule, as an int64 (B,) tensor on the samples' device.

        With no begin_index, each timestep is matched against the schedule on the device (the
        second match where a value repeats, the first otherwise, as diffusers' lookup): no host
        synchronization. A value that is not in the schedule takes DPM-Solver's last step (its
        diffusers rule); for the other schedulers it is an error (as in diffusers) when the
        timesteps are on the host, and maps to the first step when they are on a device, which is
        not read. Otherwise every sample is at the current step (or begin_index), as in diffusers.
        """
        batch = samples.shape[0]
        if self._begin_index is not None:
            index = self._step_index if self._step_index is not None else self._begin_index
            return torch.full((batch,), index, dtype=torch.long, device=samples.device)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.tensor(timesteps)
        if self._missing_step_index == "first" and timesteps.device.type == "cpu":
            missing = timesteps[~torch.isin(timesteps.to(self._schedule_timesteps.dtype), self._schedule_timesteps)]
            if missing.numel():
                raise ValueError(
                    f"timesteps {missing.tolist()} are not in this scheduler's timesteps {self._host_timesteps}"
                )
        schedule = self._on_device("timesteps", self._schedule_timesteps, samples.device)
        wanted = timesteps.to(samples.device, schedule.dtype).flatten()
        if wanted.numel() == 1:
            wanted = wanted.expand(batch)
        if wanted.numel() != batch:
            raise ValueError(f"timesteps must hold one value per sample ({batch}), got {wanted.numel()}")
        hits = schedule[None, :] == wanted[:, None]
        seen = hits.cumsum(1)
        first = hits.int().argmax(1)
        second = (hits & (seen == 2)).int().argmax(1)
        index = torch.where(seen[:, -1] > 1, second, first)
        missing = len(self._host_timesteps) - 1 if self._missing_step_index == "last" else 0
        return torch.where(seen[:, -1] > 0, index, missing)

    def _noise_options(
        self, sample: torch.Tensor, generator, variance_noise, seed, offset, used: bool = True
    ) -> dict[str, Any]:
        """The step's noise source: explicit tensor, generator, Philox (seed, offset), else torch's global RNG.

        Call it where diffusers' step draws noise. With a seed and no offset, the offset is the count of
        stochastic steps so far: each step draws its own Philox stream and successive steps never reuse
        noise. With none of the three, the noise comes from torch's default (CPU) generator, as diffusers'
        does from the global RNG when generator is None: the reference draws torch.randn with it
        (diffusers' noise for a CPU sample), the fast backends one Philox seed (a host int: no
        synchronization). generator may also be a list of generators, one per sample, as diffusers'
        randn_tensor takes them (a one-element list is its generator): the noise is then drawn here,
        sample i's as torch.randn of shape (1, *) with generator i on its device, float32, and the step
        runs on it as on variance_noise, whatever the backend.

        used=False: this step adds no noise (its noise coefficient is 0, as at a last step) although
        diffusers' draws some: the generator (or the global one) is advanced by the same draw, so that a
        generator reused for the next image is where diffusers' would be. Returns {} then.
        """
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        generator = _generators(generator, sample.shape[0])
        if variance_noise is None and generator is None and seed is None:
            generator = torch.default_generator
        if isinstance(generator, list):
            variance_noise, generator = _draw(generator, sample), None
        elif not used and variance_noise is None and generator is not None:
            torch.randn(sample.shape, generator=generator, device=generator.device, dtype=torch.float32)
        if not used:
            return {}
        if seed is not None and offset is None:
            offset = self._noise_offset
            self._noise_offset += 1
        return dict(noise=variance_noise, generator=generator, seed=seed, offset=offset or 0)


def _generators(generator: Any, batch: int) -> torch.Generator | list[torch.Generator] | None:
    """generator as None, one torch.Generator, or a list of one per sample (a one-element list: its generator)."""
    if not isinstance(generator, (list, tuple)):
        return generator  # None, a generator, or what schedule_step refuses with its own message
    if not all(isinstance(g, torch.Generator) for g in generator):
        kinds = ", ".join(type(g).__name__ for g in generator)
        raise TypeError(f"generator must be a torch.Generator, a list of them or None, got list of [{kinds}]")
    if len(generator) == 1:
        return generator[0]
    if len(generator) != batch:
        raise ValueError(
            f"generator is a list of {len(generator)} generators but the batch has {batch} samples: pass one per sample"
        )
    return list(generator)


def _draw(generators: list[torch.Generator], sample: torch.Tensor) -> torch.Tensor:
    """Sample i's standard normal noise drawn with generators[i] (diffusers' randn_tensor for a list), float32."""
    if not generators:
        return torch.zeros(sample.shape, device=sample.device)
    shape = (1, *sample.shape[1:])
    draws = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.cat([d.to(sample.device) for d in draws])
