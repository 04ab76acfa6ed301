"""FlowMatchEulerDiscreteScheduler: Euler on the rectified-flow ODE (SD3 / FLUX style), diffusers interface."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..ops.sampler_steps import add_noise as _add_noise
from ..ops.sampler_steps import flow_euler_step
from ._base import SchedulerBase, SchedulerOutput, check_num_inference_steps, custom_schedule


class FlowMatchEulerDiscreteScheduler(SchedulerBase):
    """Flow-matching Euler (see genkernels.ops.flow_euler_step): x_sigma = (1 - sigma) * x0 + sigma * noise.

    sigmas descend from 1 (pure noise) towards 0, timesteps = sigmas * num_train_timesteps. The
    schedule is shifted by sigma' = shift * sigma / (1 + (shift - 1) * sigma), or with
    use_dynamic_shifting by exp(mu) / (exp(mu) + (1 / sigma - 1)) ("exponential") or
    mu / (mu + (1 / sigma - 1)) ("linear"), mu given to set_timesteps; shift_terminal stretches
    the schedule so that it ends at that value. Not supported (rejected): inverted sigmas,
    Karras / exponential / beta sigmas, per-token timesteps.
    """

    _choices = {"time_shift_type": ("exponential", "linear")}
    _only = {
        "invert_sigmas": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        **kwargs: Any,
    ) -> None:
        self._set_config(dict(locals()), kwargs)
        n, shift = self.config.num_train_timesteps, self.config.shift
        sigmas = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
        if not use_dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self._shift = shift
        self.sigma_min = sigmas[-1].item()
        self.sigma_max = sigmas[0].item()
        self.init_noise_sigma = 1.0
        self._set_schedule(sigmas * n, sigmas, None)

    @property
    def shift(self) -> float:
        """The static shift applied by set_timesteps."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Change the static shift for the next set_timesteps."""
        self._shift = shift

    def _set_schedule(self, timesteps: torch.Tensor, sigmas: torch.Tensor, device) -> None:
        self._schedule_timesteps = timesteps
        self.timesteps = timesteps.to(device)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._sigmas = self.sigmas.tolist()
        self._reset_steps(timesteps.tolist())

    def _time_shift(self, mu: float, sigmas: np.ndarray) -> np.ndarray:
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return mu / (mu + (1 / sigmas - 1))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """The schedule, as diffusers': num_inference_steps sigmas evenly spaced from sigma_max to sigma_min, or the
        given sigmas (in [0, 1], the final 0 left out), or timesteps / num_train_timesteps for the given timesteps;
        then shifted (and stretched to shift_terminal). timesteps are the shifted sigmas times num_train_timesteps,
        or the given timesteps as they are (not shifted, as in diffusers: pass sigmas too to choose both). With
        lists, num_inference_steps may be left out; given, it must be their length.
        """
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting is True")
        if sigmas is not None:
            sigmas = custom_schedule(sigmas, "sigmas", 0, 1, integers=False, high_open=False)
        if timesteps is not None:
            top = c.num_train_timesteps
            timesteps = custom_schedule(timesteps, "timesteps", 0, top, integers=False, high_open=False)
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(
                f"sigmas and timesteps must have the same length, got {len(sigmas)} and {len(timesteps)} entries"
            )
        given = sigmas if sigmas is not None else timesteps
        if given is not None and num_inference_steps is not None and len(given) != num_inference_steps:
            what = "sigmas" if sigmas is not None else "timesteps"
            raise ValueError(f"{what} has {len(given)} entries but num_inference_steps is {num_inference_steps}")
        if sigmas is not None:
            values = sigmas.astype(np.float32)
        elif timesteps is not None:
            values = timesteps.astype(np.float32) / c.num_train_timesteps
        else:
            num_inference_steps = check_num_inference_steps(num_inference_steps, None)
            n = c.num_train_timesteps
            values = np.linspace(self.sigma_max * n, self.sigma_min * n, num_inference_steps) / n
        if c.use_dynamic_shifting:
            values = self._time_shift(mu, values)
        else:
            values = self._shift * values / (1 + (self._shift - 1) * values)
        if c.shift_terminal:
            one_minus = 1 - values
            values = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        self.num_inference_steps = len(values)
        table = torch.from_numpy(np.asarray(values)).to(torch.float32)
        steps = table * c.num_train_timesteps
        if timesteps is not None:
            steps = torch.from_numpy(timesteps.astype(np.float32))
        self._set_schedule(steps, table, device)

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The sample unchanged (the flow model takes x_sigma as is)."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        variance_noise: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        seed: int | None = None,
        offset: int | None = None,
        backend: str | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One Euler step along the predicted velocity (or, with stochastic_sampling, re-noise x0 to sigma_next).

        model_output: the velocity (B, *), or (2B, *) = [uncond; cond] with guidance_scale. s_churn,
        s_tmin, s_tmax, s_noise are accepted and unused, as in diffusers. Noise (stochastic_sampling
        only): variance_noise, else generator, else a Philox seed, else torch's global RNG.
        return_dict=False gives (prev_sample,), as diffusers.
        """
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps is not supported")
        self._refuse_index(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_steps_left(self._step_index)
        sigma, sigma_next = self._sigmas[self._step_index], self._sigmas[self._step_index + 1]
        stochastic = self.config.stochastic_sampling
        noise = {}
        if stochastic:  # diffusers draws at every step, the last (sigma_next = 0: no noise) included
            used = sigma_next > 0
            noise = self._noise_options(sample, generator, variance_noise, seed, offset, used=used)
        prev, x0 = flow_euler_step(
            model_output,
            sample,
            sigma,
            sigma_next,
            stochastic=stochastic,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            return_x0=True,
            backend=backend,
            **noise,
        )
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev,)

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward process: sigma * noise + (1 - sigma) * sample, sigma at each sample's timestep."""
        index = self._sample_step_indices(timestep, sample)
        sigma = self._on_device("sigmas", self.sigmas, sample.device).index_select(0, index)
        return _add_noise(sample, noise, 1 - sigma, sigma)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """scale_noise with diffusers' add_noise argument order (original_samples, noise, timesteps)."""
        return self.scale_noise(original_samples, timesteps, noise)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
