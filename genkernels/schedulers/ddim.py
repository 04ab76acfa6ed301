"""DDIMScheduler: denoising diffusion implicit models (Song et al. 2021), diffusers interface."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._checks import nonnegative_float
from ..ops.sampler_steps import ddim_step
from ._base import BETA_SCHEDULES, SPACINGS, SchedulerOutput, spaced_timesteps
from ._vp import DiscreteVPScheduler


class DDIMScheduler(DiscreteVPScheduler):
    """DDIM sampler with eta (see genkernels.ops.ddim_step for the formula).

    The previous timestep is t - num_train_timesteps // num_inference_steps (diffusers' rule);
    past the start, abar is 1 (set_alpha_to_one) or abar_0. Not supported: thresholding.
    """

    _choices = {
        "beta_schedule": BETA_SCHEDULES,
        "timestep_spacing": SPACINGS,
        "prediction_type": ("epsilon", "v_prediction", "sample"),
    }
    _only = {"thresholding": False}
    _inert = {"dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        **kwargs: Any,
    ) -> None:
        self._set_config(dict(locals()), kwargs)
        self._check_clip_range()
        self._build_tables()
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else self._abar[0]
        self.init_noise_sigma = 1.0
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1)
        self._reset_steps(self.timesteps.tolist())

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose num_inference_steps timesteps (int64, descending) by the config's timestep_spacing."""
        steps = spaced_timesteps(self.config, num_inference_steps, np.int64)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(steps).to(device)
        self._reset_steps(steps.tolist())

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The sample unchanged (DDIM's model takes x_t as is)."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        seed: int | None = None,
        offset: int | None = None,
        backend: str | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """x_t -> x_{t - N // n} by DDIM with eta (noise only when eta > 0).

        model_output: (B, *), or (2B, *) = [uncond; cond] with guidance_scale. Noise (eta > 0):
        variance_noise, else generator, else a Philox seed (offset advances per step unless given),
        else torch's global RNG.
        """
        self._require_timesteps()
        eta = nonnegative_float("eta", eta)
        c = self.config
        t = self._discrete_timestep(timestep)
        prev_t = t - c.num_train_timesteps // self.num_inference_steps
        abar, abar_prev = self._abar[t], self._abar[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        noise = {}
        if eta > 0:  # diffusers draws then, also where the step's std is 0 (abar_prev 1 or abar_t)
            used = abar_prev not in (1.0, abar)
            noise = self._noise_options(sample, generator, variance_noise, seed, offset, used=used)
        prev, x0 = ddim_step(
            model_output,
            sample,
            abar,
            abar_prev,
            eta=eta,
            prediction_type=c.prediction_type,
            use_clipped_model_output=use_clipped_model_output,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            clip_sample=c.clip_sample_range if c.clip_sample else None,
            return_x0=True,
            backend=backend,
            **noise,
        )
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
