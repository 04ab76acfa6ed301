"""What every scheduler shares: config, output, beta schedules, timestep spacing, step bookkeeping.

The interface is diffusers' (constructor keywords, ``config``, ``from_config``, ``set_timesteps``,
``timesteps``, ``scale_model_input``, ``step``, ``add_noise``, ``init_noise_sigma``, ``order``),
so a pipeline written for diffusers schedulers runs on these. Schedule tables stay on the CPU:
``step`` turns them into Python-float coefficients and launches one fused kernel, with no
host-device synchronization. Timestep tables are computed with the same float32 / numpy
arithmetic as diffusers so that timesteps and sigmas agree bit for bit.
"""

from __future__ import annotations

import functools
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

    Indexable like a tuple (``out[0]`` is prev_sample) and by field name (``out["prev_sample"]``), as
    diffusers' outputs are.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """(prev_sample, pred_original_sample), leaving out a missing x0."""
        if self.pred_original_sample is None:
            return (self.prev_sample,)
        return (self.prev_sample, self.pred_original_sample)

    def __getitem__(self, index):
        if isinstance(index, str):
            if index == "prev_sample" or (index == "pred_original_sample" and self.pred_original_sample is not None):
                return getattr(self, index)
            raise KeyError(index)
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


def describe_schedule(values: list) -> str:
    """A timestep schedule in a few words, for error messages: its first and last entries, count and range."""

    def show(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if not values:
        return "[] (no values)"
    if len(values) <= 6:
        listed = ", ".join(map(show, values))
    else:
        listed = ", ".join(map(show, values[:3])) + ", ..., " + ", ".join(map(show, values[-2:]))
    return f"[{listed}] ({len(values)} values, from {show(values[0])} down to {show(values[-1])})"


def custom_schedule(
    values: Any, name: str, low: float, high: float, *, integers: bool, high_open: bool, minimum: int = 1
) -> np.ndarray:
    """A custom timestep / sigma list as a float64 array, checked: at least ``minimum`` entries, each finite and in
    [low, high] ([low, high) with high_open), integers when asked; else a ValueError naming ``name``."""
    array = np.asarray(values.tolist() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if array.ndim != 1 or array.shape[0] < minimum:
        raise ValueError(
            f"{name} must be a list of at least {'one value' if minimum == 1 else f'{minimum} values'}, "
            f"got {len(array) if array.ndim == 1 else f'shape {array.shape}'}"
        )
    inside = np.isfinite(array) & (array >= low) & ((array < high) if high_open else (array <= high))
    if not inside.all():
        bound = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        bad = array[~inside].tolist()[:5]
        what = "finite and >= 0" if high == math.inf else f"in {bound}"
        raise ValueError(f"{name} must be {what}, got {bad}")
    if integers and (array != np.round(array)).any():
        raise ValueError(f"{name} must be integers, got {array[array != np.round(array)].tolist()[:5]}")
    return array


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        names = [name for name in inspect.signature(init).parameters if name not in ("self", "kwargs")]

        @functools.wraps(init)
        def init_noting_passed_arguments(self, *args: Any, **kwargs: Any) -> None:
            # The outermost constructor's arguments: the config lists the others as defaulted.
            if "_passed" not in self.__dict__:
                self._passed = set(names[: len(args)]) | set(kwargs)
            init(self, *args, **kwargs)

        cls.__init__ = init_noting_passed_arguments

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
        # As diffusers' configs: the options the caller left at their defaults, which from_config (ours and
        # diffusers') leaves out, so that another scheduler made from this config takes its own defaults there.
        passed = self.__dict__.get("_passed", set(merged))
        defaulted = [key for key in merged if key not in passed]
        if defaulted:
            self._config["_use_default_values"] = defaulted
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._noise_offset = 0

    @property
    def config(self) -> SchedulerConfig:
        """The constructor's arguments (diffusers-style), including the fixed-value options, and, as in
        diffusers, ``_use_default_values``: the names of those the caller did not pass (absent when none)."""
        return self._config

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, **kwargs: Any):
        """Build from a diffusers scheduler config dict (e.g. ``pipe.scheduler.config``), overridden by kwargs.

        Keys this class does not know (``_class_name``, other schedulers' options) are ignored, as
        diffusers does; so are the keys the config lists in ``_use_default_values`` (those its scheduler
        took by default, not from its own config; our configs list them too): this class takes its own
        defaults there, as diffusers' from_config does (Stable Diffusion 1.x's PNDM config defaults timestep_spacing to
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
        """Start the schedule at ``timesteps[begin_index]`` (as diffusers' pipelines do for img2img).

        begin_index: an int in [0, len(timesteps)] (len(timesteps): no step left, as at img2img strength 0).
        """
        count = len(self._host_timesteps)
        if not (is_integer(begin_index) and 0 <= begin_index <= count):
            raise ValueError(
                f"begin_index must be an int in [0, {count}] (a position in scheduler.timesteps), got {begin_index!r}"
            )
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

    def _not_in_schedule(self, what: str) -> ValueError:
        """The error for a timestep that is not in the schedule: the schedule in short, and what to pass."""
        hint = "pass one of scheduler.timesteps"
        if self.num_inference_steps is None:
            hint = "set_timesteps has not been called, so these are the training timesteps: call set_timesteps first"
        return ValueError(f"{what} not in this scheduler's timesteps {describe_schedule(self._host_timesteps)}; {hint}")

    def _matches(self, timestep: Any) -> list[int]:
        """Positions of timestep in the host schedule. A CPU tensor is compared as torch's ``==`` compares it with
        the schedule tensor (in their promoted dtype: a bfloat16 timestep against the schedule rounded to
        bfloat16), as diffusers' lookup does; a number is compared by value."""
        value = host_scalar(timestep)
        schedule = getattr(self, "_schedule_timesteps", None)
        if isinstance(timestep, torch.Tensor) and schedule is not None:
            return torch.nonzero(schedule == timestep.reshape(())).flatten().tolist()
        return [i for i, t in enumerate(self._host_timesteps) if t == value]

    def _index_for_timestep(self, timestep: Any) -> int:
        """Position of timestep in the schedule; the second match when it repeats (diffusers' rule)."""
        matches = self._matches(timestep)
        if not matches:
            value = host_scalar(timestep)
            raise self._not_in_schedule(f"timestep {value!r} is")
        return matches[1] if len(matches) > 1 else matches[0]

    def _refuse_index(self, timestep: Any) -> None:
        """Refuse a Python int (bool included) or an integer tensor as a sigma scheduler's timestep.

        diffusers' Euler and flow-matching steps refuse a Python int and a CPU int32 / int64 tensor (an index, as
        from ``enumerate(timesteps)``) and look everything else up as a value, NumPy integers included. Here an
        integer tensor of any dtype or device is refused too: its meaning does not depend on where it lives.
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            got = repr(timestep) if isinstance(timestep, int) else f"a {timestep.dtype} tensor on {timestep.device}"
            raise ValueError(
                f"{type(self).__name__}.step() takes a timestep value, not an integer index (got {got}): pass one "
                "of scheduler.timesteps (as `for t in scheduler.timesteps` gives it), not its position"
            )

    def _init_step_index(self, timestep: Any) -> None:
        """Find the current step without reading device memory.

        A Python number or CPU tensor is looked up in the host copy of the schedule; a device
        tensor (as from iterating ``timesteps`` on the GPU) starts at ``begin_index`` or 0.
        """
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        on_host = host_scalar(timestep) is not None
        self._step_index = self._index_for_timestep(timestep) if on_host else 0

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
        # Compared in the dtype torch's == promotes the two to, as diffusers' lookup: a float timestep is not cast
        # to an int64 schedule (999.6 is not 999).
        if self._missing_step_index == "first" and timesteps.device.type == "cpu":
            flat = timesteps.flatten()
            missing = flat[~(flat[:, None] == self._schedule_timesteps[None, :]).any(1)]
            if missing.numel():
                raise self._not_in_schedule(f"timesteps {missing.tolist()[:5]} are")
        schedule = self._on_device("timesteps", self._schedule_timesteps, samples.device)
        wanted = timesteps.to(samples.device).flatten()
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
