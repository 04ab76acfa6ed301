"""The discrete variance-preserving schedulers' shared part: beta table, timestep lookup, add_noise."""

from __future__ import annotations

from typing import Any

import torch

from .._checks import is_finite_real
from ..ops.sampler_steps import add_noise as _add_noise
from ._base import SchedulerBase, host_scalar, make_betas


class DiscreteVPScheduler(SchedulerBase):
    """Holds betas, alphas and alphas_cumprod (float32, CPU) built from the config."""

    def _build_tables(self) -> None:
        c = self.config
        self.betas = make_betas(
            c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas, c.rescale_betas_zero_snr
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # Python floats: step() reads them without touching a tensor.
        self._abar = self.alphas_cumprod.tolist()
        self._device_abar: dict[torch.device, torch.Tensor] = {}

    def _check_clip_range(self) -> None:
        """With clip_sample on, clip_sample_range must be a finite float > 0 (checked here, not at the first step)."""
        c = self.config
        if c.clip_sample and not (is_finite_real(c.clip_sample_range) and c.clip_sample_range > 0):
            raise ValueError(
                f"{type(self).__name__}: clip_sample_range must be a finite float > 0 with clip_sample=True (x0 is "
                f"clamped to [-clip_sample_range, clip_sample_range]), got {c.clip_sample_range!r}"
            )

    def _abar_on(self, device: torch.device) -> torch.Tensor:
        """alphas_cumprod on device, copied once per device (add_noise gathers from it there)."""
        table = self._device_abar.get(device)
        if table is None:
            table = self._device_abar[device] = self.alphas_cumprod.to(device)
        return table

    def _discrete_timestep(self, timestep: Any) -> int:
        """The timestep as a host int: its own value when on the host, else the step counter's entry."""
        value = host_scalar(timestep)
        if value is None:
            if self._step_index is None:
                self._step_index = self._begin_index or 0
            value = self._host_timesteps[self._step_index]
            self._step_index += 1
        else:
            if value != int(value):
                raise ValueError(f"timestep must be an integer (one of scheduler.timesteps), got {value!r}")
            value = int(value)
            if value in self._host_timesteps:
                self._step_index = self._host_timesteps.index(value) + 1
        if not 0 <= value < self.config.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {self.config.num_train_timesteps}), got {value}")
        return value

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(abar_t) * original_samples + sqrt(1 - abar_t) * noise, one t per sample.

        timesteps: (B,) integer tensor (or one value for the whole batch), on any device; the
        coefficients are gathered on the samples' device, with no host synchronization.
        """
        abar = _gather(self._abar_on(original_samples.device), timesteps, original_samples)
        return _add_noise(original_samples, noise, abar.sqrt(), (1.0 - abar).sqrt())


def _gather(table: torch.Tensor, timesteps: Any, samples: torch.Tensor) -> torch.Tensor:
    """table[timesteps] as a float32 (B,) tensor on the samples' device."""
    if not isinstance(timesteps, torch.Tensor):
        timesteps = torch.tensor(timesteps)
    if timesteps.device.type == "cpu":  # checked where it needs no synchronization: host values
        bad = timesteps[(timesteps != timesteps.long()) | (timesteps < 0) | (timesteps >= table.shape[0])]
        if bad.numel():
            raise ValueError(f"timesteps must be integers in [0, {table.shape[0]}), got {bad.tolist()}")
    index = timesteps.to(samples.device).long().flatten()
    if index.numel() == 1:
        index = index.expand(samples.shape[0])
    if index.numel() != samples.shape[0]:
        raise ValueError(f"timesteps must hold one value per sample ({samples.shape[0]}), got {index.numel()}")
    return table.index_select(0, index)
