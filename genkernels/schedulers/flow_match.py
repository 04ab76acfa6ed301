"""FlowMatchEulerDiscreteScheduler: Euler on the rectified-flow ODE (SD3 / FLUX style), diffusers interface."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..ops.sampler_steps import add_noise as _add_noise
from ..ops.sampler_steps import flow_euler_step
from ._base import SchedulerBase, SchedulerOutput, check_num_inference_steps


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
    ) -> None:
        """num_inference_steps sigmas evenly spaced from sigma_max to sigma_min (or the given sigmas), shifted."""
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting is True")
        if sigmas is None:
            num_inference_steps = check_num_inference_steps(num_inference_steps, None)
            n = c.num_train_timesteps
            values = np.linspace(self.sigma_max * n, self.sigma_min * n, num_inference_steps) / n
        else:
            values = np.array(sigmas).astype(np.float32)
            if num_inference_steps is not None and len(values) != num_inference_steps:
                raise ValueError(f"sigmas has {len(values)} entries but num_inference_steps is {num_inference_steps}")
        if c.use_dynamic_shifting:
            values = self._time_shift(mu, values)
        else:
            values = self._shift * values / (1 + (self._shift - 1) * values)
        if c.shift_terminal:
            one_minus = 1 - values
            values = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        self.num_inference_steps = len(values)
        table = torch.from_numpy(np.asarray(values)).to(torch.float32)
        self._set_schedule(table * c.num_train_timesteps, table, device)

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
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("FlowMatchEulerDiscreteScheduler.step() takes one of scheduler.timesteps, not an index")
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
