"""DDPMScheduler: ancestral sampling of Ho et al. (2020), diffusers interface, one fused kernel a step."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..ops.sampler_steps import ddpm_step
from ._base import BETA_SCHEDULES, SPACINGS, SchedulerOutput, custom_schedule, spaced_timesteps
from ._vp import DiscreteVPScheduler


class DDPMScheduler(DiscreteVPScheduler):
    """Denoising diffusion probabilistic model sampler (see genkernels.ops.ddpm_step for the formula).

    Constructor keywords and defaults are diffusers'; variance_type None (as in other schedulers'
    configs) is "fixed_small", as in diffusers. Not supported (rejected): thresholding, the
    "learned" / "learned_range" / "fixed_large_log" variance types.
    """

    _choices = {
        "beta_schedule": BETA_SCHEDULES,
        "timestep_spacing": SPACINGS,
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", None),
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
        variance_type: str | None = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        **kwargs: Any,
    ) -> None:
        self._set_config(dict(locals()), kwargs)
        self._check_clip_range()
        self._build_tables()
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1)
        self._reset_steps(self.timesteps.tolist())

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose num_inference_steps timesteps (int64, descending) by the config's timestep_spacing, or take the
        custom ``timesteps`` (pass one of the two): distinct integers in [0, num_train_timesteps), descending. Each
        step then goes to the next listed timestep (``custom_timesteps`` is True), as in diffusers.
        num_inference_steps becomes the length of the list (diffusers leaves it unset there)."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of num_inference_steps or timesteps to set_timesteps, not both")
        if timesteps is None and num_inference_steps is None:
            top = self.config.num_train_timesteps
            raise ValueError(f"num_inference_steps must be an int in [1, {top}], got None: pass it or timesteps")
        if timesteps is not None:
            n = self.config.num_train_timesteps
            values = custom_schedule(timesteps, "timesteps", 0, n, integers=True, high_open=True)
            if (np.diff(values) >= 0).any():
                got = values.astype(np.int64).tolist()
                raise ValueError(f"timesteps must be in descending order (each below the one before), got {got}")
            steps = values.astype(np.int64)
        else:
            steps = spaced_timesteps(self.config, num_inference_steps, np.int64)
        self.custom_timesteps = timesteps is not None
        self.num_inference_steps = len(steps)
        self.timesteps = torch.from_numpy(steps).to(device)
        self._reset_steps(steps.tolist())

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The sample unchanged (DDPM's model takes x_t as is)."""
        return sample

    def previous_timestep(self, timestep: int) -> int:
        """The next (smaller) timestep of the schedule; -1 after the last."""
        if self.num_inference_steps is None:
            return timestep - 1
        index = self._index_for_timestep(timestep)
        return self._host_timesteps[index + 1] if index + 1 < len(self._host_timesteps) else -1

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
        """x_t -> x_{t_prev}: DDPM's posterior mean plus noise (none at t = 0).

        model_output: (B, *), or (2B, *) = [uncond; cond] with guidance_scale (classifier-free
        guidance, optionally rescaled, fused into the step). Noise: variance_noise (B, *), else
        generator, else a Philox seed (offset advances per step unless given), else torch's global RNG.
        """
        c = self.config
        t = self._discrete_timestep(timestep)
        prev_t = self.previous_timestep(t)
        stochastic = t > 0
        noise = self._noise_options(sample, generator, variance_noise, seed, offset) if stochastic else {}
        prev, x0 = ddpm_step(
            model_output,
            sample,
            self._abar[t],
            self._abar[prev_t] if prev_t >= 0 else 1.0,
            prediction_type=c.prediction_type,
            variance_type=c.variance_type or "fixed_small",
            add_variance=stochastic,
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
