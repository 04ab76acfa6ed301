"""EulerDiscreteScheduler and EulerAncestralDiscreteScheduler: sigma-space samplers (Karras et al. 2022)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..ops.sampler_steps import add_noise as _add_noise
from ..ops.sampler_steps import euler_ancestral_step, euler_step
from ._base import (
    BETA_SCHEDULES,
    SPACINGS,
    SchedulerOutput,
    custom_schedule,
    karras_sigmas,
    sigmas_to_timesteps,
    spaced_timesteps,
)
from ._vp import DiscreteVPScheduler


class _SigmaScheduler(DiscreteVPScheduler):
    """Sigma-space schedule: s_t = sqrt((1 - abar_t) / abar_t), interpolated at float timesteps, then 0."""

    def _build_sigma_tables(self) -> None:
        self._build_tables()
        if self.config.rescale_betas_zero_snr:
            # abar_T = 0 would give an infinite sigma: keep it at the smallest float32 step.
            self.alphas_cumprod[-1] = 2**-24
            self._abar = self.alphas_cumprod.tolist()
        self._train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        n = self.config.num_train_timesteps
        self._set_schedule(
            np.linspace(0, n - 1, n, dtype=float)[::-1].copy(),
            np.concatenate([self._train_sigmas.flip(0).numpy(), [0.0]]).astype(np.float32),
            None,
        )
        self.num_inference_steps = None

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, device) -> None:
        self._schedule_timesteps = torch.from_numpy(timesteps.astype(np.float32))
        self.timesteps = self._schedule_timesteps.to(device)
        self.sigmas = torch.from_numpy(sigmas)
        self._sigmas = self.sigmas.tolist()
        self._reset_steps(self._schedule_timesteps.tolist())

    def _inference_sigmas(self, num_inference_steps: int, device, final_sigma: float) -> None:
        steps = spaced_timesteps(self.config, num_inference_steps, np.float32)
        self.num_inference_steps = num_inference_steps
        table = self._train_sigmas.numpy()
        sigmas = np.interp(steps, np.arange(0, len(table)), table)
        if self.config.get("use_karras_sigmas"):
            sigmas = karras_sigmas(sigmas, num_inference_steps, self.config.sigma_min, self.config.sigma_max)
            steps = sigmas_to_timesteps(sigmas, np.log(table))
        self._set_schedule(steps, np.concatenate([sigmas, [final_sigma]]).astype(np.float32), device)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: the largest sigma (or sqrt(sigma^2 + 1) for leading)."""
        top = max(self._sigmas)
        return top if self.config.timestep_spacing in ("linspace", "trailing") else math.sqrt(top * top + 1.0)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """sample / sqrt(sigma^2 + 1): the model sees a unit-variance input."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_steps_left(self._step_index)
        sigma = self._sigmas[self._step_index]
        return sample / math.sqrt(sigma * sigma + 1.0)

    def _current_sigmas(self, timestep: Any) -> tuple[float, float]:
        self._refuse_index(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_steps_left(self._step_index)
        return self._sigmas[self._step_index], self._sigmas[self._step_index + 1]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """original_samples + sigma_t * noise, sigma_t looked up for each sample's timestep (no host sync)."""
        index = self._sample_step_indices(timesteps, original_samples)
        sigma = self._on_device("sigmas", self.sigmas, original_samples.device).index_select(0, index)
        return _add_noise(original_samples, noise, 1.0, sigma)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler sampler (see genkernels.ops.euler_step), diffusers interface.

    use_karras_sigmas spaces the sigmas as Karras et al. (between sigma_max and sigma_min, by
    default the interpolated schedule's ends) and maps them back to fractional timesteps. Not
    supported (rejected): s_churn > 0, exponential / beta sigmas, log-linear interpolation,
    continuous timesteps.
    """

    _choices = {
        "beta_schedule": BETA_SCHEDULES,
        "timestep_spacing": SPACINGS,
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }
    _only = {
        "interpolation_type": "linear",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
    }

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
        use_karras_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._set_config(dict(locals()), kwargs)
        self._build_sigma_tables()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """The schedule, from exactly one of (as diffusers'):

        - num_inference_steps: float32 timesteps by timestep_spacing, sigmas interpolated there (or spaced as
          Karras et al.'s), then the final sigma;
        - timesteps: custom training timesteps in [0, num_train_timesteps - 1] (fractional ones too), sigmas
          interpolated there, then the final sigma (not with use_karras_sigmas);
        - sigmas: custom sigmas, the final one included (len(sigmas) - 1 steps), each >= 0, their timesteps
          interpolated in log sigma.
        """
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass only one of timesteps or sigmas to set_timesteps, not both")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            top = self.config.num_train_timesteps
            raise ValueError(
                f"num_inference_steps must be an int in [1, {top}], got None: pass it, timesteps or sigmas"
            )
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("pass only one of num_inference_steps, timesteps or sigmas to set_timesteps")
        if timesteps is not None and self.config.use_karras_sigmas:
            raise ValueError("set_timesteps cannot take timesteps with use_karras_sigmas=True (pass sigmas instead)")
        final = 0.0
        if self.config.final_sigmas_type == "sigma_min":
            final = (((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5).item()
        table = self._train_sigmas.numpy()
        if sigmas is not None:
            values = custom_schedule(sigmas, "sigmas", 0, math.inf, integers=False, high_open=False, minimum=2)
            values = values.astype(np.float32)
            self.num_inference_steps = len(values) - 1
            self._set_schedule(sigmas_to_timesteps(values[:-1], np.log(table)), values, device)
        elif timesteps is not None:
            top = self.config.num_train_timesteps - 1
            steps = custom_schedule(timesteps, "timesteps", 0, top, integers=False, high_open=False)
            steps = steps.astype(np.float32)
            self.num_inference_steps = len(steps)
            values = np.interp(steps, np.arange(0, len(table)), table)
            self._set_schedule(steps, np.concatenate([values, [final]]).astype(np.float32), device)
        else:
            self._inference_sigmas(num_inference_steps, device, final)

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
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        backend: str | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Euler step from sigma to the next sigma (deterministic).

        model_output: (B, *), or (2B, *) = [uncond; cond] with guidance_scale.
        """
        if s_churn != 0.0:
            raise ValueError(f"s_churn={s_churn!r} is not supported (the fused step has no churn); use 0.0")
        sigma, sigma_next = self._current_sigmas(timestep)
        prev, x0 = euler_step(
            model_output,
            sample,
            sigma,
            sigma_next,
            prediction_type=self.config.prediction_type,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            return_x0=True,
            backend=backend,
        )
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """Euler-ancestral sampler (see genkernels.ops.euler_ancestral_step), diffusers interface.

    prediction_type "sample" (x0 = model_output, as in EulerDiscreteScheduler) is supported; diffusers'
    scheduler raises NotImplementedError for it at step(). The step is then diffusers' epsilon step on the
    noise the prediction implies, eps = (x - x0) / sigma.
    """

    _choices = {
        "beta_schedule": BETA_SCHEDULES,
        "timestep_spacing": SPACINGS,
        "prediction_type": ("epsilon", "v_prediction", "sample"),
    }

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        **kwargs: Any,
    ) -> None:
        self._set_config(dict(locals()), kwargs)
        self._build_sigma_tables()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """num_inference_steps float32 timesteps by timestep_spacing; sigmas interpolated there, then 0."""
        self._inference_sigmas(num_inference_steps, device, 0.0)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        variance_noise: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        seed: int | None = None,
        offset: int | None = None,
        backend: str | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Euler-ancestral step: Euler down to sigma_down, plus sigma_up * noise.

        model_output: (B, *), or (2B, *) = [uncond; cond] with guidance_scale. Noise:
        variance_noise, else generator, else a Philox seed (offset advances per step unless given),
        else torch's global RNG.
        """
        sigma, sigma_next = self._current_sigmas(timestep)
        # diffusers draws at every step, the last (sigma_next = 0: no noise) included
        noise = self._noise_options(sample, generator, variance_noise, seed, offset, used=sigma_next > 0)
        prev, x0 = euler_ancestral_step(
            model_output,
            sample,
            sigma,
            sigma_next,
            prediction_type=self.config.prediction_type,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            return_x0=True,
            backend=backend,
            **noise,
        )
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
