"""DPMSolverMultistepScheduler: DPM-Solver++ (2M by default) of Lu et al. (2022), diffusers interface."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..ops.sampler_steps import add_noise as _add_noise
from ..ops.sampler_steps import dpmpp_2m_step
from ._base import (
    BETA_SCHEDULES,
    SPACINGS,
    SchedulerOutput,
    check_num_inference_steps,
    custom_schedule,
    karras_sigmas,
    sigmas_to_timesteps,
)
from ._vp import DiscreteVPScheduler


class DPMSolverMultistepScheduler(DiscreteVPScheduler):
    """Multistep DPM-Solver++ (see genkernels.ops.dpmpp_2m_step): solver_order 1 or 2,
    algorithm_type "dpmsolver++" or "sde-dpmsolver++", solver_type "midpoint" or "heun".

    The scheduler keeps the previous step's x0 (data prediction) for the second-order update;
    the first step, and the last one where diffusers lowers the order, are first order. As in
    diffusers, configs written for DEIS / UniPC ("deis", "logrho", "bh1", "bh2") map to
    dpmsolver++ / midpoint. use_karras_sigmas spaces the sigmas as Karras et al. over the whole
    training range ("DPM++ 2M Karras") with the timesteps mapped back and rounded. Not supported
    (rejected): solver_order 3, the noise-prediction "dpmsolver" variants, thresholding,
    exponential / beta / Lu / flow sigmas, learned variance, dynamic shifting.

    ``order`` is 1 whatever solver_order, as in diffusers: it counts timesteps per denoising step
    (one model call each), which pipelines multiply by to slice and begin partial (img2img) schedules.
    variance_type is accepted as None or a fixed variance type (a DDPM config's, unused here).
    """

    _choices = {
        "beta_schedule": BETA_SCHEDULES,
        "timestep_spacing": SPACINGS,
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
        "solver_type": ("midpoint", "heun"),
        "solver_order": (1, 2),
        "final_sigmas_type": ("zero", "sigma_min"),
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large"),
    }
    _only = {
        "thresholding": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
    }
    _inert = {
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "flow_shift": 1.0,
        "time_shift_type": "exponential",
    }

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        variance_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        if algorithm_type == "deis":
            algorithm_type = "dpmsolver++"
        if solver_type in ("logrho", "bh1", "bh2"):
            solver_type = "midpoint"
        self._set_config(dict(locals()), kwargs)
        self._build_tables()
        if rescale_betas_zero_snr:
            # abar_T = 0 would give an infinite sigma: keep it at the smallest float32 step.
            self.alphas_cumprod[-1] = 2**-24
            self._abar = self.alphas_cumprod.tolist()
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self._train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.sigmas = self._train_sigmas
        self.init_noise_sigma = 1.0
        n = self.config.num_train_timesteps
        self._schedule_timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy())
        self.timesteps = self._schedule_timesteps
        self._reset_steps(self.timesteps.tolist())
        self._x0_prev: torch.Tensor | None = None
        self.lower_order_nums = 0

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """num_inference_steps int64 timesteps by timestep_spacing (the n + 1 grid without its last point for
        linspace / leading), or the custom ``timesteps`` (integers in [0, num_train_timesteps), not with
        use_karras_sigmas); the sigmas interpolated there, then the final sigma; resets the solver history.
        Pass one of num_inference_steps and timesteps. mu (dynamic shifting) is not supported: it must be None."""
        c = self.config
        if mu is not None:
            raise ValueError(f"mu={mu!r} needs use_dynamic_shifting, which this scheduler does not support: pass None")
        if num_inference_steps is None and timesteps is None:
            top = c.num_train_timesteps
            raise ValueError(f"num_inference_steps must be an int in [1, {top}], got None: pass it or timesteps")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of num_inference_steps or timesteps to set_timesteps, not both")
        if timesteps is not None:
            if c.use_karras_sigmas:
                raise ValueError("set_timesteps cannot take timesteps with use_karras_sigmas=True")
            n = c.num_train_timesteps
            steps = custom_schedule(timesteps, "timesteps", 0, n, integers=True, high_open=True).astype(np.int64)
            self._set_tables(steps, np.interp(steps, np.arange(0, n), self._train_sigmas.numpy()), device)
            return
        num_inference_steps = check_num_inference_steps(num_inference_steps, c.num_train_timesteps)
        clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped).item()
        last = c.num_train_timesteps - clipped
        n = num_inference_steps
        if c.timestep_spacing == "linspace":
            steps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif c.timestep_spacing == "leading":
            ratio = last // (n + 1)
            if ratio == 0:
                raise ValueError(
                    f"num_inference_steps must be below {last} with timestep_spacing='leading' (its timesteps are "
                    f"multiples of {last} // (num_inference_steps + 1), all 0 here), got {n}"
                )
            steps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + c.steps_offset
        else:
            steps = np.arange(last, 0, -c.num_train_timesteps / n).round().copy().astype(np.int64) - 1
        table = self._train_sigmas.numpy()
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(np.flip(table).copy(), n)
            steps = sigmas_to_timesteps(sigmas, np.log(table))
            if c.beta_schedule != "squaredcos_cap_v2":
                steps = steps.round()
            steps = steps.astype(np.int64)
        else:
            sigmas = np.interp(steps, np.arange(0, len(table)), table)
        self._set_tables(steps, sigmas, device)

    def _set_tables(self, steps: np.ndarray, sigmas: np.ndarray, device) -> None:
        """Install int64 timesteps and their sigmas (the final sigma appended); reset the solver history."""
        c = self.config
        final = 0.0
        if c.final_sigmas_type == "sigma_min":
            final = (((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5).item()
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))
        self._sigmas = self.sigmas.tolist()
        self._schedule_timesteps = torch.from_numpy(steps)
        self.timesteps = self._schedule_timesteps.to(device)
        self.num_inference_steps = len(steps)
        self._reset_steps(steps.tolist())
        self._x0_prev = None
        self.lower_order_nums = 0

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The sample unchanged (the model takes x_t as is)."""
        return sample

    _missing_step_index = "last"  # diffusers' rule for this scheduler: an unknown timestep is the last step

    def _index_for_timestep(self, timestep: Any) -> int:
        matches = self._matches(timestep)
        if not matches:
            return len(self._host_timesteps) - 1
        return matches[1] if len(matches) > 1 else matches[0]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        seed: int | None = None,
        offset: int | None = None,
        backend: str | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One multistep DPM-Solver++ step; returns prev_sample and the step's x0 (pred_original_sample).

        model_output: (B, *), or (2B, *) = [uncond; cond] with guidance_scale. Noise (SDE variant
        only): variance_noise, else generator, else a Philox seed, else torch's global RNG.
        return_dict=False gives (prev_sample,), as diffusers.
        """
        self._require_timesteps()
        c = self.config
        if self._step_index is None:
            self._init_step_index(timestep)
        i, count = self._step_index, len(self._host_timesteps)
        self._check_steps_left(i)
        last_lowered = i == count - 1 and (
            c.euler_at_final or (c.lower_order_final and count < 15) or c.final_sigmas_type == "zero"
        )
        second = c.solver_order == 2 and self.lower_order_nums >= 1 and not last_lowered
        sde = c.algorithm_type == "sde-dpmsolver++"
        noise = {}
        if sde:  # diffusers draws at every step, the last (sigma_next = 0: no noise) included
            used = self._sigmas[i + 1] > 0
            noise = self._noise_options(sample, generator, variance_noise, seed, offset, used=used)
        prev, x0 = dpmpp_2m_step(
            model_output,
            sample,
            self._sigmas[i],
            self._sigmas[i + 1],
            self._x0_prev if second else None,
            self._sigmas[i - 1] if second else None,
            prediction_type=c.prediction_type,
            solver_type=c.solver_type,
            sde=sde,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            backend=backend,
            **noise,
        )
        self._x0_prev = x0
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_t * original_samples + sigma_t * noise with alpha_t = 1 / sqrt(s^2 + 1), sigma_t = s * alpha_t,
        s the schedule's sigma at each sample's timestep (looked up on the device, no host sync)."""
        index = self._sample_step_indices(timesteps, original_samples)
        if not isinstance(self.sigmas, torch.Tensor) or self.num_inference_steps is None:
            raise ValueError("DPMSolverMultistepScheduler.add_noise: call set_timesteps first")
        s = self._on_device("sigmas", self.sigmas, original_samples.device).index_select(0, index)
        alpha = 1 / (s * s + 1) ** 0.5
        return _add_noise(original_samples, noise, alpha, s * alpha)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
